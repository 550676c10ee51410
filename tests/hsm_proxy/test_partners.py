"""BureauHsm and MailerHsm on a real proxy under the default policy of ``cms dev up``
(the issuer's proxy of ``tests.support.issuer``: every token).

The bureau makes its key once in token ``bureau`` (ALREADY_EXISTS after); its
certificate is read back by ``openssl x509`` and a file signature checked by
``openssl cms -verify`` with that certificate, and refused for a changed
byte; the access server's own check of a bureau (``check_bureau``) takes the
certificate. The mailer makes its key in token ``mailer``; mailer data made as
the issuer HSM makes it (RSA-OAEP SHA-1 to that key) opens to PIN and PUK.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from access_server.issuance_service import check_bureau
from cardcore.apdu import parse_command
from cardcore.issuance import IssuanceIns
from cardcore.pin_block import decode_pin_block
from cms import keynames
from cms.v1 import partners_pb2 as pb
from cms.v1 import partners_pb2_grpc
from tests.support.hsm_proxy import ProxyProcess
from tests.support.issuer import issuer_proxy

pytestmark = pytest.mark.integration

TIMEOUT = 60
BUREAU, MAILER = "bureau-1", "post-1"
OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),  # noqa: S303
                         label=None)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    with issuer_proxy(tmp_path_factory.mktemp("partners")) as running:
        yield running


def bureau_hsm(proxy: ProxyProcess, identity: str = "bureau") -> partners_pb2_grpc.BureauHsmStub:
    return partners_pb2_grpc.BureauHsmStub(proxy.channel(identity))


def mailer_hsm(proxy: ProxyProcess, identity: str = "mailer") -> partners_pb2_grpc.MailerHsmStub:
    return partners_pb2_grpc.MailerHsmStub(proxy.channel(identity))


@pytest.fixture(scope="module")
def bureau(proxy: ProxyProcess) -> pb.BureauCertificate:
    return bureau_hsm(proxy).CreateBureauKey(pb.BureauKeyRequest(bureau=BUREAU),
                                             timeout=TIMEOUT)


@pytest.fixture(scope="module")
def mailer(proxy: ProxyProcess) -> pb.MailerKey:
    return mailer_hsm(proxy).CreateMailerKey(pb.MailerKeyRequest(mailer=MAILER),
                                             timeout=TIMEOUT)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          check=False)


def test_the_bureau_key_is_made_once_with_its_certificate(proxy, bureau, tmp_path) -> None:
    cert = x509.load_der_x509_certificate(bureau.certificate)
    assert cert.subject.rfc4514_string() == f"CN={BUREAU}"
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert bureau.fingerprint == hashlib.sha256(bureau.certificate).digest()
    pem = tmp_path / "bureau.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    text = openssl("x509", "-in", pem, "-noout", "-text").stdout
    assert "CA:FALSE" in text and "Digital Signature" in text
    # The issuer trusts it as it is (its name is the results files' bureau).
    assert check_bureau(bureau.certificate, datetime.now(UTC), "admin").name == BUREAU
    again = bureau_hsm(proxy).GetBureauCertificate(pb.BureauKeyRequest(bureau=BUREAU),
                                                   timeout=TIMEOUT)
    assert again.certificate == bureau.certificate
    assert bureau_hsm(proxy, "admin").GetBureauCertificate(
        pb.BureauKeyRequest(bureau=BUREAU), timeout=TIMEOUT).certificate == bureau.certificate
    with pytest.raises(grpc.RpcError) as exists:
        bureau_hsm(proxy).CreateBureauKey(pb.BureauKeyRequest(bureau=BUREAU), timeout=TIMEOUT)
    assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as missing:
        bureau_hsm(proxy).GetBureauCertificate(pb.BureauKeyRequest(bureau="nobody"),
                                               timeout=TIMEOUT)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def _verifies_with_openssl(tmp_path: Path, certificate: bytes, data: Path,
                           signature: bytes) -> None:
    """``openssl cms -verify`` takes the detached signature over ``data`` by ``certificate``,
    and refuses it over ``data`` with its last byte changed."""
    sig = tmp_path / f"{data.name}.p7s"
    sig.write_bytes(signature)
    pem = tmp_path / f"{data.name}.pem"
    pem.write_bytes(x509.load_der_x509_certificate(certificate).public_bytes(
        serialization.Encoding.PEM))
    verify = ("cms", "-verify", "-binary", "-inform", "DER", "-in", sig, "-CAfile", pem,
              "-out", os.devnull, "-content")
    good = openssl(*verify, data)
    assert good.returncode == 0, good.stderr
    changed = tmp_path / f"changed-{data.name}"
    changed.write_bytes(data.read_bytes()[:-1] + b"!")
    assert openssl(*verify, changed).returncode != 0


def test_a_bureau_file_signature_verifies_with_openssl(proxy, bureau, tmp_path) -> None:
    results = tmp_path / "results.csv"
    results.write_bytes(b"format,version\ncms-personalization-results,1\n" + os.urandom(32).hex()
                        .encode())
    signed = bureau_hsm(proxy).SignBureauFile(pb.SignBureauFileRequest(
        bureau=BUREAU, purpose="results test", sha256=hashlib.sha256(
            results.read_bytes()).digest()), timeout=TIMEOUT)
    _verifies_with_openssl(tmp_path, bureau.certificate, results, signed.signature)


def test_the_mailers_signing_key_signs_its_dispatch_files(proxy, mailer, tmp_path) -> None:
    cert = x509.load_der_x509_certificate(mailer.certificate)
    assert cert.subject.rfc4514_string() == f"CN={MAILER}"
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    pem = tmp_path / "mailer.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    text = openssl("x509", "-in", pem, "-noout", "-text").stdout
    assert "CA:FALSE" in text and "Digital Signature" in text
    again = mailer_hsm(proxy, "admin").GetMailerKey(pb.MailerKeyRequest(mailer=MAILER),
                                                    timeout=TIMEOUT)
    assert again.certificate == mailer.certificate
    dispatch = tmp_path / "dispatch.csv"
    dispatch.write_bytes(b"format,version\ncms-pin-dispatch,1\n" + os.urandom(32).hex().encode())
    signed = mailer_hsm(proxy).SignMailerFile(pb.SignMailerFileRequest(
        mailer=MAILER, purpose="dispatch test", sha256=hashlib.sha256(
            dispatch.read_bytes()).digest()), timeout=TIMEOUT)
    _verifies_with_openssl(tmp_path, mailer.certificate, dispatch, signed.signature)


def test_mailer_data_opens_to_pin_and_puk(proxy, mailer) -> None:
    public = serialization.load_der_public_key(mailer.public_key)
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048
    assert public.public_numbers().e == 65537
    assert mailer.label == keynames.partner_label(keynames.MAILER, MAILER)
    data = public.encrypt(b"4821\x0093015562", OAEP_SHA1)
    opened = mailer_hsm(proxy).OpenMailerData(pb.OpenMailerDataRequest(
        mailer=MAILER, serial="CMS-0001", mailer_data=data), timeout=TIMEOUT)
    assert (opened.pin, opened.puk) == (b"4821", b"93015562")
    assert mailer_hsm(proxy, "admin").GetMailerKey(pb.MailerKeyRequest(mailer=MAILER),
                                                   timeout=TIMEOUT).public_key == mailer.public_key


def _seal(proxy: ProxyProcess, device: rsa.RSAPrivateKey, mailer: pb.MailerKey, serial: str,
          file_serial: bytes = b"\x11" * 16, **lengths: int) -> tuple[bytes, bytes, bytes]:
    """(PIN, PUK, mailer data) of one card, read from its SET PIN block with its device key."""
    challenge = os.urandom(16)
    sealed = bureau_hsm(proxy).SealCardCodes(pb.SealCardCodesRequest(
        bureau=BUREAU, file_serial=file_serial, serial=serial,
        device_public_key=device.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        challenge=challenge, mailer_public_key=mailer.public_key, **lengths), timeout=TIMEOUT)
    command = parse_command(sealed.set_pin)
    assert command.ins == IssuanceIns.SET_PIN
    block = decode_pin_block(command.ins, device.decrypt(command.data, OAEP_SHA1))
    assert block.challenge == challenge and block.pin and block.puk
    return block.pin, block.puk, sealed.mailer_data


def test_the_bureau_codes_are_derived_per_card_and_sealed_to_card_and_mailer(
        proxy, bureau, mailer) -> None:
    device = rsa.generate_private_key(65537, 2048)
    pin, puk, data = _seal(proxy, device, mailer, "CMS-0001")
    assert (len(pin), len(puk)) == (6, 8) and pin.isdigit() and puk.isdigit()
    assert pin not in data and puk not in data
    # The same card of the same file: the same codes (a resumed batch), sealed afresh.
    again = _seal(proxy, device, mailer, "CMS-0001")
    assert again[:2] == (pin, puk) and again[2] != data
    # Another card, another file: other codes.
    assert _seal(proxy, device, mailer, "CMS-0002")[:2] != (pin, puk)
    assert _seal(proxy, device, mailer, "CMS-0001", b"\x22" * 16)[:2] != (pin, puk)
    assert [len(c) for c in _seal(proxy, device, mailer, "CMS-0003", pin_length=4,
                                  puk_length=12)[:2]] == [4, 12]
    # The mailing house opens the mailer data to the very codes the card got.
    opened = mailer_hsm(proxy).OpenMailerData(pb.OpenMailerDataRequest(
        mailer=MAILER, serial="CMS-0001", mailer_data=data), timeout=TIMEOUT)
    assert (opened.pin, opened.puk) == (pin, puk)
