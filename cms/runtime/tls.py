"""Mutual TLS for gRPC: credentials from PEM files and the caller's identity.

Identities are carried in a URI SAN (``spiffe://cms/<name>``, see cms.pki). gRPC
core negotiates TLS 1.3 with every client we ship (Python grpcio, Node
grpc-js); grpcio has no server-side minimum-version setting, which
docs/threat-model.md records.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from cms.pki import identity_from_uri


class TlsConfigError(Exception):
    """Certificate or key files that are missing or unreadable."""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a CA bundle and one identity's certificate and key."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def read(self) -> tuple[bytes, bytes | None, bytes | None]:
        def load(path: Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise TlsConfigError(f"cannot read {what} {path}: {exc.strerror}") from None

        ca = load(self.ca, "CA certificate")
        assert ca is not None
        return ca, load(self.cert, "certificate"), load(self.key, "private key")


def server_credentials(
    files: TlsFiles, *, require_client_auth: bool = True
) -> grpc.ServerCredentials:
    ca, cert, key = files.read()
    if cert is None or key is None:
        raise TlsConfigError("a server needs a certificate and a private key")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_auth
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def secure_channel(target: str, files: TlsFiles, *, options: list[tuple[str, object]] | None = None,
                   server_name: str | None = None) -> grpc.Channel:
    """A channel to ``target`` authenticated by ``files`` (mutual TLS when cert/key are set)."""
    opts: list[tuple[str, object]] = list(options or [])
    opts += [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, channel_credentials(files), options=opts)


_identity_cache: dict[bytes, str | None] = {}
_identity_lock = threading.Lock()


def _identity_from_pem(pem: bytes) -> str | None:
    with _identity_lock:
        if pem in _identity_cache:
            return _identity_cache[pem]
    from cryptography import x509

    from cms.pki import certificate_identity

    try:
        identity = certificate_identity(x509.load_pem_x509_certificate(pem))
    except ValueError:
        identity = None
    with _identity_lock:
        if len(_identity_cache) > 4096:
            _identity_cache.clear()
        _identity_cache[pem] = identity
    return identity


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The verified caller identity of an RPC, or None without a usable client certificate.

    grpc verified the chain against our CA before the call reached us; here we
    only read the identity from the URI SAN of the leaf certificate.
    """
    auth = context.auth_context()
    for uri in auth.get("x509_subject_alternative_name", []):
        name = identity_from_uri(uri.decode() if isinstance(uri, bytes) else uri)
        if name is not None:
            return name
    pems = auth.get("x509_pem_cert")
    if pems:
        return _identity_from_pem(pems[0])
    return None


def caller(context: grpc.ServicerContext, allowed: frozenset[str], what: str) -> str:
    """The caller's identity when it may do ``what``; PermissionDenied otherwise."""
    from cms.runtime.errors import PermissionDenied

    identity = peer_identity(context)
    if identity not in allowed:
        raise PermissionDenied(f"identity {identity or '(none)'} may not {what} "
                               f"(allowed: {', '.join(sorted(allowed))})")
    return identity


def tls_from_section(section) -> TlsFiles:
    """``ca``, ``cert`` and ``key`` of a service's ``tls:`` configuration section, each
    checked to exist (a missing file is named with its configuration path)."""
    from cms.runtime.config import ConfigError

    files = TlsFiles(section.path("ca", required=True), section.path("cert", required=True),
                     section.path("key", required=True))
    for name, path in (("ca", files.ca), ("cert", files.cert), ("key", files.key)):
        if not path.is_file():
            raise ConfigError(f"{section.where}.{name}: no such file {path}")
    return files
