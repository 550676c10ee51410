"""ISO 7816-4 and GlobalPlatform status words.

:class:`SW` is an ``IntEnum``: a member is the plain ``int`` on the wire
(``SW.OK == 0x9000``), so it compares with what a card answered, logs cheaply
and travels unchanged through protobuf ``uint32`` fields, while every part of
the system names a status word the same way. What a status word means
(``SW.describe``) and how it is classed (``SW.is_success``, ...) are read
from the class too, so one import serves the card, the host and the servers.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class SW(IntEnum):
    """The status words this system sends, expects or explains."""

    OK = 0x9000
    BYTES_REMAINING = 0x6100  # SW2 = number of bytes still available
    CARD_LOCKED = 0x6283
    MORE_DATA = 0x6310  # GET STATUS: more data available
    NO_PRECISE_DIAGNOSIS_64 = 0x6400
    MEMORY_FAILURE = 0x6581
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    CHAINING_NOT_SUPPORTED = 0x6884
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTHENTICATION_METHOD_BLOCKED = 0x6983
    REFERENCE_DATA_NOT_USABLE = 0x6984
    CONDITIONS_NOT_SATISFIED = 0x6985
    WRONG_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    NOT_ENOUGH_MEMORY = 0x6A84
    INCORRECT_P1P2 = 0x6A86
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    ALREADY_EXISTS = 0x6A89
    WRONG_P1P2 = 0x6B00
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00

    @staticmethod
    def is_success(sw: int) -> bool:
        """``9000`` or ``61xx`` (more response bytes available)."""
        return sw == SW.OK or sw >> 8 == SW.BYTES_REMAINING >> 8

    @staticmethod
    def is_warning(sw: int) -> bool:
        """``62xx`` / ``63xx``: processed, with a warning."""
        return sw >> 8 in (0x62, 0x63)

    @staticmethod
    def is_protected(sw: int) -> bool:
        """Whether an SCP03 card protects the response carrying ``sw``.

        GlobalPlatform Amendment D: R-MAC and R-ENCRYPTION apply only to ``9000``
        and warning status words (``62xx``, ``63xx``); any other status word is an
        error and comes back alone, without data and without R-MAC.
        """
        return sw == SW.OK or SW.is_warning(sw)

    @staticmethod
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


_MEANINGS: Final[dict[int, str]] = {
    SW.OK: "success",
    SW.CARD_LOCKED: "card locked",
    SW.MORE_DATA: "more data available",
    SW.NO_PRECISE_DIAGNOSIS_64: "execution error, state unchanged",
    SW.MEMORY_FAILURE: "memory failure",
    SW.WRONG_LENGTH: "wrong length",
    SW.LOGICAL_CHANNEL_NOT_SUPPORTED: "logical channel not supported",
    SW.SECURE_MESSAGING_NOT_SUPPORTED: "secure messaging not supported",
    SW.CHAINING_NOT_SUPPORTED: "command chaining not supported",
    SW.SECURITY_STATUS_NOT_SATISFIED: "security status not satisfied",
    SW.AUTHENTICATION_METHOD_BLOCKED: "authentication method blocked",
    SW.REFERENCE_DATA_NOT_USABLE: "reference data not usable",
    SW.CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW.WRONG_DATA: "incorrect values in command data",
    SW.FUNCTION_NOT_SUPPORTED: "function not supported",
    SW.FILE_NOT_FOUND: "application or file not found",
    SW.NOT_ENOUGH_MEMORY: "not enough memory",
    SW.INCORRECT_P1P2: "incorrect P1 P2",
    SW.REFERENCED_DATA_NOT_FOUND: "referenced data not found",
    SW.ALREADY_EXISTS: "already exists",
    SW.WRONG_P1P2: "wrong parameters P1 P2",
    SW.INS_NOT_SUPPORTED: "instruction not supported",
    SW.CLA_NOT_SUPPORTED: "class not supported",
    SW.NO_PRECISE_DIAGNOSIS: "no precise diagnosis",
}
