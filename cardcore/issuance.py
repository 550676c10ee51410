"""The issuance applet's APDU interface (seed 004): one place for its constants.

The applet sits beside the issuer security domain with its own AID and
state (docs/issuance-applet.md is the reference a vendor implements). The
card, the provider system and the issuer read the same names here: the
life-cycle states, the instruction bytes, the data-object tags and the
statement the card signs to certify its own device key (claim 10).

Public keys cross the interface in the raw forms a Java Card holds
(``RSAPublicKey.getModulus``/``getExponent``, ``ECPublicKey.getW``), never
as X.509 structures; :mod:`cardcore.issuance_keys` turns them into
SubjectPublicKeyInfo on the host. Stdlib only, like :mod:`cardcore.psd`.
"""

from __future__ import annotations

import hashlib
import re
from enum import IntEnum
from typing import Final, NamedTuple

from cardcore import tlv as T
from cardcore.sw import SW

ISSUANCE_AID: Final = bytes.fromhex("F0434D5349535301")
"""The issuance applet: a proprietary AID (F0: not registered), "CMSISS", version 1."""

CLA: Final = 0x80
"""Proprietary class; 84 with secure messaging (SCP03, through the ISD's channel)."""

PROVIDER_SECURITY_LEVEL: Final = 0x33
"""Provider commands run only in a channel of this level: C-MAC, C-DEC, R-MAC, R-ENC."""

DEVICE_KEY_BITS: Final = 2048
DEVICE_KEY_EXPONENT: Final = 65537
EC_POINT_LENGTH: Final = 65
"""An uncompressed P-256 point: 04 || X || Y."""

SERIAL_PATTERN: Final = re.compile(r"^[0-9A-Z][0-9A-Z-]{0,31}$")
"""A card serial: 1 to 32 of upper-case letters, digits and '-', assigned by the provider."""

MAX_CERTIFICATE: Final = 2048
"""Bytes of one certificate the card keeps."""

