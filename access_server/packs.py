"""The issuer's checks on a provider's pack before its cards join the stock (seed 004, B2).

Pure functions, no I/O: the servicer hands in the bytes it received and the
roots the store trusts; the store hands in the stock's moduli inside the
import's transaction. Every refusal is a ``PackRefused`` naming the card row
(1 = the first card; 0 = the header) and the reason, and refuses the whole
pack: the issuer takes a pack as the provider signed it, or not at all.

What is checked, in this order:

1. The detached CMS signature (RFC 5652 SignedData, parsed with asn1crypto):
   one signer, found among the certificates by issuer and serial number; the
   signed attributes' content type is id-data and their message digest the
   SHA-256 of the file; the signature is ecdsa-with-SHA256 over the signed
   attributes, verified with the signer's key. The signer is a trusted root
   (the same DER) or a certificate a trusted root issued.
2. The file's shape (``cms.pack_format``) and that the header's provider id
   is the root's: a provider id is the root certificate's organization (O),
   as ``ProviderCa.CreateRoot`` writes it.
3. Each row: both certificates issued by that root (issuer name and
   signature), valid now, not a CA, for the row's key, with the row's serial
   as subject (serialNumber, else CN), keyUsage keyEncipherment for the device
   key and digitalSignature for the issuer authentication key; the signed
   device key verified with the row's issuer authentication key over
   ``cardcore.issuance.device_key_statement``; no serial or device key twice.
4. Weak keys (``weak_keys``): exponent, modulus size, the ROCA fingerprint,
   EC points off the curve; and, with the stock, shared primes by batch GCD
   across the pack and against every device key already in stock
   (``check_shared_primes``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from enum import IntEnum
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from access_server import weak_keys
from cardcore.issuance import IssuanceError, device_key_statement
from cardcore.issuance_keys import rsa_from_spki
from cms import pack_format, signed_file
from cms.pack_format import PackFormatError, PackHeader, PackRow

MAX_SIGNATURE_BYTES = signed_file.MAX_SIGNATURE_BYTES
"""A detached signature with a few certificates is a few kilobytes."""
SHOWN_PARTNERS = 5


class Refusal(IntEnum):
    """Why a pack is refused (the servicer picks the status from it)."""

    MALFORMED = 1
    BAD_SIGNATURE = 2
    UNKNOWN_ROOT = 3
    BAD_CERTIFICATE = 4
    BAD_SIGNED_DEVICE_KEY = 5
    DUPLICATE = 6
    WEAK_KEY = 7
    IN_STOCK = 8
    """A card serial or device key the stock already holds, or a pack serial taken."""


class PackRefused(ValueError):
    """The whole pack is refused: ``row`` (None: the file as a whole), the file's ``line``
    when the shape is at fault, and ``reason``."""

    def __init__(self, refusal: Refusal, reason: str, row: int | None = None,
                 line: int | None = None) -> None:
        # Worded as the shape's errors are, whatever the check.
        super().__init__(str(PackFormatError(reason, row=row, line=line)))
        self.refusal = refusal
        self.reason = reason
        self.row = row


class RootRefused(ValueError):
    """A certificate that cannot be a trusted provider root, and why."""


class Root(NamedTuple):
    """A provider root the issuer trusts."""

    provider_id: str
    fingerprint: str
    """SHA-256 of the certificate DER, hex."""
    certificate: bytes
    subject: str
    not_after: datetime


class StockCard(NamedTuple):
    """One verified card of a pack, as the stock keeps it: public material only."""

    serial: str
    position: int
    """The row (1 = the first card): with the pack's import order, the FIFO order."""
    device_public_key: bytes
    device_key_sha256: str
    modulus: bytes
    issuer_auth_public_key: bytes
    device_certificate: bytes
    issuer_auth_certificate: bytes
    signed_device_key: bytes


class VerifiedPack(NamedTuple):
    header: PackHeader
    file_sha256: str
    root: Root
    cards: list[StockCard]


# -- roots ---------------------------------------------------------------------------

def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise ValueError("not an X.509 certificate (DER)") from None


