"""ProviderCa and IssuerKeys on a real proxy under the default policy of ``cms dev up``.

The provider's root is made once in token ``provider`` (ALREADY_EXISTS after);
its card certificates are checked by ``openssl verify`` against the root and
read back by ``openssl x509 -text``; a pack signature by ``openssl cms
-verify`` over the file, and refused for a file with one byte changed. The
issuer keys are made by admin in token ``issuer`` and read by the access server.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore.issuance import issuer_key_id
from cardcore.issuance_keys import ec_point_from_spki
from cms import keynames
from cms.v1 import provider_pb2 as pb
from cms.v1 import provider_pb2_grpc
from deploy.local import default_policy
from tests.support.hsm_proxy import REPO, ProxyEnv, ProxyProcess, write_endpoints

pytestmark = pytest.mark.integration

TIMEOUT = 60
PROVIDER_ID = "acme-cards"
_DER = serialization.Encoding.DER
_SPKI = serialization.PublicFormat.SubjectPublicKeyInfo


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    env = ProxyEnv.create(tmp_path_factory.mktemp("provider"), tokens=keynames.TOKENS,
                          policy=default_policy())
    with ProxyProcess(env) as running:
        yield running


def ca(proxy: ProxyProcess, identity: str = "provider") -> provider_pb2_grpc.ProviderCaStub:
    return provider_pb2_grpc.ProviderCaStub(proxy.channel(identity))


def issuer(proxy: ProxyProcess, identity: str = "admin") -> provider_pb2_grpc.IssuerKeysStub:
    return provider_pb2_grpc.IssuerKeysStub(proxy.channel(identity))


@pytest.fixture(scope="module")
def root(proxy: ProxyProcess) -> pb.RootCertificate:
    return ca(proxy).CreateRoot(pb.CreateRootRequest(provider_id=PROVIDER_ID),
                                timeout=TIMEOUT)


def device_key(bits: int = 2048, exponent: int = 65537) -> bytes:
    return rsa.generate_private_key(exponent, bits).public_key().public_bytes(_DER, _SPKI)


def auth_key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(_DER, _SPKI)


def card(serial: str) -> pb.CardPublicKeys:
    return pb.CardPublicKeys(serial=serial, device_public_key=device_key(),
                             issuer_auth_public_key=auth_key())


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def test_the_root_is_made_once(proxy: ProxyProcess, root: pb.RootCertificate) -> None:
    with pytest.raises(grpc.RpcError) as err:
        ca(proxy).CreateRoot(pb.CreateRootRequest(provider_id=PROVIDER_ID), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    again = ca(proxy).GetRoot(pb.GetRootRequest(provider_id=PROVIDER_ID), timeout=TIMEOUT)
    assert again.certificate == root.certificate
    assert again.fingerprint == hashlib.sha256(root.certificate).digest()
    assert ca(proxy, "admin").GetRoot(pb.GetRootRequest(provider_id=PROVIDER_ID),
                                      timeout=TIMEOUT).certificate == root.certificate


def test_get_root_of_an_unknown_provider_is_not_found(proxy: ProxyProcess) -> None:
    with pytest.raises(grpc.RpcError) as err:
        ca(proxy).GetRoot(pb.GetRootRequest(provider_id="nobody"), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_root_certificate_is_a_self_signed_ca(root: pb.RootCertificate,
                                                  tmp_path: Path) -> None:
    path = tmp_path / "root.pem"
    path.write_bytes(pem(root.certificate))
    text = openssl("x509", "-in", path, "-noout", "-text").stdout
    assert f"Issuer: O = {PROVIDER_ID}, CN = {PROVIDER_ID} root" in text
    assert f"Subject: O = {PROVIDER_ID}, CN = {PROVIDER_ID} root" in text
    assert "ecdsa-with-SHA256" in text and "prime256v1" in text
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE, pathlen:0" in text
    assert ("X509v3 Key Usage: critical\n"
            "                Digital Signature, Certificate Sign, CRL Sign") in text
    assert "X509v3 Subject Key Identifier" in text
    assert openssl("verify", "-CAfile", path, path).returncode == 0
    cert = x509.load_der_x509_certificate(root.certificate)
    assert len(cert.serial_number.to_bytes(16, "big")) == 16 and cert.serial_number > 0


def test_card_certificates_verify_against_the_root(proxy: ProxyProcess,
                                                   root: pb.RootCertificate,
                                                   tmp_path: Path) -> None:
    cards = [card("CARD-0001"), card("CARD-0002")]
    reply = ca(proxy).IssueCardCertificates(pb.IssueCardCertificatesRequest(
        provider_id=PROVIDER_ID, cards=cards), timeout=TIMEOUT)
    assert [c.serial for c in reply.certificates] == ["CARD-0001", "CARD-0002"]
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(pem(root.certificate))
    serials = set()
    for sent, got in zip(cards, reply.certificates, strict=True):
        for der, key, usage in ((got.device_certificate, sent.device_public_key,
                                 "Key Encipherment"),
                                (got.issuer_auth_certificate, sent.issuer_auth_public_key,
                                 "Digital Signature")):
            path = tmp_path / f"{got.serial}.pem"
            path.write_bytes(pem(der))
            verified = openssl("verify", "-CAfile", root_pem, path)
            assert verified.returncode == 0, verified.stderr
            text = openssl("x509", "-in", path, "-noout", "-text").stdout
            subject = next(line for line in text.splitlines() if "Subject:" in line)
            assert sorted(subject.split(":", 1)[1].strip().split(", ")) == sorted(
                [f"serialNumber = {got.serial}", f"CN = {got.serial}", f"O = {PROVIDER_ID}"])
            assert f"Issuer: O = {PROVIDER_ID}, CN = {PROVIDER_ID} root" in text
            assert "CA:FALSE" in text and f"critical\n                {usage}\n" in text
            assert "X509v3 Authority Key Identifier" in text
            cert = x509.load_der_x509_certificate(der)
            assert cert.public_key().public_bytes(_DER, _SPKI) == key
            serials.add(cert.serial_number)
    assert len(serials) == 4


def test_a_pack_signature_verifies_and_fails_on_a_changed_byte(
        proxy: ProxyProcess, root: pb.RootCertificate, tmp_path: Path) -> None:
    pack = tmp_path / "pack.csv"
    pack.write_bytes(b"# pack P-1\nserial,device\nCARD-1,abcd\n" + os.urandom(64).hex().encode())
    reply = ca(proxy).SignPack(pb.SignPackRequest(
        provider_id=PROVIDER_ID, pack_serial="P-1",
        sha256=hashlib.sha256(pack.read_bytes()).digest()), timeout=TIMEOUT)
    assert reply.signing_time.seconds > 0
    sig = tmp_path / "pack.p7s"
    sig.write_bytes(reply.signature)
    root_pem = tmp_path / "root.pem"
    root_pem.write_bytes(pem(root.certificate))
    verify = ("cms", "-verify", "-binary", "-inform", "DER", "-in", sig, "-CAfile", root_pem,
              "-out", os.devnull, "-content")
    good = openssl(*verify, pack)
    assert good.returncode == 0, good.stderr
    changed = bytearray(pack.read_bytes())
    changed[5] ^= 0x01
    other = tmp_path / "changed.csv"
    other.write_bytes(bytes(changed))
    bad = openssl(*verify, other)
    assert bad.returncode != 0
    assert "digest failure" in bad.stderr.lower() or "verification failure" in bad.stderr.lower()


def test_issuer_keys_are_made_once_and_read_by_version(proxy: ProxyProcess) -> None:
    made = issuer(proxy).CreateIssuerKey(pb.CreateIssuerKeyRequest(version=1),
                                         timeout=TIMEOUT)
    assert made.label == "issuer/1" and made.version == 1
    public = serialization.load_der_public_key(made.public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert made.key_id == issuer_key_id(ec_point_from_spki(made.public_key))
    with pytest.raises(grpc.RpcError) as err:
        issuer(proxy).CreateIssuerKey(pb.CreateIssuerKeyRequest(version=1), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    second = issuer(proxy).CreateIssuerKey(pb.CreateIssuerKeyRequest(version=2),
                                           timeout=TIMEOUT)
    assert second.public_key != made.public_key
    reader = issuer(proxy, "access-server")
    assert reader.GetIssuerKey(pb.GetIssuerKeyRequest(version=1), timeout=TIMEOUT) == made
    assert reader.GetIssuerKey(pb.GetIssuerKeyRequest(), timeout=TIMEOUT) == second
    with pytest.raises(grpc.RpcError) as err:
        reader.GetIssuerKey(pb.GetIssuerKeyRequest(version=9), timeout=TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def issuer_cli(endpoints: Path, *args: str, identity: str = "admin"
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cms.cli", "issuer", "key", "--endpoints", str(endpoints),
         "--identity", identity, *args], capture_output=True, text=True, cwd=REPO,
        timeout=120, check=False)


def test_issuer_key_commands(proxy: ProxyProcess, tmp_path: Path) -> None:
    endpoints = write_endpoints(tmp_path / "endpoints.json", proxy)
    out = tmp_path / "issuer.pem"
    made = issuer_cli(endpoints, "create", "--version", "7", "--out", str(out))
    assert made.returncode == 0, made.stderr
    public = serialization.load_pem_public_key(out.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    point = public.public_bytes(serialization.Encoding.X962,
                                serialization.PublicFormat.UncompressedPoint)
    assert f"issuer/7 version=7 key_id={issuer_key_id(point).hex()}" in made.stdout
    shown = issuer_cli(endpoints, "show", "--version", "7")
    assert shown.returncode == 0 and shown.stdout == made.stdout
    again = issuer_cli(endpoints, "create", "--version", "7")
    assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    bad = issuer_cli(endpoints, "create", "--version", "256")
    assert bad.returncode != 0 and "--version: 1 to 255" in bad.stderr
    denied = issuer_cli(endpoints, "create", "--version", "8", identity="provider")
    assert denied.returncode == 1 and "PERMISSION_DENIED" in denied.stderr


def test_each_call_writes_one_audit_record(proxy: ProxyProcess, root: pb.RootCertificate
                                           ) -> None:
    def records() -> list[dict]:
        return [json.loads(line) for line in
                proxy.env.audit_path.read_text().splitlines() if line.strip()]

    before = len(records())
    ca(proxy).IssueCardCertificates(pb.IssueCardCertificatesRequest(
        provider_id=PROVIDER_ID, cards=[card("AUDIT-1"), card("AUDIT-2"), card("AUDIT-3")]),
        timeout=TIMEOUT)
    ca(proxy).SignPack(pb.SignPackRequest(provider_id=PROVIDER_ID, pack_serial="P-AUDIT",
                                          sha256=bytes(32)), timeout=TIMEOUT)
    new = [r for r in records()[before:] if r.get("operation") != "checkpoint"]
    assert [(r["operation"], r["identity"], r["outcome"]) for r in new] == [
        ("IssueCardCertificates", "provider", "ok"), ("SignPack", "provider", "ok")]
    assert new[0]["items"] == 3 and new[0]["detail"] == "cards AUDIT-1 to AUDIT-3"
    assert new[0]["keys"] == [keynames.provider_root_label(PROVIDER_ID)]
    assert new[1]["detail"] == f"pack P-AUDIT, sha256 {bytes(32).hex()}"


def test_the_issuers_checks_accept_what_the_proxy_makes(proxy: ProxyProcess,
                                                        root: pb.RootCertificate) -> None:
    """The stock's own verification (access_server.packs) of the root, a pack signature
    and card certificates, on what ProviderCa made in the HSM."""
    from datetime import UTC, datetime

    from access_server import packs

    now = datetime.now(UTC)
    trusted = packs.check_root(root.certificate, now)
    assert trusted.provider_id == PROVIDER_ID
    data = b"a pack file's exact bytes\n"
    signed = ca(proxy).SignPack(pb.SignPackRequest(
        provider_id=PROVIDER_ID, pack_serial="P-STOCK", sha256=hashlib.sha256(data).digest()),
        timeout=TIMEOUT)
    assert packs.verify_signature(data, signed.signature, [trusted], now) == trusted
    with pytest.raises(packs.PackRefused, match="message digest differs"):
        packs.verify_signature(data + b"x", signed.signature, [trusted], now)
    sent = card("STOCK-1")
    got = ca(proxy).IssueCardCertificates(pb.IssueCardCertificatesRequest(
        provider_id=PROVIDER_ID, cards=[sent]), timeout=TIMEOUT).certificates[0]
    root_cert = x509.load_der_x509_certificate(root.certificate)
    now = datetime.now(UTC)  # after the issuing: the certificates start at the call's second
    for der, spki, usage in ((got.device_certificate, sent.device_public_key,
                              "key_encipherment"),
                             (got.issuer_auth_certificate, sent.issuer_auth_public_key,
                              "digital_signature")):
        packs.check_card_certificate(der, what=usage, serial="STOCK-1", spki=spki, usage=usage,
                                     root=root_cert, now=now, row=1)
