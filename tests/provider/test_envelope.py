"""The pack's envelope opens with openssl, which we did not write, for the recipient key."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cms.envelope import EnvelopeError, KeyTransport, envelop, load_recipient
from tests.provider.keys import PEM, issuer_files, self_signed

CONTENT = b"format,version\r\ncms-device-initialization-data,1\r\n" * 40


def _decrypt(path: Path, cert: Path, key: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", "cms", "-decrypt", "-binary", "-inform", "DER",
                           "-in", str(path), "-recip", str(cert), "-inkey", str(key)],
                          capture_output=True, check=False)


@pytest.mark.parametrize("transport", list(KeyTransport))
def test_openssl_opens_the_envelope_for_the_recipient(tmp_path: Path,
                                                      transport: KeyTransport) -> None:
    files = issuer_files(tmp_path)
    sealed = tmp_path / "pack.csv.p7m"
    sealed.write_bytes(envelop(CONTENT, load_recipient(files.certificate.read_bytes()),
                               transport))
    assert CONTENT not in sealed.read_bytes()
    opened = _decrypt(sealed, files.certificate, files.private_key)
    assert opened.returncode == 0, opened.stderr.decode()
    assert opened.stdout == CONTENT


def test_another_key_cannot_open_it(tmp_path: Path) -> None:
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours, theirs = issuer_files(tmp_path / "ours"), issuer_files(tmp_path / "theirs")
    sealed = tmp_path / "x.p7m"
    sealed.write_bytes(envelop(CONTENT, load_recipient(ours.certificate.read_bytes())))
    assert _decrypt(sealed, ours.certificate, theirs.private_key).returncode != 0


def test_two_envelopes_of_one_content_differ(tmp_path: Path) -> None:
    cert = load_recipient(issuer_files(tmp_path).certificate.read_bytes())
    assert envelop(CONTENT, cert) != envelop(CONTENT, cert)      # fresh key and IV


def test_a_recipient_needs_an_rsa_certificate() -> None:
    ec_cert = self_signed(ec.generate_private_key(ec.SECP256R1()), "ec")
    with pytest.raises(EnvelopeError, match="RSA"):
        load_recipient(ec_cert.public_bytes(PEM))
    with pytest.raises(EnvelopeError, match=r"not an X\.509"):
        load_recipient(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
