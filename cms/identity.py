"""The system's identities: their names, the URI SAN that carries one, the DNS name that
mirrors it, and what a client sets to make TLS check a server's identity.

Every certificate carries its identity in a URI SAN ``spiffe://cms/<identity>``,
the identity's source of truth: servers read a caller's identity from it and
authorize on nothing else. A client has to check the server's identity too
(a process holding the key-mgmt certificate must not pass for the proxy), but
Python grpcio gives a client no hook into the server's certificate: no
verification callback, no client-side auth context. The one check it runs
on that certificate, beyond the chain, is host-name verification against its
DNS and IP SANs. So a server certificate also carries the DNS SAN
``<identity>.identity.cms.internal``, for the same identity as its URI SAN,
and a client connects with ``grpc.ssl_target_name_override`` set to the DNS
name of the identity it expects (``identity_channel_options``): TLS then
refuses every other certificate of the CA. ``.internal`` is reserved for
private use, so no public CA issues such names; the CA of the deployment
must issue ``<identity>.identity.cms.internal`` only beside
``spiffe://cms/<identity>`` (``deploy.pki`` does; docs/operations.md says so for an
operator's CA), and servers refuse to start on a certificate whose two
names disagree (``cms.runtime.tls.server_credentials``).

This module needs nothing but the standard library: the card agent, which
installs without ``cryptography``, takes its expected identity from here.
"""

from __future__ import annotations

import re

SPIFFE_PREFIX = "spiffe://cms/"

HSM_PROXY = "hsm-proxy"
ACCESS_SERVER = "access-server"
KEY_MGMT = "key-mgmt"
CARD_AGENT = "card-agent"
ADMIN = "admin"
PROVIDER = "provider"
"""The card provider's system (seed 004): its root CA in the proxy, and the card
channel card agents dial when it initializes cards in PC/SC readers."""

BUREAU = "bureau"
"""The personalization bureau (seed 004, B4): signs its results and shipping files with its
key in the proxy."""
MAILER = "mailer"
"""The mailing house (seed 004, B4): opens the mailer data of PIN letters with its key in
the proxy."""

CUSTODIANS = ("custodian-1", "custodian-2", "custodian-3")
"""Key custodians: each enters one component of a key ceremony, straight to the proxy."""
DEFAULT_IDENTITIES = (HSM_PROXY, ACCESS_SERVER, KEY_MGMT, CARD_AGENT, ADMIN, *CUSTODIANS,
                      PROVIDER, BUREAU, MAILER)
SERVER_IDENTITIES = frozenset({HSM_PROXY, ACCESS_SERVER, KEY_MGMT, PROVIDER, BUREAU})
"""Identities that also serve: their certificates carry serverAuth and the DNS names."""

SERVICE_IDENTITIES = {"hsm_proxy": HSM_PROXY, "access_server": ACCESS_SERVER,
                      "key_mgmt": KEY_MGMT}
"""The identity each service of ``endpoints.json`` must prove to its clients."""

IDENTITY_DNS_SUFFIX = ".identity.cms.internal"

HOST_NAME_CHECK_FAILED = "Hostname Verification Check failed"
"""What gRPC core says when the server's certificate lacks the name the client checks."""

IDENTITY_NOT_PROVEN = "server identity not proven"
"""How a client's error about such a server begins (``identity_refusal``)."""

_DNS_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def valid_identity(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)


def identity_uri(identity: str) -> str:
    return SPIFFE_PREFIX + identity


def identity_from_uri(uri: str) -> str | None:
    """The identity named by a ``spiffe://cms/<identity>`` URI, else None."""
    if not uri.startswith(SPIFFE_PREFIX):
        return None
    name = uri[len(SPIFFE_PREFIX):]
    return name if valid_identity(name) else None


def identity_dns_name(identity: str) -> str:
    """The DNS SAN that names ``identity`` in a server certificate.

    Only identities that are valid host names in lower case have one: host
    names compare without case, and "Admin" must not check as "admin".
    """
    if not valid_identity(identity) or not all(
            _DNS_LABEL.fullmatch(label) for label in identity.split(".")):
        raise ValueError(f"identity {identity!r} cannot name a server: use lower-case "
                         f"letters, digits and '-' (dot-separated)")
    return identity + IDENTITY_DNS_SUFFIX


def identity_from_dns_name(name: str) -> str | None:
    """The identity a DNS SAN names, or None when it is not an identity name."""
    lowered = name.lower().rstrip(".")
    if not lowered.endswith(IDENTITY_DNS_SUFFIX):
        return None
    return lowered[: -len(IDENTITY_DNS_SUFFIX)] or None


def identity_channel_options(identity: str) -> list[tuple[str, object]]:
    """Channel options that make TLS accept only a server certificate of ``identity``.

    The name checked (and sent as SNI) is the identity's DNS name instead of
    the host in the target address.
    """
    return [("grpc.ssl_target_name_override", identity_dns_name(identity))]


def is_identity_refusal(details: str) -> bool:
    """Whether a failed call's details say the server's certificate named someone else."""
    return HOST_NAME_CHECK_FAILED in details or IDENTITY_NOT_PROVEN in details


def identity_refusal(target: str, identity: str) -> str:
    """The error a client reports when the server at ``target`` is not ``identity``."""
    return (f"{IDENTITY_NOT_PROVEN}: the server at {target} is not {identity}: its "
            f"certificate does not carry the DNS SAN {identity + IDENTITY_DNS_SUFFIX} that "
            f"names this identity beside the URI SAN {identity_uri(identity)} (another "
            f"service, or a certificate issued without it; see docs/operations.md)")