def _valid_at(cert: x509.Certificate, now: datetime) -> str | None:
    """Why ``cert`` is not valid at ``now``, or None."""
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
    return None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def check_root(der: bytes, now: datetime) -> Root:
    """The root a provider's CA certificate makes, or RootRefused saying why not."""
    try:
        cert = _load_certificate(der)
    except ValueError as exc:
        raise RootRefused(str(exc)) from None
    if not _is_ca(cert):
        raise RootRefused("not a CA certificate (basicConstraints CA is not set)")
    if cert.issuer != cert.subject or not _issued_by(cert, cert):
        raise RootRefused("not self-signed: a provider root signs its own certificate")
    invalid = _valid_at(cert, now)
    if invalid:
        raise RootRefused(f"the root certificate is {invalid}")
    organizations = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(organizations) != 1:
        raise RootRefused("the subject must carry one organization (O): the provider id")
    try:
        provider_id = pack_format.check_name("provider id", str(organizations[0].value))
    except PackFormatError as exc:
        raise RootRefused(exc.reason) from None
    return Root(provider_id, fingerprint(der), der, cert.subject.rfc4514_string(),
                cert.not_valid_after_utc)


# -- the signature -------------------------------------------------------------------

def _signer_root(signer_der: bytes, roots: Sequence[Root], now: datetime) -> Root:
    """The trusted root that is the signer, or that issued it."""
    for root in roots:
        if root.certificate == signer_der:
            return root
    signer = _load_certificate(signer_der)
    for root in roots:
        if _issued_by(signer, _load_certificate(root.certificate)):
            invalid = _valid_at(signer, now)
            if invalid:
                raise PackRefused(Refusal.BAD_SIGNATURE, f"the signer's certificate is {invalid}")
            return root
    raise PackRefused(Refusal.UNKNOWN_ROOT,
                      f"signed by {signer.subject.rfc4514_string()!r}, which is no trusted "
                      f"provider root (cms providers trust --root-cert FILE)")


def verify_signature(data: bytes, signature: bytes, roots: Sequence[Root],
                     now: datetime) -> Root:
    """The trusted root under which ``signature`` (detached CMS) signs ``data``."""
    try:
        detached = signed_file.read_detached(data, signature)
    except signed_file.SignatureError as exc:
        raise PackRefused(Refusal.BAD_SIGNATURE, str(exc)) from None
    root = _signer_root(detached.signer, roots, now)
    try:
        signed_file.verify_by(detached, _load_certificate(detached.signer))
    except signed_file.SignatureError as exc:
        raise PackRefused(Refusal.BAD_SIGNATURE, str(exc)) from None
    return root


# -- rows ----------------------------------------------------------------------------

def _subject_serial(cert: x509.Certificate) -> str | None:
    for oid in (NameOID.SERIAL_NUMBER, NameOID.COMMON_NAME):
        values = cert.subject.get_attributes_for_oid(oid)
        if values:
            return str(values[0].value)
    return None


