"""How many card channel streams may be open, in total, per identity and per peer host.

Every user PC runs a card agent, so any of them can open streams; one that
opens many must not take the server's room from the others. Each stream is
counted against three limits when it opens and released when it ends; a
stream over any of them is refused at once (the servicer answers
RESOURCE_EXHAUSTED with the message of ``Admission.admit``), and the agent
tries again later. All agents may present the same certificate identity
(``card-agent``), so the per-identity limit alone would not keep one PC from
filling the server: the per-peer limit counts by the peer's IP address.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote

NO_IDENTITY = "(none)"
"""How an agent without a client certificate is counted (when the server allows it)."""


@dataclass(frozen=True)
class StreamLimits:
    """Open streams allowed: in total, per certificate identity, per peer host."""

    max_streams: int = 2000
    max_streams_per_identity: int = 2000
    max_streams_per_peer: int = 200


def peer_host(peer: str) -> str:
    """The host part of a gRPC peer string: ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``,
    ``ipv6:[::1]:51234`` (or its %-encoded form) -> ``::1``; anything else as given."""
    kind, _, rest = unquote(peer).partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class Admission:
    """The open streams, counted against ``StreamLimits``; thread safe."""

    def __init__(self, limits: StreamLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._total = 0
        self._by_identity: Counter[str] = Counter()
        self._by_peer: Counter[str] = Counter()

    @property
    def open_streams(self) -> int:
        return self._total

    def admit(self, identity: str | None, host: str) -> str | None:
        """Count one more stream and return None, or say which limit refuses it."""
        who = identity or NO_IDENTITY
        limits = self.limits
        with self._lock:
            if self._total >= limits.max_streams:
                return (f"the access server has {self._total} card channels open, its limit "
                        f"(card_channel.max_streams); try again later")
            if self._by_identity[who] >= limits.max_streams_per_identity:
                return (f"identity {who} has {self._by_identity[who]} card channels open, "
                        f"its limit (card_channel.max_streams_per_identity); try again later")
            if self._by_peer[host] >= limits.max_streams_per_peer:
                return (f"{host} has {self._by_peer[host]} card channels open, its limit "
                        f"(card_channel.max_streams_per_peer); try again later")
            self._total += 1
            self._by_identity[who] += 1
            self._by_peer[host] += 1
        return None

    def release(self, identity: str | None, host: str) -> None:
        """One admitted stream ended; hosts and identities with none open are forgotten."""
        who = identity or NO_IDENTITY
        with self._lock:
            self._total -= 1
            for counts, key in ((self._by_identity, who), (self._by_peer, host)):
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
