"""The X.509 certificates and CMS signatures of the provider's root, built by the proxy.

Pure functions on asn1crypto: each builds the exact structure a purpose of
``ProviderCa`` needs from checked inputs (a provider id, a card serial, a
public key, a digest), and returns the bytes the root key signs together
with a function that completes the structure from the signature. A caller
of the proxy never supplies any part of what is signed beyond those inputs:
the to-be-signed certificate (a SEQUENCE) and the CMS signed attributes (a
SET) are the proxy's, so the root key signs nothing else (RFC 5280, RFC 5652).

Signatures are ECDSA P-256 with SHA-256: the HSM returns (r, s) as two
32-byte halves (PKCS#11 CKM_ECDSA), encoded here as the DER ``Ecdsa-Sig-Value``
X.509 and CMS expect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from asn1crypto import algos, cms, keys, x509

ROOT_VALIDITY_DAYS = 7300
MAX_ROOT_VALIDITY_DAYS = 9125
CARD_VALIDITY_DAYS = 5475
SERIAL_BYTES = 16
UTC_TIME_LAST_YEAR = 2049
"""RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""

SIGNATURE_ALGORITHM = "sha256_ecdsa"
DIGEST_ALGORITHM = "sha256"


class CardKeyUse(NamedTuple):
    """One of a card's two certificates: its name and its only key usage."""

    name: str
    key_usage: str


DEVICE_KEY = CardKeyUse("device key", "key_encipherment")
ISSUER_AUTH_KEY = CardKeyUse("issuer authentication key", "digital_signature")


class ToSign(NamedTuple):
    """What the root key signs (ECDSA over its SHA-256), and how the structure is finished."""

    data: bytes
    finish: Callable[[bytes], bytes]

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()


def ecdsa_der(raw: bytes) -> bytes:
    """The DER Ecdsa-Sig-Value of a PKCS#11 ECDSA signature (r || s)."""
    return algos.DSASignature.from_p1363(raw).dump()


def positive_serial(random: bytes) -> int:
    """A positive serial of exactly ``SERIAL_BYTES`` bytes from the HSM's random bytes.

    The top bit is cleared (a DER INTEGER with it set would be negative) and
    the next one set, so the serial keeps its length: 126 random bits.
    """
    if len(random) != SERIAL_BYTES:
        raise ValueError(f"a serial takes {SERIAL_BYTES} random bytes")
    first = (random[0] & 0x3F) | 0x40
    return int.from_bytes(bytes([first]) + random[1:], "big")


def _time(moment: datetime, kind: type[x509.Time] | type[cms.Time] = x509.Time
          ) -> x509.Time | cms.Time:
    """A certificate's (or, with ``cms.Time``, a signing-time's) UTCTime or GeneralizedTime."""
    moment = moment.astimezone(UTC).replace(microsecond=0)
    if moment.year <= UTC_TIME_LAST_YEAR:
        return kind({"utc_time": moment})
    return kind({"general_time": moment})


def root_name(provider_id: str) -> x509.Name:
    """O=<provider id>, CN=<provider id> root."""
    return x509.Name.build({"organization_name": provider_id,
                            "common_name": f"{provider_id} root"})


def card_name(serial: str, provider_id: str) -> x509.Name:
    """serialNumber=<card serial>, CN=<card serial>, O=<provider id>."""
    return x509.Name.build({"serial_number": serial, "common_name": serial,
                            "organization_name": provider_id})


def key_identifier(spki: keys.PublicKeyInfo) -> bytes:
    """RFC 5280 4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING's bits."""
    return spki.sha1


def _extension(name: str, value: object, critical: bool) -> dict:
    return {"extn_id": name, "critical": critical, "extn_value": value}


def _tbs(*, serial: int, issuer: x509.Name, subject: x509.Name, spki: keys.PublicKeyInfo,
         not_before: datetime, not_after: datetime, extensions: list[dict]
         ) -> x509.TbsCertificate:
    return x509.TbsCertificate({
        "version": "v3",
        "serial_number": serial,
        "signature": {"algorithm": SIGNATURE_ALGORITHM},
        "issuer": issuer,
        "validity": {"not_before": _time(not_before), "not_after": _time(not_after)},
        "subject": subject,
        "subject_public_key_info": spki,
        "extensions": extensions,
    })


def _certificate(tbs: x509.TbsCertificate) -> ToSign:
    def finish(signature: bytes) -> bytes:
        return x509.Certificate({
            "tbs_certificate": tbs,
            "signature_algorithm": {"algorithm": SIGNATURE_ALGORITHM},
            "signature_value": ecdsa_der(signature),
        }).dump()

    return ToSign(tbs.dump(), finish)


def root_certificate(*, provider_id: str, spki_der: bytes, serial: int, now: datetime,
                     validity_days: int) -> ToSign:
    """The self-signed root: CA:TRUE pathlen 0, and keyCertSign + cRLSign + digitalSignature.

    digitalSignature because the root also signs the packs (a CMS signature
    by the root itself): without it a verifier's S/MIME signing purpose
    (``openssl cms -verify``) refuses the signer.
    """
    spki = keys.PublicKeyInfo.load(spki_der)
    name = root_name(provider_id)
    return _certificate(_tbs(
        serial=serial, issuer=name, subject=name, spki=spki, not_before=now,
        not_after=now + timedelta(days=validity_days), extensions=[
            _extension("basic_constraints", {"ca": True, "path_len_constraint": 0}, True),
            _extension("key_usage", x509.KeyUsage(
                {"digital_signature", "key_cert_sign", "crl_sign"}), True),
            _extension("key_identifier", key_identifier(spki), False),
        ]))