def _spki(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def check_card_certificate(der: bytes, *, what: str, serial: str, spki: bytes, usage: str,
                           root: x509.Certificate, now: datetime, row: int) -> None:
    """One card certificate: issued by ``root`` for this card's key, with ``usage``."""
    def refuse(reason: str) -> PackRefused:
        return PackRefused(Refusal.BAD_CERTIFICATE, f"{what} certificate: {reason}", row)

    try:
        cert = _load_certificate(der)
    except ValueError as exc:
        raise refuse(str(exc)) from None
    if cert.issuer != root.subject:
        raise refuse(f"issued by {cert.issuer.rfc4514_string()!r}, not by the pack's root")
    if not _issued_by(cert, root):
        raise refuse("its signature does not verify with the root's key")
    invalid = _valid_at(cert, now)
    if invalid:
        raise refuse(invalid)
    if _is_ca(cert):
        raise refuse("is a CA certificate")
    if _subject_serial(cert) != serial:
        raise refuse(f"subject {cert.subject.rfc4514_string()!r} is not card {serial}")
    try:
        same_key = _spki(cert.public_key()) == spki
    except (ValueError, UnsupportedAlgorithm):
        same_key = False
    if not same_key:
        raise refuse("certifies another key than the row's")
    try:
        key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise refuse("has no keyUsage") from None
    if not getattr(key_usage, usage):
        raise refuse(f"keyUsage lacks {usage}")


def _weak(what: str, der: bytes, row: int) -> None:
    try:
        findings = weak_keys.check_public_key(der)
    except ValueError as exc:
        raise PackRefused(Refusal.MALFORMED, f"{what}: {exc}", row) from None
    if findings:
        raise PackRefused(Refusal.WEAK_KEY, f"{what} is weak: {findings[0].message}", row)


def check_row(row: PackRow, number: int, root: x509.Certificate, now: datetime) -> StockCard:
    """One card's keys, certificates and signed device key (shared primes aside)."""
    _weak("device public key", row.device_public_key, number)
    _weak("issuer authentication public key", row.issuer_auth_public_key, number)
    try:
        device = rsa_from_spki(row.device_public_key)
    except IssuanceError as exc:
        raise PackRefused(Refusal.MALFORMED, f"device public key: {exc}", number) from None
    issuer_auth = serialization.load_der_public_key(row.issuer_auth_public_key)
    if not isinstance(issuer_auth, ec.EllipticCurvePublicKey):
        raise PackRefused(Refusal.MALFORMED, "issuer authentication key is not an EC key",
                          number)
    device_spki = _spki(rsa.RSAPublicNumbers(int.from_bytes(device.exponent, "big"),
                                             int.from_bytes(device.modulus, "big")).public_key())
    if device_spki != row.device_public_key:
        raise PackRefused(Refusal.MALFORMED, "device public key is not DER", number)
    check_card_certificate(row.device_certificate, what="device", serial=row.serial,
                           spki=row.device_public_key, usage="key_encipherment", root=root,
                           now=now, row=number)
    check_card_certificate(row.issuer_auth_certificate, what="issuer authentication",
                           serial=row.serial, spki=_spki(issuer_auth),
                           usage="digital_signature", root=root, now=now, row=number)
    try:
        issuer_auth.verify(row.signed_device_key, device_key_statement(row.serial, device),
                           ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        raise PackRefused(Refusal.BAD_SIGNED_DEVICE_KEY,
                          "the signed device key does not verify with the card's issuer "
                          "authentication key", number) from None
    return StockCard(row.serial, number, row.device_public_key,
                     fingerprint(row.device_public_key), device.modulus,
                     row.issuer_auth_public_key, row.device_certificate,
                     row.issuer_auth_certificate, row.signed_device_key)


def _no_repeats(cards: Sequence[StockCard]) -> None:
    serials: dict[str, int] = {}
    keys: dict[str, int] = {}
    for card in cards:
        if card.serial in serials:
            raise PackRefused(Refusal.DUPLICATE, f"card serial {card.serial} is also row "
                              f"{serials[card.serial]}", card.position)
        if card.device_key_sha256 in keys:
            raise PackRefused(Refusal.DUPLICATE, f"device key is also row "
                              f"{keys[card.device_key_sha256]}'s", card.position)
        serials[card.serial] = card.position
        keys[card.device_key_sha256] = card.position


def verify_pack(data: bytes, signature: bytes, roots: Sequence[Root],
                now: datetime) -> VerifiedPack:
    """Every check of a pack but those against the stock (module docstring, 1 to 4)."""
    root = verify_signature(data, signature, roots, now)
    try:
        pack = pack_format.read_pack(data)
    except PackFormatError as exc:
        raise PackRefused(Refusal.MALFORMED, exc.reason, exc.row, exc.line) from None
    if pack.header.provider_id != root.provider_id:
        raise PackRefused(Refusal.UNKNOWN_ROOT,
                          f"provider id {pack.header.provider_id} is not the signing root's "
                          f"({root.provider_id})", 0)
    root_cert = _load_certificate(root.certificate)
    cards = [check_row(row, number, root_cert, now)
             for number, row in enumerate(pack.rows, start=1)]
    _no_repeats(cards)
    return VerifiedPack(pack.header, hashlib.sha256(data).hexdigest(), root, cards)


def check_shared_primes(cards: Sequence[StockCard], stock: Sequence[tuple[str, bytes]]) -> None:
    """Batch GCD across the pack and against the stock's moduli ((serial, modulus) pairs).

    The stock's product is recomputed at each import, inside its transaction:
    with gmpy2 that costs less than the pack's own batch GCD, and a cached
    product would have to follow every other writer of the stock.
    """
    moduli = [int.from_bytes(c.modulus, "big") for c in cards]
    stock_moduli = [int.from_bytes(m, "big") for _, m in stock]
    for found in weak_keys.check_against_stock(moduli, stock_moduli):
        if not found.shared:
            continue
        card = cards[found.index]
        partners = [f"row {cards[i].position}" for i in found.partners]
        partners += [f"card {stock[i][0]} in stock" for i in found.stock_partners]
        shown = ", ".join(partners[:SHOWN_PARTNERS]) or "another key"
        raise PackRefused(Refusal.WEAK_KEY, f"device key shares a prime factor with {shown} "
                          "(batch GCD): both are factorable", card.position)
