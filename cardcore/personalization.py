"""The personalization payload (seed 004, B3-B4): what the issuer HSM seals to one card.

One constant, one place: the issuer HSM builds this payload, the bureau and
the user's own PC carry it, the card checks it (docs/issuance-applet.md,
PERSONALIZE). Its binding follows GSMA SGP.22's bound profile packages:
what the issuer signs names the card (serial and the fingerprint of its
device key), the transaction (an issuance id and a per-card sequence
number), the signing key (issuer key id) and the ciphertext, so a payload
cannot be moved to another card, replayed, re-ordered or cut.

Layout, version 1 (every field present, in this order, nothing after)::

    01                                   version
    C1 len  serial (ASCII)               the card's serial
    C2 20   device key fingerprint        SHA-256 of the device public key's DF03 value
    C3 10   issuance id                   16 random bytes, one per issuance
    C4 04   sequence                      per card, big-endian; strictly above the last
    C5 08   issuer key id                 cardcore.issuance.issuer_key_id of the key
    C6 len  ciphertext                    RSA-OAEP (SHA-1, MGF1-SHA1, no label) to the
                                          card's device key, of the secret bundle
    C7 len  signature                     ECDSA-SHA256 (DER) by the private issuer key
                                          over every byte before C7

Secret bundle (the plaintext inside C6)::

    D1 20   user private key              secp256k1 scalar (BIP32 child key)
    D2 41   public device authentication key   uncompressed P-256 point
    [D3 len PIN  D4 len PUK]              when the issuer HSM makes them (claim 8)

OAEP with SHA-1 because that is what Java Card's ``ALG_RSA_PKCS1_OAEP``
and SoftHSM offer; the bundle (at most ~140 bytes) fits one block of a
2048-bit key (214 bytes). Stdlib only: the card agent reads payloads too.
"""

from __future__ import annotations

import hashlib
from typing import Final, NamedTuple

from cardcore import tlv as T
from cardcore.issuance import RsaPublic, check_serial, encode_rsa_public

VERSION: Final = 0x01
TAG_SERIAL: Final = 0xC1
TAG_DEVICE_KEY_FINGERPRINT: Final = 0xC2
TAG_ISSUANCE_ID: Final = 0xC3
TAG_SEQUENCE: Final = 0xC4
TAG_ISSUER_KEY_ID: Final = 0xC5
TAG_CIPHERTEXT: Final = 0xC6
TAG_SIGNATURE: Final = 0xC7
SIGNED_TAGS: Final = (TAG_SERIAL, TAG_DEVICE_KEY_FINGERPRINT, TAG_ISSUANCE_ID, TAG_SEQUENCE,
                      TAG_ISSUER_KEY_ID, TAG_CIPHERTEXT)

TAG_USER_KEY: Final = 0xD1
TAG_DEVICE_AUTH_KEY: Final = 0xD2
TAG_PIN: Final = 0xD3
TAG_PUK: Final = 0xD4

ISSUANCE_ID_LENGTH: Final = 16
MAX_SEQUENCE: Final = 0xFFFFFFFF
MAX_PAYLOAD: Final = 1024
PIN_LENGTHS: Final = range(4, 13)
"""PIN and PUK: 4 to 12 ASCII digits."""


class PayloadError(ValueError):
    """A payload that does not parse; the card answers 6A80 and changes nothing."""


class Binding(NamedTuple):
    """What a payload is bound to, signed with its ciphertext."""

    serial: str
    device_key_fingerprint: bytes
    issuance_id: bytes
    sequence: int
    issuer_key_id: bytes


class Payload(NamedTuple):
    binding: Binding
    ciphertext: bytes
    signature: bytes
    signed: bytes
    """The bytes the signature covers (version through C6)."""


class SecretBundle(NamedTuple):
    user_private_key: bytes
    device_auth_public_key: bytes
    pin: bytes | None = None
    puk: bytes | None = None


def device_key_fingerprint(device_key: RsaPublic) -> bytes:
    """SHA-256 of the device public key as the card holds it (GET DATA DF03's value)."""
    return hashlib.sha256(encode_rsa_public(device_key)).digest()


def signed_part(binding: Binding, ciphertext: bytes) -> bytes:
    """The bytes the issuer signs: version, the binding and the ciphertext."""
    if len(binding.device_key_fingerprint) != 32 or \
            len(binding.issuance_id) != ISSUANCE_ID_LENGTH or \
            len(binding.issuer_key_id) != 8 or not 0 < binding.sequence <= MAX_SEQUENCE:
        raise PayloadError("binding of the wrong shape")
    return bytes((VERSION,)) + b"".join((
        T.tlv(TAG_SERIAL, check_serial(binding.serial).encode("ascii")),
        T.tlv(TAG_DEVICE_KEY_FINGERPRINT, binding.device_key_fingerprint),
        T.tlv(TAG_ISSUANCE_ID, binding.issuance_id),
        T.tlv(TAG_SEQUENCE, binding.sequence.to_bytes(4, "big")),
        T.tlv(TAG_ISSUER_KEY_ID, binding.issuer_key_id),
        T.tlv(TAG_CIPHERTEXT, ciphertext),
    ))


