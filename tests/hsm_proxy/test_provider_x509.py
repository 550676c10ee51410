"""The proxy's X.509 and CMS builders on their own, signed by a software key in the test
(the HSM signs in tests/hsm_proxy/test_provider_ca.py): the edges of serials and times,
and what each structure commits to."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from hsm_proxy import provider_x509 as px

KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
NOW = datetime(2026, 12, 2, 4, 0, tzinfo=UTC)


def sign(to_sign: px.ToSign) -> bytes:
    """What CKM_ECDSA returns for the digest: r || s, 32 bytes each."""
    r, s = decode_dss_signature(KEY.sign(to_sign.digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
    return to_sign.finish(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


@pytest.mark.parametrize("random", [b"\x00" * 16, b"\xff" * 16, bytes(range(16))])
def test_serials_are_positive_and_exactly_sixteen_bytes(random: bytes) -> None:
    serial = px.positive_serial(random)
    assert serial > 0 and serial.bit_length() == 127
    assert len(serial.to_bytes(16, "big", signed=True)) == 16


def test_a_serial_takes_sixteen_random_bytes() -> None:
    with pytest.raises(ValueError, match="16 random bytes"):
        px.positive_serial(b"\x01" * 15)


@pytest.mark.parametrize(("days", "year"), [(1, 2026), (7300, 2046), (9125, 2051)])
def test_root_validity_past_2049_is_a_generalized_time(days: int, year: int) -> None:
    der = sign(px.root_certificate(provider_id="p", spki_der=SPKI, serial=7, now=NOW,
                                   validity_days=days))
    cert = x509.load_der_x509_certificate(der)
    assert cert.not_valid_after_utc.year == year
    assert cert.not_valid_before_utc == NOW
    cert.verify_directly_issued_by(cert)
    tag = b"\x18\x0f" + str(year).encode() if year > px.UTC_TIME_LAST_YEAR else \
        b"\x17\x0d" + str(year)[2:].encode()
    assert tag in der


def test_a_card_certificate_commits_to_its_card_and_its_root() -> None:
    root = px.read_root(sign(px.root_certificate(provider_id="p", spki_der=SPKI, serial=7,
                                                 now=NOW, validity_days=100)))
    der = sign(px.card_certificate(root=root, provider_id="p", serial="C-1",
                                   use=px.ISSUER_AUTH_KEY, spki_der=SPKI,
                                   certificate_serial=99, now=NOW, validity_days=10))
    cert = x509.load_der_x509_certificate(der)
    assert cert.issuer == x509.load_der_x509_certificate(root.certificate.dump()).subject
    assert cert.serial_number == 99
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == root.key_identifier
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == x509.SubjectKeyIdentifier.from_public_key(KEY.public_key()).digest


def test_the_pack_signature_covers_sorted_attributes_and_only_a_sha256() -> None:
    root = px.read_root(sign(px.root_certificate(provider_id="p", spki_der=SPKI, serial=7,
                                                 now=NOW, validity_days=100)))
    digest = hashlib.sha256(b"pack").digest()
    to_sign = px.pack_signature(root=root, sha256=digest, signing_time=NOW)
    assert to_sign.data[0] == 0x31                      # a SET, never a certificate body
    from asn1crypto import cms

    attributes = cms.CMSAttributes.load(to_sign.data)
    encodings = [a.dump() for a in attributes]
    assert encodings == sorted(encodings)
    assert {a["type"].native: a["values"][0].native for a in attributes} == {
        "content_type": "data", "message_digest": digest, "signing_time": NOW}
    for bad in (b"", digest[:31], digest + b"\x00"):
        with pytest.raises(ValueError, match="SHA-256"):
            px.pack_signature(root=root, sha256=bad, signing_time=NOW)
