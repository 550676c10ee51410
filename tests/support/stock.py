"""Packs of device initialization data for the issuer's tests, and an access server to take them.

A provider root here is a software CA made with ``cryptography``, its key a
test-only P-256 key in memory: the real root lives in an HSM behind the
proxy, and the importer only checks signatures, whoever made them. Pack
signatures are made with cryptography's PKCS#7 builder (detached CMS
SignedData, RFC 5652), not with the code under test. Device keys are real
RSA-2048 keys, generated once per session (``DeviceKeys``).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from cardcore.issuance import device_key_statement
from cardcore.issuance_keys import rsa_from_spki
from cms.pack_format import PackHeader, PackRow, write_pack
from deploy.pki import Pki
from tests.support.pki import make_pki

DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
START_TIMEOUT_S = 60


def spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(DER, SPKI)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class Root(NamedTuple):
    """A provider root: its certificate and its (test-only) private key."""

    provider_id: str
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.certificate.public_bytes(DER)


def name(*, common: str, organization: str | None = None,
         serial: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common)]
    if organization is not None:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    if serial is not None:
        attrs.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
    return x509.Name(attrs)


def make_root(provider_id: str, *, ca: bool = True, days: int = 3650,
              not_before: dt.datetime | None = None, issuer: Root | None = None) -> Root:
    """A provider root CA (``issuer``: signed by another root instead of itself)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or now() - dt.timedelta(days=1)
    subject = name(common=provider_id, organization=provider_id)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.certificate.subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    signer = issuer.key if issuer else key
    return Root(provider_id, key, builder.sign(signer, hashes.SHA256()))


def _usage(*, encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not encipherment, content_commitment=False,
                         key_encipherment=encipherment, data_encipherment=False,
                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def card_certificate(root: Root, serial: str, public_key: rsa.RSAPublicKey |
                     ec.EllipticCurvePublicKey, *, encipherment: bool,
                     days: int = 3650, ca: bool = False,
                     not_before: dt.datetime | None = None) -> bytes:
    start = not_before or now() - dt.timedelta(days=1)
    return (x509.CertificateBuilder().subject_name(name(common=serial, serial=serial))
            .issuer_name(root.certificate.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_usage(encipherment=encipherment), critical=True)
            .sign(root.key, hashes.SHA256()).public_bytes(DER))


class DeviceKeys:
    """RSA-2048 device public keys, generated on demand and kept for the session."""

    def __init__(self) -> None:
        self._keys: list[rsa.RSAPublicKey] = []

    def take(self, count: int) -> list[rsa.RSAPublicKey]:
        """``count`` keys no earlier ``take`` returned."""
        while len(self._keys) < count:
            self._keys.append(rsa.generate_private_key(65537, 2048).public_key())
        taken, self._keys = self._keys[:count], self._keys[count:]
        return taken


def card_row(root: Root, serial: str, device: rsa.RSAPublicKey, *,
             certificate_root: Root | None = None) -> PackRow:
    """One card as the provider system writes it (``certificate_root``: who certifies)."""
    issuer_auth = ec.generate_private_key(ec.SECP256R1())
    device_spki = spki(device)
    signed = issuer_auth.sign(device_key_statement(serial, rsa_from_spki(device_spki)),
                              ec.ECDSA(hashes.SHA256()))
    ca = certificate_root or root
    return PackRow(serial, device_spki, spki(issuer_auth.public_key()),
                   card_certificate(ca, serial, device, encipherment=True),
                   card_certificate(ca, serial, issuer_auth.public_key(), encipherment=False),
                   signed)


def pack_bytes(pack_serial: str, provider_id: str, rows: Sequence[PackRow],
               count: int | None = None) -> bytes:
    header = PackHeader(pack_serial, provider_id, len(rows) if count is None else count,
                        now())
    if count is None:
        return write_pack(header, rows)
    # A header that disagrees with the rows: written as the provider would, then relabelled.
    real = write_pack(header._replace(card_count=len(rows)), rows)
    return real.replace(f",{len(rows)},".encode(), f",{count},".encode(), 1)


def sign(root: Root, data: bytes) -> bytes:
    """A detached CMS SignedData over ``data`` by the root key, as the provider's HSM makes it."""
    return (pkcs7.PKCS7SignatureBuilder().set_data(data)
            .add_signer(root.certificate, root.key, hashes.SHA256())
            .sign(DER, [pkcs7.PKCS7Options.DetachedSignature, pkcs7.PKCS7Options.NoCapabilities,
                        pkcs7.PKCS7Options.Binary]))


def roca_modulus(seed: int = 2017) -> int:
    """A 2048-bit modulus with the ROCA structure (Nemec et al., CCS 2017): both primes
    k*M + (65537^a mod M), M the product of the first 126 primes as for RSA-2048 keys."""
    import random

    import gmpy2

    rng = random.Random(seed)
    m = 1
    for p in [p for p in range(2, 800) if gmpy2.is_prime(p)][:126]:
        m *= p
    k_bits = 1024 - m.bit_length()

    def prime() -> int:
        while True:
            candidate = (rng.getrandbits(k_bits) | 3 << (k_bits - 2)) * m + \
                pow(65537, rng.getrandbits(64), m)
            if candidate.bit_length() == 1024 and gmpy2.is_prime(candidate):
                return candidate

    while True:
        n = prime() * prime()
        if n.bit_length() == 2048:
            return n


class Pack(NamedTuple):
    data: bytes
    signature: bytes


def make_pack(root: Root, pack_serial: str, rows: Sequence[PackRow]) -> Pack:
    data = pack_bytes(pack_serial, root.provider_id, rows)
    return Pack(data, sign(root, data))


@contextmanager
def access_server(directory: Path, database_url: str | None = None, *, pki: Pki | None = None,
                  proxy_address: str | None = None) -> Iterator[Path]:
    """An access server process over mutual TLS; no proxy unless ``proxy_address`` (the
    stock needs none; issuance does, with the proxy's ``pki``).

    Yields the endpoints.json that reaches it as any identity of a development PKI.
    """
    pki = pki or make_pki(directory / "pki")
    server = pki.identity("access-server")
    url = database_url or f"sqlite:///{directory / 'access.db'}"
    config = {"server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0"},
              "tls": {"ca": str(pki.ca), "cert": str(server.cert), "key": str(server.key)},
              "database": {"url": url}}
    if proxy_address is not None:
        config["proxy"] = {"address": proxy_address}
    path = directory / "access-server.yaml"
    path.write_text(yaml.safe_dump(config))
    ready = directory / "ready.json"
    log_path = directory / "access-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cms.cli", "access-server", "serve",
                                 "--config", str(path), "--ready-file", str(ready)],
                                stdout=log, stderr=log, cwd=directory)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        endpoints = {"tls": {"ca": str(pki.ca), "identities": {
                         n: i.as_dict() for n, i in pki.identities.items()}},
                     "services": {"access_server": json.loads(ready.read_text())}}
        out = directory / "endpoints.json"
        out.write_text(json.dumps(endpoints))
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=30)
