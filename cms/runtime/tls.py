"""Mutual TLS for gRPC: credentials from PEM files, the caller's identity, the server's.

Identities are carried in a URI SAN (``spiffe://cms/<name>``, see cms.identity). A
server's certificate also names its identity in a DNS SAN, and every client
channel checks it (``secure_channel``'s ``server_identity``; see
``cms.identity`` for why it takes a DNS name). gRPC core negotiates TLS 1.3
with every client we ship (Python grpcio, Node grpc-js); grpcio has no
server-side minimum-version setting, which docs/threat-model.md records.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from cms.identity import (
    HSM_PROXY,
    identity_channel_options,
    identity_from_dns_name,
    identity_from_uri,
    identity_refusal,
    is_identity_refusal,
)

if TYPE_CHECKING:
    from cryptography import x509


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
    check_server_certificate(cert, files.cert)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_auth
    )


def check_server_certificate(pem: bytes, where: Path | None = None) -> str:
    """The identity a server certificate names, checked to be named twice alike.

    Clients check a server's identity by its DNS SAN and callers learn it
    from its URI SAN: a certificate whose two names disagree, or that lacks
    one, is refused here, before the server serves with it.
    """
    from cryptography import x509

    from cms.identity import identity_dns_name

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise TlsConfigError(f"cannot read the server certificate {where}: {exc}") from None
    identity = certificate_identity(cert)
    if identity is None:
        raise TlsConfigError(f"the server certificate {where} has no spiffe://cms/ URI SAN: "
                             "it names no identity")
    named = certificate_server_identities(cert)
    if named != {identity}:
        try:
            expected = identity_dns_name(identity)
        except ValueError as exc:
            raise TlsConfigError(f"the server certificate {where}: {exc}") from None
        found = ", ".join(sorted(named)) or "none"
        raise TlsConfigError(
            f"the server certificate {where} is for identity {identity} (URI SAN) and must "
            f"carry the DNS SAN {expected}, which its clients check, and no other identity's "
            f"(identities in its DNS SANs: {found}); see docs/operations.md")
    return identity


def certificate_server_identities(cert: x509.Certificate) -> set[str]:
    """The identities a certificate's DNS SANs name (``<identity>.identity.cms.internal``)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    found = (identity_from_dns_name(d) for d in san.get_values_for_type(x509.DNSName))
    return {name for name in found if name is not None}


def certificate_identity(cert: x509.Certificate) -> str | None:
    """The cms identity in a certificate's URI SAN, or None.

    Reading an identity is the runtime's job on every certificate, whichever
    CA issued it: the development PKI issues certificates, it does not define them.
    """
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        name = identity_from_uri(uri)
        if name is not None:
            return name
    return None


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def secure_channel(target: str, files: TlsFiles, *, server_identity: str = HSM_PROXY,
                   options: list[tuple[str, object]] | None = None) -> grpc.Channel:
    """A channel to ``target`` authenticated by ``files`` (mutual TLS when cert/key are set)
    that accepts only a server proving ``server_identity``.

    The default is the proxy, which the servers' own channels reach; any
    other server is named by its client (``Endpoints.channel`` does it from
    the service). A server that is not ``server_identity`` fails every call
    with UNAVAILABLE and a message saying so (``ServerIdentityError``).
    """
    opts: list[tuple[str, object]] = list(options or [])
    opts += [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        *identity_channel_options(server_identity),
    ]
    channel = grpc.secure_channel(target, channel_credentials(files), options=opts)
    return refusals_named(channel, target, server_identity)


def refusals_named(channel: grpc.Channel, target: str, identity: str) -> grpc.Channel:
    """``channel`` (made with ``identity_channel_options(identity)``), whose calls to a
    server that is not ``identity`` fail with a ``ServerIdentityError`` saying so."""
    return grpc.intercept_channel(channel, _IdentityRefusals(target, identity))


class ServerIdentityError(grpc.RpcError, grpc.Call, grpc.Future):
    """A call refused because the server's certificate names another identity.

    What gRPC core reports for it speaks of a host name ("Hostname
    Verification Check failed"); this says which identity the server failed
    to prove. It is a finished call and future, as the failures it replaces.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._message

    def initial_metadata(self) -> tuple:
        return ()

    def trailing_metadata(self) -> tuple:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> Exception:
        return self

    def traceback(self, timeout: float | None = None) -> None:
        return None

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)


class _RefusalTranslatingStream:
    """A streaming call whose identity refusal is raised as ``ServerIdentityError``."""

    def __init__(self, call: Any, translate: Callable[[grpc.RpcError], grpc.RpcError]) -> None:
        self._call = call
        self._translate = translate

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _IdentityRefusals(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Turns gRPC's host-name failure into an error that names the identity expected.

    Costs nothing on a call that succeeds but a function call; a call in
    flight (a future) is passed through as it is.
    """

    def __init__(self, target: str, identity: str) -> None:
        self._message = identity_refusal(target, identity)

    def _translate(self, exc: grpc.RpcError) -> grpc.RpcError:
        details = exc.details() if hasattr(exc, "details") else ""
        if details and is_identity_refusal(details):
            return ServerIdentityError(self._message)
        return exc

    def _unary(self, outcome: Any) -> Any:
        # A blocking call comes back finished (its failure is an RpcError); a
        # future still running is an RpcError too, and must not be waited for.
        if isinstance(outcome, grpc.RpcError) and outcome.done():
            return self._translate(outcome)
        return outcome

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return self._unary(continuation(client_call_details, request))

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return self._unary(continuation(client_call_details, request_iterator))

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return _RefusalTranslatingStream(continuation(client_call_details, request),
                                         self._translate)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return _RefusalTranslatingStream(continuation(client_call_details, request_iterator),
                                         self._translate)


_identity_cache: dict[bytes, str | None] = {}
_identity_lock = threading.Lock()


def _identity_from_pem(pem: bytes) -> str | None:
    with _identity_lock:
        if pem in _identity_cache:
            return _identity_cache[pem]
    from cryptography import x509

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
