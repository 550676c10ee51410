"""Keys and certificates the provider tests hold in files: the issuer's, made here."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


class IssuerFiles(NamedTuple):
    certificate: Path      # RSA certificate the pack is sealed to
    private_key: Path      # its private key, PEM (the test's own recipient key)
    public_key: Path       # the issuer's P-256 public key injected into cards, PEM


def self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))


def issuer_files(directory: Path) -> IssuerFiles:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = directory / "issuer.pem"
    cert.write_bytes(self_signed(rsa_key, "issuer").public_bytes(PEM))
    key = directory / "issuer.key"
    key.write_bytes(rsa_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public = directory / "issuer-key.pem"
    public.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return IssuerFiles(cert, key, public)
