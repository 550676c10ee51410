"""Clients' view of a deployment: ``endpoints.json`` and authenticated channels.

``cms dev up`` writes ``endpoints.json``; operators' commands and tests read it
to find each service and the TLS files of the identity they act as. Every
channel checks that the server proves the service's identity.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from cms.identity import SERVICE_IDENTITIES
from cms.runtime.config import ConfigError
from cms.runtime.tls import TlsFiles, secure_channel

ENDPOINTS_ENV = "CMS_ENDPOINTS"


@dataclass(frozen=True)
class Endpoints:
    path: Path
    data: dict

    def grpc_address(self, service: str) -> str:
        try:
            return self.data["services"][service]["grpc"]
        except KeyError:
            known = ", ".join(sorted(self.data.get("services", {})))
            raise ConfigError(f"{self.path}: no service {service!r} (known: {known})") from None

    def metrics_url(self, service: str) -> str | None:
        return self.data.get("services", {}).get(service, {}).get("metrics")

    def tls(self, identity: str) -> TlsFiles:
        tls = self.data.get("tls", {})
        ids = tls.get("identities", {})
        if identity not in ids:
            raise ConfigError(f"{self.path}: no TLS identity {identity!r} "
                              f"(known: {', '.join(sorted(ids))})")
        return TlsFiles(Path(tls["ca"]), Path(ids[identity]["cert"]), Path(ids[identity]["key"]))

    def channel(self, service: str, identity: str, *,
                server_identity: str | None = None) -> grpc.Channel:
        """A channel to ``service`` as ``identity``, accepting only a server that proves
        ``server_identity`` (by default the service's own, ``cms.identity.SERVICE_IDENTITIES``)."""
        expected = server_identity or SERVICE_IDENTITIES.get(service)
        if expected is None:
            raise ConfigError(f"no server identity is known for service {service!r}: "
                              f"name the one it must prove")
        return secure_channel(self.grpc_address(service), self.tls(identity),
                              server_identity=expected)


def load_endpoints(path: str | os.PathLike[str] | None = None) -> Endpoints:
    """Load endpoints.json from ``path``, $CMS_ENDPOINTS, or ./var/demo/endpoints.json."""
    chosen = path or os.environ.get(ENDPOINTS_ENV) or "var/demo/endpoints.json"
    p = Path(chosen)
    if p.is_dir():
        p = p / "endpoints.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no endpoints file at {p}: start the stack with 'cms dev up' "
                          f"or pass --endpoints") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read endpoints file {p}: {exc}") from None
    return Endpoints(p.resolve(), data)