def encode_payload(signed: bytes, signature: bytes) -> bytes:
    return signed + T.tlv(TAG_SIGNATURE, signature)


def decode_payload(data: bytes) -> Payload:
    """Parse a payload: every field, in order, nothing after (PayloadError otherwise)."""
    if len(data) > MAX_PAYLOAD:
        raise PayloadError(f"payload of {len(data)} bytes, more than {MAX_PAYLOAD}")
    if not data or data[0] != VERSION:
        raise PayloadError(f"payload version {data[:1].hex() or 'missing'}, expected 01")
    try:
        items = T.parse_tlvs(data[1:])
    except T.TlvError as exc:
        raise PayloadError(f"payload: {exc}") from exc
    tags = tuple(item.tag for item in items)
    if tags != (*SIGNED_TAGS, TAG_SIGNATURE):
        raise PayloadError("payload fields missing, repeated or out of order")
    values = [item.value for item in items]
    try:
        serial = check_serial(values[0].decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise PayloadError("payload serial malformed") from exc
    if len(values[3]) != 4:
        raise PayloadError("payload sequence is not 4 bytes")
    binding = Binding(serial, values[1], values[2], int.from_bytes(values[3], "big"), values[4])
    signed = data[:len(data) - len(T.tlv(TAG_SIGNATURE, values[6]))]
    if signed_part(binding, values[5]) != signed:
        raise PayloadError("payload fields of the wrong shape")
    return Payload(binding, values[5], values[6], signed)


def _check_code(name: str, code: bytes) -> bytes:
    if len(code) not in PIN_LENGTHS or not code.isdigit():
        raise PayloadError(f"{name}: 4 to 12 digits")
    return code


def encode_bundle(bundle: SecretBundle) -> bytes:
    if len(bundle.user_private_key) != 32 or len(bundle.device_auth_public_key) != 65:
        raise PayloadError("bundle keys of the wrong length")
    parts = [T.tlv(TAG_USER_KEY, bundle.user_private_key),
             T.tlv(TAG_DEVICE_AUTH_KEY, bundle.device_auth_public_key)]
    if (bundle.pin is None) != (bundle.puk is None):
        raise PayloadError("PIN and PUK come together")
    if bundle.pin is not None and bundle.puk is not None:
        parts += [T.tlv(TAG_PIN, _check_code("PIN", bundle.pin)),
                  T.tlv(TAG_PUK, _check_code("PUK", bundle.puk))]
    return b"".join(parts)


def decode_bundle(data: bytes) -> SecretBundle:
    try:
        items = T.parse_tlvs(data)
    except T.TlvError as exc:
        raise PayloadError(f"bundle: {exc}") from exc
    tags = tuple(item.tag for item in items)
    if tags not in ((TAG_USER_KEY, TAG_DEVICE_AUTH_KEY),
                    (TAG_USER_KEY, TAG_DEVICE_AUTH_KEY, TAG_PIN, TAG_PUK)):
        raise PayloadError("bundle fields missing, repeated or out of order")
    values = [item.value for item in items]
    if len(values[0]) != 32 or len(values[1]) != 65 or values[1][0] != 0x04:
        raise PayloadError("bundle keys of the wrong length")
    pin = _check_code("PIN", values[2]) if len(values) == 4 else None
    puk = _check_code("PUK", values[3]) if len(values) == 4 else None
    return SecretBundle(values[0], values[1], pin, puk)


# Mutual authentication after issuance (claims 13 and 14) ----------------------

CHALLENGE_LENGTHS: Final = range(16, 65)
_CARD_AUTH: Final = b"cms card authentication v1"
_ISSUER_AUTH: Final = b"cms issuer authentication v1"


def _statement(context: bytes, serial: str, challenge: bytes) -> bytes:
    if len(challenge) not in CHALLENGE_LENGTHS:
        raise PayloadError("a challenge is 16 to 64 bytes")
    return T.tlv(0xC0, context) + T.tlv(TAG_SERIAL, check_serial(serial).encode("ascii")) + \
        T.tlv(0xC8, challenge)


def card_auth_statement(serial: str, challenge: bytes) -> bytes:
    """What the card signs with its private issuer authentication key for AUTHENTICATE
    (claim 13): the issuer's challenge, bound to the card's serial and to this purpose."""
    return _statement(_CARD_AUTH, serial, challenge)


def issuer_auth_statement(serial: str, challenge: bytes) -> bytes:
    """What the issuer signs with the card's private device authentication key for
    VERIFY ISSUER (claim 14): the card's challenge, bound to its serial and this purpose.

    The two contexts differ, so neither side's signature serves as the other's.
    """
    return _statement(_ISSUER_AUTH, serial, challenge)
