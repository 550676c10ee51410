"""Development PKI: one CA and one certificate per service identity.

Every process authenticates with an X.509 certificate whose identity is carried
in a URI SAN ``spiffe://cms/<identity>``; the proxy's policy and the servers'
authorization use that identity, never the CN. A server certificate also
carries the DNS SAN ``<identity>.identity.cms.internal`` for the same
identity, which its clients check (``cms.identity``), and is valid for
``localhost`` and ``127.0.0.1``. The identities' names live in
``cms.identity`` (no ``cryptography`` there, for the card agent) and are
re-exported here.

This is for the embedded default and tests. Production issues the same shape
of certificates from its own CA (see docs/operations.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cms.identity import (  # noqa: F401  (re-exported: the names of identities)
    CUSTODIANS,
    DEFAULT_IDENTITIES,
    IDENTITY_DNS_SUFFIX,
    SERVER_IDENTITIES,
    SPIFFE_PREFIX,
    identity_dns_name,
    identity_from_dns_name,
    identity_from_uri,
    identity_uri,
    valid_identity,
)
from cms.runtime.tls import certificate_server_identities

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
MANIFEST_FILE = "pki.json"


class PkiError(Exception):
    """A PKI directory or certificate request that cannot be honoured."""


@dataclass(frozen=True)
class IdentityFiles:
    identity: str
    cert: Path
    key: Path

    def as_dict(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by the owner only (created 0600, atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(
    common_name: str = "cms development CA",
    days: int = 3650,
    not_before: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue_identity(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    identity: str,
    *,
    server: bool,
    days: int = 825,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    extra_dns: Iterable[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a certificate for ``identity`` (URI SAN), client and optionally server auth.

    A server certificate also carries the identity's DNS name
    (``identity_dns_name``), which its clients verify. ``extra_dns`` adds host
    names, never another identity's DNS name.
    """
    if not valid_identity(identity):
        raise PkiError(f"invalid identity name {identity!r}: use letters, digits, '-', '_', '.'")
    extra = tuple(extra_dns)
    named = sorted(d for d in extra if identity_from_dns_name(d) is not None)
    if named:
        raise PkiError(f"extra DNS names {named} are identity names: a certificate names "
                       f"only its own identity, {identity!r}")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(identity))]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        try:
            dns_identity = identity_dns_name(identity)
        except ValueError as exc:
            raise PkiError(str(exc)) from None
        sans += [x509.DNSName(dns_identity), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        sans += [x509.DNSName(d) for d in extra]
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cms"),
            x509.NameAttribute(NameOID.COMMON_NAME, identity),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_identity(directory: Path, identity: str, key: ec.EllipticCurvePrivateKey,
                   cert: x509.Certificate) -> IdentityFiles:
    files = IdentityFiles(identity, directory / f"{identity}.pem", directory / f"{identity}.key")
    _write_private(files.key, _key_pem(key))
    _write_public(files.cert, cert_pem(cert))
    return files


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {directory}: run 'cms pki init --dir {directory}' first") from exc
    except ValueError as exc:
        raise PkiError(f"the CA files in {directory} cannot be read: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / CA_KEY_FILE} is not an EC private key")
    return key, cert


@dataclass(frozen=True)
class Pki:
    directory: Path
    ca: Path
    identities: dict[str, IdentityFiles]

    def identity(self, name: str) -> IdentityFiles:
        try:
            return self.identities[name]
        except KeyError:
            raise PkiError(f"no certificate for identity {name!r} in {self.directory}") from None

    def manifest(self) -> dict:
        return {
            "ca": str(self.ca),
            "identities": {n: f.as_dict() for n, f in sorted(self.identities.items())},
        }


def init_pki(directory: Path, identities: Iterable[str] = DEFAULT_IDENTITIES,
             *, extra_dns: Iterable[str] = ()) -> Pki:
    """Create (or complete) a development PKI in ``directory``.

    Existing CA and identity files are kept, so running it twice is harmless and
    certificates other processes already trust stay valid; only a server
    certificate made before servers carried their identity's DNS name is
    issued again (same CA), since no client would accept it.
    """
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if (directory / CA_FILE).exists():
        ca_key, ca_cert = load_ca(directory)
    else:
        ca_key, ca_cert = make_ca()
        _write_private(directory / CA_KEY_FILE, _key_pem(ca_key))
        _write_public(directory / CA_FILE, cert_pem(ca_cert))
    extra = tuple(extra_dns)
    issued: dict[str, IdentityFiles] = {}
    for name in identities:
        files = IdentityFiles(name, directory / f"{name}.pem", directory / f"{name}.key")
        server = name in SERVER_IDENTITIES
        if not (files.cert.exists() and files.key.exists()) or (
                server and not _names_its_identity(files.cert, name)):
            key, cert = issue_identity(ca_key, ca_cert, name, server=server,
                                       extra_dns=extra)
            files = write_identity(directory, name, key, cert)
        issued[name] = files
    pki = Pki(directory, directory / CA_FILE, issued)
    _write_public(directory / MANIFEST_FILE, json.dumps(pki.manifest(), indent=2).encode())
    return pki


def load_pki(directory: Path) -> Pki:
    directory = directory.resolve()
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except FileNotFoundError:
        raise PkiError(f"no PKI in {directory}: run 'cms pki init --dir {directory}'") from None
    ids = {
        name: IdentityFiles(name, Path(v["cert"]), Path(v["key"]))
        for name, v in manifest["identities"].items()
    }
    return Pki(directory, Path(manifest["ca"]), ids)


def _names_its_identity(cert_file: Path, identity: str) -> bool:
    """Whether the server certificate in ``cert_file`` carries ``identity``'s DNS name."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    return certificate_server_identities(cert) == {identity}
