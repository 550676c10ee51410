"""PIN blocks of the personalized card (seed 004, B4-B5): PIN and PUK never cross the reader
in clear, and an encrypted block cannot be replayed.

Every command that carries a PIN or a PUK (SET PIN, VERIFY PIN, CHANGE PIN, UNBLOCK PIN)
carries one block, exactly 256 bytes::

    RSA-OAEP (SHA-1, MGF1-SHA1, no label) to the card's device public key of
        card challenge (16 bytes)  ||  the command's TLVs, in this order:

    SET PIN      D3 PIN          D4 PUK
    VERIFY PIN   D3 PIN
    CHANGE PIN   D3 current PIN  D5 new PIN
    UNBLOCK PIN  D4 PUK          D5 new PIN

The card challenge is the card's answer to GET CHALLENGE in this session;
the card uses it up with the next command that carries a block (or VERIFY
ISSUER), whatever it answers, so a block recorded on the reader is worthless
afterwards, and only the card can open one. It is the cipher of the
personalization payload (one ``ALG_RSA_PKCS1_OAEP`` on a Java Card) and
the tags of its secret bundle (:mod:`cardcore.personalization`), so the
card parses both the same way.

The host side (the bureau setting the PIN and PUK it made, the user's PC
verifying the PIN) encrypts with :func:`seal`; the card decodes with
:func:`decode_pin_block`. On ``cryptography``, like :mod:`cardcore.issuance_keys`.
"""

from __future__ import annotations

from typing import Final, NamedTuple

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cardcore import tlv as T
from cardcore.issuance import (
    CARD_CHALLENGE_LENGTH,
    DEVICE_KEY_BITS,
    IssuanceIns,
    RsaPublic,
    command,
)
from cardcore.issuance_keys import rsa_spki
from cardcore.personalization import PIN_LENGTHS, TAG_PIN, TAG_PUK

TAG_NEW_PIN: Final = 0xD5
BLOCK_LENGTH: Final = DEVICE_KEY_BITS // 8
"""Bytes of a PIN block on the wire: one RSA-2048 ciphertext."""

LAYOUTS: Final[dict[int, tuple[int, ...]]] = {
    IssuanceIns.SET_PIN: (TAG_PIN, TAG_PUK),
    IssuanceIns.VERIFY_PIN: (TAG_PIN,),
    IssuanceIns.CHANGE_PIN: (TAG_PIN, TAG_NEW_PIN),
    IssuanceIns.UNBLOCK_PIN: (TAG_PUK, TAG_NEW_PIN),
}
"""The TLVs after the challenge, by the instruction that carries the block."""


class PinBlockError(ValueError):
    """A PIN block that does not parse, or codes of the wrong shape (the card answers 6A80)."""


class PinBlock(NamedTuple):
    """A block in clear: the card's challenge and the codes its command carries."""

    challenge: bytes
    pin: bytes | None = None
    puk: bytes | None = None
    new_pin: bytes | None = None

    def codes(self) -> dict[int, bytes | None]:
        return {TAG_PIN: self.pin, TAG_PUK: self.puk, TAG_NEW_PIN: self.new_pin}


def check_code(code: bytes) -> bytes:
    """A PIN or a PUK: 4 to 12 ASCII digits."""
    if len(code) not in PIN_LENGTHS or not code.isdigit():
        raise PinBlockError("a PIN or PUK is 4 to 12 digits")
    return code


def encode_pin_block(ins: int, block: PinBlock) -> bytes:
    """The plaintext of ``ins``'s block: the challenge, then its codes in its order."""
    layout = LAYOUTS.get(ins)
    if layout is None:
        raise PinBlockError(f"instruction {ins:02X} carries no PIN block")
    if len(block.challenge) != CARD_CHALLENGE_LENGTH:
        raise PinBlockError(f"the card challenge is {CARD_CHALLENGE_LENGTH} bytes")
    codes = block.codes()
    if {tag for tag, code in codes.items() if code is not None} != set(layout):
        raise PinBlockError(f"instruction {ins:02X} carries the codes "
                            + " ".join(f"{tag:02X}" for tag in layout))
    return block.challenge + b"".join(T.tlv(tag, check_code(codes[tag] or b""))
                                      for tag in layout)


def decode_pin_block(ins: int, plaintext: bytes) -> PinBlock:
    """The card's side: ``ins``'s block in clear, every code in its place (PinBlockError)."""
    layout = LAYOUTS.get(ins)
    if layout is None:
        raise PinBlockError(f"instruction {ins:02X} carries no PIN block")
    challenge, rest = plaintext[:CARD_CHALLENGE_LENGTH], plaintext[CARD_CHALLENGE_LENGTH:]
    if len(challenge) != CARD_CHALLENGE_LENGTH:
        raise PinBlockError("PIN block shorter than its challenge")
    try:
        items = T.parse_tlvs(rest)
    except T.TlvError as exc:
        raise PinBlockError(f"PIN block: {exc}") from exc
    if tuple(item.tag for item in items) != layout:
        raise PinBlockError("PIN block codes missing, repeated or out of order")
    codes = {item.tag: check_code(item.value) for item in items}
    return PinBlock(challenge, codes.get(TAG_PIN), codes.get(TAG_PUK), codes.get(TAG_NEW_PIN))


# OAEP's SHA-1 is its mask and label hash, where no collision resistance is needed.
OAEP_SHA1: Final = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()),  # noqa: S303
                                algorithm=hashes.SHA1(), label=None)  # noqa: S303
"""The one RSA cipher of the card: PIN blocks and the personalization payload's secrets."""


def seal(device_key: RsaPublic, plaintext: bytes) -> bytes:
    """RSA-OAEP (SHA-1) of ``plaintext`` to the card's device public key."""
    public = serialization.load_der_public_key(rsa_spki(device_key))
    assert isinstance(public, rsa.RSAPublicKey)
    return public.encrypt(plaintext, OAEP_SHA1)


def pin_command(ins: int, device_key: RsaPublic, block: PinBlock) -> bytes:
    """The APDU of ``ins`` carrying ``block`` sealed to the card (extended Lc: 256 bytes)."""
    return command(ins, data=seal(device_key, encode_pin_block(ins, block)))


def set_pin(device_key: RsaPublic, challenge: bytes, pin: bytes, puk: bytes) -> bytes:
    """SET PIN: the bureau's PIN and PUK (claim 5), on a card personalized without them."""
    return pin_command(IssuanceIns.SET_PIN, device_key, PinBlock(challenge, pin=pin, puk=puk))


def verify_pin(device_key: RsaPublic, challenge: bytes, pin: bytes) -> bytes:
    return pin_command(IssuanceIns.VERIFY_PIN, device_key, PinBlock(challenge, pin=pin))


def change_pin(device_key: RsaPublic, challenge: bytes, pin: bytes, new_pin: bytes) -> bytes:
    return pin_command(IssuanceIns.CHANGE_PIN, device_key,
                       PinBlock(challenge, pin=pin, new_pin=new_pin))


def unblock_pin(device_key: RsaPublic, challenge: bytes, puk: bytes, new_pin: bytes) -> bytes:
    return pin_command(IssuanceIns.UNBLOCK_PIN, device_key,
                       PinBlock(challenge, puk=puk, new_pin=new_pin))


def tries_left(sw: int) -> int | None:
    """The tries a wrong PIN or PUK left (``63Cx``), None for any other status word."""
    return sw & 0x0F if sw & 0xFFF0 == 0x63C0 else None
