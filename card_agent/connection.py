"""Where the access server is and how the agent authenticates to it.

The agent reads its TLS files and endpoints.json itself rather than through
``cms.runtime.client``: that module pulls in the development PKI and with it
``cryptography``, which a user PC running only the agent does not have.
The server is always authenticated against the given CA and must prove the
access server's identity: its certificate must carry the DNS SAN
``access-server.identity.cms.internal`` (``cms.identity``), which TLS checks
instead of the host in the address. A client certificate is presented where
the deployment issues one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import grpc

from cms.identity import ACCESS_SERVER, identity_channel_options, identity_dns_name
from cms.runtime.keepalive import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS

ACCESS_SERVER_SERVICE = "access_server"
DEFAULT_IDENTITY = "card-agent"

# gRPC's own reconnect backoff grows to two minutes by default; the agent runs
# its own backoff (with jitter) and must see a restarted server promptly.
MAX_RECONNECT_BACKOFF_MS = 5_000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class AgentConfigError(Exception):
    """A configuration the agent cannot use (reported as one line, never a traceback)."""


@dataclass(frozen=True)
class ServerTarget:
    """The access server's address and the TLS files that reach it."""

    address: str
    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_identity: str = ACCESS_SERVER

    def validate(self) -> None:
        if ":" not in self.address:
            raise AgentConfigError(f"server address {self.address!r} is not HOST:PORT")
        if (self.cert is None) != (self.key is None):
            raise AgentConfigError("a client certificate needs both --cert and --key")
        try:
            identity_dns_name(self.server_identity)
        except ValueError as exc:
            raise AgentConfigError(str(exc)) from None
        self.credentials()

    def credentials(self) -> grpc.ChannelCredentials:
        ca = _read(self.ca, "CA certificate")
        cert = _read(self.cert, "client certificate") if self.cert else None
        key = _read(self.key, "client private key") if self.key else None
        for what, data in (("CA certificate", ca), ("client certificate", cert)):
            if data is not None and b"-----BEGIN CERTIFICATE-----" not in data:
                raise AgentConfigError(f"{what} is not a PEM certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert)

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *identity_channel_options(self.server_identity),
        ]
        return options

    def open_channel(self) -> grpc.Channel:
        """A channel that accepts only a server proving ``server_identity``."""
        from cms.runtime.tls import refusals_named

        channel = grpc.secure_channel(self.address, self.credentials(),
                                      options=self.channel_options())
        return refusals_named(channel, self.address, self.server_identity)

    def open_aio_channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.address, self.credentials(),
                                       options=self.channel_options())


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise AgentConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def target_from_endpoints(path: Path, identity: str = DEFAULT_IDENTITY, *,
                          address: str | None = None) -> ServerTarget:
    """The access server and ``identity``'s TLS files from an endpoints.json.

    ``path`` may be the file or the directory holding it; ``address``
    overrides the one in the file.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "endpoints.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise AgentConfigError(f"no endpoints file at {p}") from None
    except (OSError, ValueError) as exc:
        raise AgentConfigError(f"cannot read endpoints file {p}: {exc}") from None
    if not isinstance(data, dict):
        raise AgentConfigError(f"{p}: not an endpoints object")
    if address is None:
        try:
            address = str(data["services"][ACCESS_SERVER_SERVICE]["grpc"])
        except (KeyError, TypeError):
            raise AgentConfigError(
                f"{p}: no {ACCESS_SERVER_SERVICE} address (is the access server running?)"
            ) from None
    try:
        tls = data["tls"]
        ca = Path(tls["ca"])
    except (KeyError, TypeError):
        raise AgentConfigError(f"{p}: no tls.ca") from None
    ids = tls.get("identities") or {}
    if identity not in ids:
        raise AgentConfigError(f"{p}: no TLS identity {identity!r} "
                               f"(known: {', '.join(sorted(ids)) or 'none'})")
    try:
        cert, key = Path(ids[identity]["cert"]), Path(ids[identity]["key"])
    except (KeyError, TypeError):
        raise AgentConfigError(f"{p}: TLS identity {identity!r} lacks cert or key") from None
    return ServerTarget(address=address, ca=ca, cert=cert, key=key)