PIN_TRIES: Final = 3
"""Wrong PINs in a row before the PIN is blocked (VERIFY PIN and CHANGE PIN answer 6983)."""
PUK_TRIES: Final = 10
"""Wrong PUKs in a row before the PUK, and with it the card, is blocked for good."""
CARD_CHALLENGE_LENGTH: Final = 16
"""Bytes of the card's challenge (GET CHALLENGE): what PIN blocks and VERIFY ISSUER answer to."""
SIGN_DIGEST_LENGTH: Final = 32
"""SIGN takes a SHA-256 digest the host computed, not the message."""
SECP256K1_ORDER: Final = int(
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141", 16)
"""n of secp256k1 (SEC 2, section 2.4.1): a user private key is in [1, n - 1]."""


class LifeCycle(IntEnum):
    """The applet's life-cycle states, each transition one-way (docs/issuance-applet.md)."""

    FACTORY = 0x01
    INITIALIZED = 0x03
    PERSONALIZED = 0x07
    BLOCKED = 0x83
    TERMINATED = 0xFF


class IssuanceIns(IntEnum):
    """Instructions of the applet (CLA 80/84).

    INITIALIZE UPDATE (50) and EXTERNAL AUTHENTICATE (82) reach the applet too:
    it hands them to the ISD's secure channel, as a GlobalPlatform applet does
    with ``SecureChannel.processSecurity``.
    """

    GET_DATA = 0xCA
    PUT_DATA = 0xDA
    GENERATE_KEYS = 0x46
    CERTIFY_DEVICE_KEY = 0x4A
    ACTIVATE = 0x44
    # Personalization and use (seed 004, part 2):
    PERSONALIZE = 0x54
    GET_CHALLENGE = 0x84
    SET_PIN = 0x56
    VERIFY_PIN = 0x20
    CHANGE_PIN = 0x24
    UNBLOCK_PIN = 0x2C
    SIGN = 0x2A
    AUTHENTICATE = 0x88
    VERIFY_ISSUER = 0x86


PIN_INS: Final = frozenset({IssuanceIns.SET_PIN, IssuanceIns.VERIFY_PIN, IssuanceIns.CHANGE_PIN,
                            IssuanceIns.UNBLOCK_PIN, IssuanceIns.SIGN})
"""The commands of the PIN and the key behind it: a blocked card answers them 6983."""


class Tag(IntEnum):
    """Data objects: GET DATA / PUT DATA take the tag in P1-P2."""

    ALL = 0xDF00
    """GET DATA only: every public object below that the card holds, as one TLV list."""
    LIFE_CYCLE = 0xDF01
    SERIAL = 0xDF02
    DEVICE_PUBLIC_KEY = 0xDF03
    """Value: 81 modulus, 82 public exponent."""
    ISSUER_AUTH_PUBLIC_KEY = 0xDF04
    """Value: 86 uncompressed P-256 point."""
    ISSUER_PUBLIC_KEY = 0xDF05
    """Value: 86 uncompressed P-256 point; written once."""
    DEVICE_CERTIFICATE = 0xDF06
    ISSUER_AUTH_CERTIFICATE = 0xDF07
    SIGNED_DEVICE_KEY = 0xDF08
    """The card's ECDSA-SHA256 signature (DER) over :func:`device_key_statement`."""


TAG_MODULUS: Final = 0x81
TAG_EXPONENT: Final = 0x82
TAG_POINT: Final = 0x86

PUT_DATA_TAGS: Final = frozenset({Tag.SERIAL, Tag.ISSUER_PUBLIC_KEY, Tag.DEVICE_CERTIFICATE,
                                  Tag.ISSUER_AUTH_CERTIFICATE})


class IssuanceError(ValueError):
    """A malformed object of the issuance applet's interface."""


class RsaPublic(NamedTuple):
    modulus: bytes
    exponent: bytes


def encode_rsa_public(key: RsaPublic) -> bytes:
    return T.tlv(TAG_MODULUS, key.modulus) + T.tlv(TAG_EXPONENT, key.exponent)


def decode_rsa_public(value: bytes) -> RsaPublic:
    try:
        items = {t.tag: t.value for t in T.parse_tlvs(value)}
    except T.TlvError as exc:
        raise IssuanceError(f"device public key: {exc}") from exc
    if set(items) != {TAG_MODULUS, TAG_EXPONENT}:
        raise IssuanceError("device public key: expected a modulus (81) and an exponent (82)")
    return RsaPublic(items[TAG_MODULUS], items[TAG_EXPONENT])


def encode_ec_public(point: bytes) -> bytes:
    return T.tlv(TAG_POINT, point)


def decode_ec_public(value: bytes) -> bytes:
    try:
        items = T.parse_tlvs(value)
    except T.TlvError as exc:
        raise IssuanceError(f"EC public key: {exc}") from exc
    if len(items) != 1 or items[0].tag != TAG_POINT or len(items[0].value) != EC_POINT_LENGTH \
            or items[0].value[0] != 0x04:
        raise IssuanceError("EC public key: expected one uncompressed P-256 point (86)")
    return items[0].value


def check_serial(serial: str) -> str:
    if not isinstance(serial, str) or not SERIAL_PATTERN.match(serial):
        raise IssuanceError(f"card serial {serial!r}: 1-32 of A-Z, 0-9 and '-', "
                            "starting with a letter or digit")
    return serial


def device_key_statement(serial: str, device_key: RsaPublic) -> bytes:
    """What the card signs with its private issuer authentication key (claim 10).

    Its serial and its device public key, as the two data objects GET DATA
    returns, so the statement can be rebuilt from public reads and cannot be
    moved to another card.
    """
    return T.tlv(Tag.SERIAL, check_serial(serial).encode("ascii")) + \
        T.tlv(Tag.DEVICE_PUBLIC_KEY, encode_rsa_public(device_key))


class CardData(NamedTuple):
    """What GET DATA DF00 returns, decoded; absent objects are None."""

    life_cycle: LifeCycle
    serial: str | None = None
    device_public_key: RsaPublic | None = None
    issuer_auth_public_key: bytes | None = None
    issuer_public_key: bytes | None = None
    device_certificate: bytes | None = None
    issuer_auth_certificate: bytes | None = None
    signed_device_key: bytes | None = None


def decode_card_data(data: bytes) -> CardData:
    """Decode the answer to GET DATA DF00 (IssuanceError when malformed)."""
    try:
        items = T.parse_tlvs(data)
    except T.TlvError as exc:
        raise IssuanceError(f"card data: {exc}") from exc
    seen: dict[int, bytes] = {}
    for item in items:
        if item.tag in seen:
            raise IssuanceError(f"card data: tag {item.tag:04X} twice")
        seen[item.tag] = item.value
    if Tag.LIFE_CYCLE not in seen or len(seen[Tag.LIFE_CYCLE]) != 1:
        raise IssuanceError("card data: no life-cycle state")
    try:
        life_cycle = LifeCycle(seen[Tag.LIFE_CYCLE][0])
    except ValueError as exc:
        raise IssuanceError(f"card data: unknown life cycle {seen[Tag.LIFE_CYCLE].hex()}") from exc
    serial = seen.get(Tag.SERIAL)
    device = seen.get(Tag.DEVICE_PUBLIC_KEY)
    iak = seen.get(Tag.ISSUER_AUTH_PUBLIC_KEY)
    issuer = seen.get(Tag.ISSUER_PUBLIC_KEY)
    try:
        serial_text = check_serial(serial.decode("ascii")) if serial is not None else None
    except UnicodeDecodeError as exc:
        raise IssuanceError("card data: serial is not ASCII") from exc
    return CardData(
        life_cycle=life_cycle,
        serial=serial_text,
        device_public_key=decode_rsa_public(device) if device is not None else None,
        issuer_auth_public_key=decode_ec_public(iak) if iak is not None else None,
        issuer_public_key=decode_ec_public(issuer) if issuer is not None else None,
        device_certificate=seen.get(Tag.DEVICE_CERTIFICATE),
        issuer_auth_certificate=seen.get(Tag.ISSUER_AUTH_CERTIFICATE),
        signed_device_key=seen.get(Tag.SIGNED_DEVICE_KEY),
    )


class GeneratedKeys(NamedTuple):
    """The answer to GENERATE KEYS: the two new public keys."""

    device_public_key: RsaPublic
    issuer_auth_public_key: bytes


def encode_generated_keys(keys: GeneratedKeys) -> bytes:
    return T.tlv(Tag.DEVICE_PUBLIC_KEY, encode_rsa_public(keys.device_public_key)) + \
        T.tlv(Tag.ISSUER_AUTH_PUBLIC_KEY, encode_ec_public(keys.issuer_auth_public_key))


def decode_generated_keys(data: bytes) -> GeneratedKeys:
    try:
        items = {t.tag: t.value for t in T.parse_tlvs(data)}
    except T.TlvError as exc:
        raise IssuanceError(f"generated keys: {exc}") from exc
    if set(items) != {Tag.DEVICE_PUBLIC_KEY, Tag.ISSUER_AUTH_PUBLIC_KEY}:
        raise IssuanceError("generated keys: expected DF03 and DF04")
    return GeneratedKeys(decode_rsa_public(items[Tag.DEVICE_PUBLIC_KEY]),
                         decode_ec_public(items[Tag.ISSUER_AUTH_PUBLIC_KEY]))


LONG_TAGS: Final = frozenset({Tag.ALL, Tag.DEVICE_PUBLIC_KEY, Tag.DEVICE_CERTIFICATE,
                              Tag.ISSUER_AUTH_CERTIFICATE})
"""Objects that may not fit a short answer (256 bytes): read with an extended Le."""


def get_data(tag: int) -> bytes:
    """GET DATA (CLA 80): Le = 00, or the extended 000000 for the objects of LONG_TAGS."""
    header = bytes((CLA, IssuanceIns.GET_DATA, tag >> 8, tag & 0xFF))
    return header + (b"\x00\x00\x00" if tag in LONG_TAGS else b"\x00")


def command(ins: int, p1: int = 0, p2: int = 0, data: bytes = b"", *,
            long_answer: bool = False) -> bytes:
    """A plain command of the applet (the secure channel wraps it).

    Extended Lc and Le when the data is longer than 255 bytes or the answer
    may be longer than 256 (``long_answer``); the card announces extended
    length in its ATR.
    """
    if len(data) > 255 or long_answer:
        lc = b"\x00" + len(data).to_bytes(2, "big") if data else b"\x00"
        le = b"\x00\x00"
    else:
        lc = bytes((len(data),)) if data else b""
        le = b"\x00"
    return bytes((CLA, ins, p1, p2)) + lc + data + le


def put_data(tag: int, value: bytes) -> bytes:
    if tag not in PUT_DATA_TAGS:
        raise IssuanceError(f"PUT DATA does not write tag {tag:04X}")
    return command(IssuanceIns.PUT_DATA, tag >> 8, tag & 0xFF, value)


def generate_keys() -> bytes:
    """GENERATE KEYS: its answer (both public keys) is longer than 256 bytes."""
    return command(IssuanceIns.GENERATE_KEYS, long_answer=True)


def certify_device_key() -> bytes:
    return command(IssuanceIns.CERTIFY_DEVICE_KEY)


def activate() -> bytes:
    return command(IssuanceIns.ACTIVATE)


def personalize(payload: bytes) -> bytes:
    """PERSONALIZE: the payload of :mod:`cardcore.personalization`, in one extended APDU."""
    if not payload:
        raise IssuanceError("PERSONALIZE needs a payload")
    return command(IssuanceIns.PERSONALIZE, data=payload)


def get_challenge() -> bytes:
    """GET CHALLENGE: the card's one-time challenge for the next PIN block or VERIFY ISSUER."""
    return command(IssuanceIns.GET_CHALLENGE)


def sign(digest: bytes) -> bytes:
    """SIGN: the card signs ``digest`` (SHA-256 of the message) with the user key."""
    if len(digest) != SIGN_DIGEST_LENGTH:
        raise IssuanceError(f"SIGN takes a {SIGN_DIGEST_LENGTH}-byte SHA-256 digest")
    return command(IssuanceIns.SIGN, data=digest)


def authenticate(challenge: bytes) -> bytes:
    """AUTHENTICATE: the card signs the issuer's challenge with its issuer authentication key."""
    return command(IssuanceIns.AUTHENTICATE, data=challenge)


def verify_issuer(signature: bytes) -> bytes:
    """VERIFY ISSUER: the issuer's signature over the card's challenge (device auth key)."""
    return command(IssuanceIns.VERIFY_ISSUER, data=signature)


class PersonalizeAnswer(NamedTuple):
    """What a PERSONALIZE status word tells the bureau."""

    done: bool
    """The card is personalized by this payload (now, or by an earlier run of it)."""
    reason: str


_A = PersonalizeAnswer
PERSONALIZE_ANSWERS: Final[dict[int, PersonalizeAnswer]] = {
    SW.OK: _A(True, "personalized"),
    SW.ALREADY_EXISTS: _A(True, "already personalized by this payload"),
    SW.WRONG_DATA: _A(False, "payload malformed, or its secrets do not decrypt or parse"),
    SW.SECURITY_STATUS_NOT_SATISFIED: _A(False, "not signed by the issuer key the card holds"),
    SW.REFERENCED_DATA_NOT_FOUND: _A(False, "payload for another serial"),
    SW.REFERENCE_DATA_NOT_USABLE: _A(False, "payload for another device key"),
    SW.CONDITIONS_NOT_SATISFIED: _A(False, "card not initialized (personalized by another "
                                           "payload, blocked, or in factory), or sequence "
                                           "not above the highest the card accepted"),
    SW.WRONG_LENGTH: _A(False, "no payload"),
}
"""Each status word of PERSONALIZE (docs/issuance-applet.md): whether the card holds this
payload, and why not."""


def personalize_answer(sw: int) -> PersonalizeAnswer:
    return PERSONALIZE_ANSWERS.get(sw, PersonalizeAnswer(False, f"unexpected status {sw:04X}"))


def issuer_key_id(point: bytes) -> bytes:
    """How cards and payloads name a public issuer key: SHA-256 of its point, first 8 bytes."""
    return hashlib.sha256(point).digest()[:8]
