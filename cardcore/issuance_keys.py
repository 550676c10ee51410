"""The issuance applet's raw public keys as X.509 SubjectPublicKeyInfo, and back.

The card speaks modulus, exponent and uncompressed points
(:mod:`cardcore.issuance`); certificates, packs and the issuer's checks speak
SubjectPublicKeyInfo DER. This is the one place that converts, on
``cryptography`` (so it stays out of the card agent's light install).
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore.issuance import DEVICE_KEY_BITS, DEVICE_KEY_EXPONENT, IssuanceError, RsaPublic

_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


def rsa_spki(key: RsaPublic) -> bytes:
    """SubjectPublicKeyInfo DER of a device public key as the card sends it."""
    n = int.from_bytes(key.modulus, "big")
    e = int.from_bytes(key.exponent, "big")
    try:
        public = rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        raise IssuanceError(f"device public key: {exc}") from exc
    return public.public_bytes(_DER, _SPKI)


def ec_spki(point: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of an uncompressed P-256 point (IssuanceError if off the curve)."""
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise IssuanceError(f"EC public key: not a P-256 point ({exc})") from exc
    return public.public_bytes(_DER, _SPKI)


def rsa_from_spki(der: bytes) -> RsaPublic:
    """The card's form of an RSA SubjectPublicKeyInfo (any size; callers check the shape)."""
    try:
        public = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise IssuanceError(f"not a public key: {exc}") from exc
    if not isinstance(public, rsa.RSAPublicKey):
        raise IssuanceError("not an RSA public key")
    numbers = public.public_numbers()
    return RsaPublic(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
                     numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))


def ec_point_from_spki(der: bytes) -> bytes:
    """The uncompressed point of a P-256 SubjectPublicKeyInfo."""
    try:
        public = serialization.load_der_public_key(der)
    except ValueError as exc:
        raise IssuanceError(f"not a public key: {exc}") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not isinstance(public.curve, ec.SECP256R1):
        raise IssuanceError("not a P-256 public key")
    return public.public_bytes(serialization.Encoding.X962,
                               serialization.PublicFormat.UncompressedPoint)


def check_device_key_shape(key: RsaPublic) -> None:
    """RSA-2048 with exponent 65537, the only device key the system accepts."""
    n = int.from_bytes(key.modulus, "big")
    if n.bit_length() != DEVICE_KEY_BITS:
        raise IssuanceError(f"device key of {n.bit_length()} bits, not {DEVICE_KEY_BITS}")
    if int.from_bytes(key.exponent, "big") != DEVICE_KEY_EXPONENT:
        raise IssuanceError(f"device key exponent {int.from_bytes(key.exponent, 'big')}, "
                            f"not {DEVICE_KEY_EXPONENT}")
