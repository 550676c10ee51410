"""ISO 7816-4 and GlobalPlatform status words.

Status words are plain ``int`` values (``0x9000``), so they compare and log
cheaply and travel unchanged through protobuf ``uint32`` fields.
"""

from __future__ import annotations

from typing import Final

OK: Final = 0x9000
BYTES_REMAINING: Final = 0x6100  # SW2 = number of bytes still available
CARD_LOCKED: Final = 0x6283
MORE_DATA: Final = 0x6310  # GET STATUS: more data available
NO_PRECISE_DIAGNOSIS_64: Final = 0x6400
MEMORY_FAILURE: Final = 0x6581
WRONG_LENGTH: Final = 0x6700
LOGICAL_CHANNEL_NOT_SUPPORTED: Final = 0x6881
SECURE_MESSAGING_NOT_SUPPORTED: Final = 0x6882
CHAINING_NOT_SUPPORTED: Final = 0x6884
SECURITY_STATUS_NOT_SATISFIED: Final = 0x6982
AUTHENTICATION_METHOD_BLOCKED: Final = 0x6983
CONDITIONS_NOT_SATISFIED: Final = 0x6985
WRONG_DATA: Final = 0x6A80
FUNCTION_NOT_SUPPORTED: Final = 0x6A81
FILE_NOT_FOUND: Final = 0x6A82
NOT_ENOUGH_MEMORY: Final = 0x6A84
INCORRECT_P1P2: Final = 0x6A86
REFERENCED_DATA_NOT_FOUND: Final = 0x6A88
WRONG_P1P2: Final = 0x6B00
INS_NOT_SUPPORTED: Final = 0x6D00
CLA_NOT_SUPPORTED: Final = 0x6E00
NO_PRECISE_DIAGNOSIS: Final = 0x6F00

_MEANINGS: Final[dict[int, str]] = {
    OK: "success",
    CARD_LOCKED: "card locked",
    MORE_DATA: "more data available",
    NO_PRECISE_DIAGNOSIS_64: "execution error, state unchanged",
    MEMORY_FAILURE: "memory failure",
    WRONG_LENGTH: "wrong length",
    LOGICAL_CHANNEL_NOT_SUPPORTED: "logical channel not supported",
    SECURE_MESSAGING_NOT_SUPPORTED: "secure messaging not supported",
    CHAINING_NOT_SUPPORTED: "command chaining not supported",
    SECURITY_STATUS_NOT_SATISFIED: "security status not satisfied",
    AUTHENTICATION_METHOD_BLOCKED: "authentication method blocked",
    CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    WRONG_DATA: "incorrect values in command data",
    FUNCTION_NOT_SUPPORTED: "function not supported",
    FILE_NOT_FOUND: "application or file not found",
    NOT_ENOUGH_MEMORY: "not enough memory",
    INCORRECT_P1P2: "incorrect P1 P2",
    REFERENCED_DATA_NOT_FOUND: "referenced data not found",
    WRONG_P1P2: "wrong parameters P1 P2",
    INS_NOT_SUPPORTED: "instruction not supported",
    CLA_NOT_SUPPORTED: "class not supported",
    NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
}


def is_success(sw: int) -> bool:
    """``9000`` or ``61xx`` (more response bytes available)."""
    return sw == OK or sw >> 8 == 0x61


def is_warning(sw: int) -> bool:
    """``62xx`` / ``63xx``: processed, with a warning."""
    return sw >> 8 in (0x62, 0x63)


def is_protected(sw: int) -> bool:
    """Whether an SCP03 card protects the response carrying ``sw``.

    GlobalPlatform Amendment D: R-MAC and R-ENCRYPTION apply only to ``9000``
    and warning status words (``62xx``, ``63xx``); any other status word is an
    error and comes back alone, without data and without R-MAC.
    """
    return sw == OK or is_warning(sw)


def describe(sw: int) -> str:
    """``'6A88 referenced data not found'``: for logs and error messages."""
    meaning = _MEANINGS.get(sw)
    if meaning is None:
        if sw >> 8 == 0x61:
            meaning = f"{sw & 0xFF} more bytes available"
        elif sw >> 8 == 0x6C:
            meaning = f"wrong Le, exact length is {sw & 0xFF}"
        elif sw & 0xFFF0 == 0x63C0:
            meaning = f"verification failed, {sw & 0x0F} tries left"
        else:
            meaning = "unknown status"
    return f"{sw:04X} {meaning}"