def issuer_certificate(*, version: int, spki_der: bytes, serial: int, now: datetime
                       ) -> ToSign:
    """The issuer key's self-signed certificate (CN=issuer key <version>); it names the
    signer of the issuer's files (CMS)."""
    return signer_certificate(common_name=f"issuer key {version}", spki_der=spki_der,
                              serial=serial, now=now)


def signer_certificate(*, common_name: str, spki_der: bytes, serial: int, now: datetime
                       ) -> ToSign:
    """A file signer's self-signed certificate (the issuer key's, a bureau's): CA:FALSE and
    digitalSignature, both critical, and nothing but the key and its name."""
    spki = keys.PublicKeyInfo.load(spki_der)
    name = x509.Name.build({"common_name": common_name})
    return _certificate(_tbs(
        serial=serial, issuer=name, subject=name, spki=spki, not_before=now,
        not_after=now + timedelta(days=ROOT_VALIDITY_DAYS), extensions=[
            _extension("basic_constraints", {"ca": False}, True),
            _extension("key_usage", x509.KeyUsage({"digital_signature"}), True),
            _extension("key_identifier", key_identifier(spki), False),
        ]))


class Root(NamedTuple):
    """What issuing under the root needs of its certificate."""

    subject: x509.Name
    key_identifier: bytes
    serial: int
    not_after: datetime
    certificate: x509.Certificate


def read_root(der: bytes) -> Root:
    cert = x509.Certificate.load(der)
    tbs = cert["tbs_certificate"]
    ski = cert.key_identifier or key_identifier(tbs["subject_public_key_info"])
    return Root(tbs["subject"], ski, tbs["serial_number"].native,
                tbs["validity"]["not_after"].native, cert)


def certificate_spki(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo DER of a certificate (to match it against its key)."""
    return x509.Certificate.load(der)["tbs_certificate"]["subject_public_key_info"].dump()


def card_certificate(*, root: Root, provider_id: str, serial: str, use: CardKeyUse,
                     spki_der: bytes, certificate_serial: int, now: datetime,
                     validity_days: int) -> ToSign:
    """An end-entity certificate of one card key, issued by the root: CA:FALSE and the
    key's one usage, both critical."""
    spki = keys.PublicKeyInfo.load(spki_der)
    return _certificate(_tbs(
        serial=certificate_serial, issuer=root.subject, subject=card_name(serial, provider_id),
        spki=spki, not_before=now, not_after=now + timedelta(days=validity_days), extensions=[
            _extension("basic_constraints", {"ca": False}, True),
            _extension("key_usage", x509.KeyUsage({use.key_usage}), True),
            _extension("key_identifier", key_identifier(spki), False),
            _extension("authority_key_identifier",
                       {"key_identifier": root.key_identifier}, False),
        ]))


def _signed_attributes(sha256: bytes, signing_time: datetime) -> cms.CMSAttributes:
    """content-type id-data, message-digest, signing-time, in DER order (a SET OF sorts
    by encoding; a verifier re-encodes the set before checking the signature)."""
    attributes = [
        cms.CMSAttribute({"type": "content_type", "values": ["data"]}),
        cms.CMSAttribute({"type": "message_digest", "values": [sha256]}),
        cms.CMSAttribute({"type": "signing_time", "values": [_time(signing_time, cms.Time)]}),
    ]
    attributes.sort(key=lambda a: a.dump())
    return cms.CMSAttributes(attributes)


def pack_signature(*, root: Root, sha256: bytes, signing_time: datetime) -> ToSign:
    """A detached CMS SignedData over content whose SHA-256 is ``sha256`` (RFC 5652 5):
    the root signs the DER SET of the signed attributes, never the digest alone."""
    if len(sha256) != hashlib.sha256().digest_size:
        raise ValueError("the message digest is a SHA-256")
    attributes = _signed_attributes(sha256, signing_time)
    to_sign = attributes.dump()

    def finish(signature: bytes) -> bytes:
        signer = cms.SignerInfo({
            "version": "v1",
            "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber(
                {"issuer": root.subject, "serial_number": root.serial})}),
            "digest_algorithm": {"algorithm": DIGEST_ALGORITHM},
            "signed_attrs": attributes,
            "signature_algorithm": {"algorithm": SIGNATURE_ALGORITHM},
            "signature": ecdsa_der(signature),
        })
        signed = cms.SignedData({
            "version": "v1",
            "digest_algorithms": [{"algorithm": DIGEST_ALGORITHM}],
            "encap_content_info": {"content_type": "data"},
            "certificates": [root.certificate],
            "signer_infos": [signer],
        })
        return cms.ContentInfo({"content_type": "signed_data", "content": signed}).dump()

    return ToSign(to_sign, finish)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def days_left(root: Root, now: datetime) -> int:
    return max(0, (root.not_after - now).days)
