"""Configuration of ``cms access-server serve`` (YAML).

::

    server:
      listen: 127.0.0.1:0
      metrics_listen: 127.0.0.1:0
      max_workers: 32                   # threads for the operator services
      keepalive_time_seconds: 60        # ping a quiet connection ...
      keepalive_timeout_seconds: 20     # ... and drop it when the ping goes unanswered
      min_ping_interval_seconds: 10     # clients pinging more often are cut off
      max_connection_idle_seconds: 300  # a connection without calls is closed
    tls: {ca: ca.pem, cert: access-server.pem, key: access-server.key}
    database: {url: sqlite:///var/access.db}     # or postgresql+psycopg://...
    proxy: {address: 127.0.0.1:PORT}              # the HSM proxy (mTLS with the same tls files)
    key_mgmt: {address: 127.0.0.1:PORT, cache_seconds: 10}   # which master versions it transferred
    card_channel:
      allow_agents_without_certificate: false
      lease_seconds: 120
      hello_timeout_seconds: 10         # from the stream's start to the agent's hello
      answer_timeout_seconds: 60        # from a script sent to the agent's result
      max_streams: 2000                 # open streams, in total ...
      max_streams_per_identity: 2000    # ... per certificate identity ...
      max_streams_per_peer: 200         # ... and per peer IP address
      flow_workers: 32                  # threads running the contacts' store and proxy calls
      minimum_security_level: "03"      # SCP03 level every card channel has at least
      security_level: highest           # or a level: the highest the card offers within it
    log: {level: info, file: null}

Every value is checked at start-up and a bad one is named with its path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from access_server.levels import HIGHEST, LevelPolicy, parse_level
from access_server.stream_limits import StreamLimits
from cms.runtime.config import ConfigError, Section, load_yaml
from cms.runtime.keepalive import KEEPALIVE_TIME_MS
from cms.runtime.server import Keepalive, keepalive_from_section
from cms.runtime.tls import TlsFiles, tls_from_section

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AccessConfig:
    path: Path
    listen: str
    metrics_listen: str | None
    max_workers: int
    tls: TlsFiles
    database_url: str
    proxy_address: str | None
    key_mgmt_address: str | None
    masters_cache_seconds: float
    allow_agents_without_certificate: bool
    lease_seconds: float
    log_level: str
    log_file: Path | None
    keepalive: Keepalive = field(default_factory=Keepalive)
    hello_timeout_seconds: float = 10.0
    answer_timeout_seconds: float = 60.0
    stream_limits: StreamLimits = field(default_factory=StreamLimits)
    flow_workers: int = 32
    levels: LevelPolicy = field(default_factory=LevelPolicy)


def _database_url(section: Section) -> str:
    url = section.str("url", required=True)
    if not url.startswith(("sqlite://", "postgresql")):
        raise ConfigError(f"{section.where}.url: expected sqlite:///PATH or "
                          f"postgresql+psycopg://..., got a {url.split(':', 1)[0]!r} URL")
    return url


MAX_TIMEOUT_S = 3600.0
"""The longest wait for an agent that can be configured: a wait is a limit, not a hope."""


def _timeout(section: Section, key: str, default: float) -> float:
    value = section.float(key, default)
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"{section.where}.{key}: must be positive and at most "
                          f"{MAX_TIMEOUT_S:g} seconds, got {value:g}")
    return value


def _answer_timeout(channel: Section, lease_seconds: float) -> float:
    """The wait for an agent's result: positive and shorter than the card's lease."""
    value = _timeout(channel, "answer_timeout_seconds", 60.0)
    if value >= lease_seconds:
        raise ConfigError(f"{channel.where}.answer_timeout_seconds: must be less than "
                          f"lease_seconds ({lease_seconds:g}): a card's lease must outlast "
                          f"the wait for the agent's answer")
    return value


def _stream_limits(channel: Section) -> StreamLimits:
    total = channel.int("max_streams", 2000, minimum=1, maximum=100_000)
    each = {}
    for key in ("max_streams_per_identity", "max_streams_per_peer"):
        each[key] = channel.int(key, min(total, getattr(StreamLimits(), key)), minimum=1)
        if each[key] > total:
            raise ConfigError(f"{channel.where}.{key}: must be at most max_streams ({total})")
    return StreamLimits(max_streams=total, **each)


def _levels(channel: Section) -> LevelPolicy:
    """The security level policy (``access_server.levels``), each value checked."""
    where = channel.where
    raw_minimum = channel.data.get("minimum_security_level")
    raw_choice = channel.data.get("security_level")
    try:
        minimum = (LevelPolicy().minimum if raw_minimum is None
                   else parse_level(raw_minimum, f"{where}.minimum_security_level"))
        cap = (None if raw_choice is None or raw_choice == HIGHEST
               else parse_level(raw_choice, f"{where}.security_level"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        return LevelPolicy(minimum=minimum, cap=cap)
    except ValueError as exc:
        key = "minimum_security_level" if cap is None else "security_level"
        raise ConfigError(f"{where}.{key}: {exc}") from None


def _server_keepalive(server: Section) -> Keepalive:
    keepalive = keepalive_from_section(server)
    agents_ping_s = KEEPALIVE_TIME_MS / 1000
    if keepalive.min_ping_interval_s > agents_ping_s:
        raise ConfigError(f"{server.where}.min_ping_interval_seconds: must be at most "
                          f"{agents_ping_s:g}: card agents ping every {agents_ping_s:g} s "
                          f"and would be cut off")
    return keepalive


def load_config(path: Path) -> AccessConfig:
    root = Section(load_yaml(path), str(path), path.parent)
    server = root.section("server")
    channel = root.section("card_channel")
    log = root.section("log")
    level = log.str("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{path}.log.level: one of {', '.join(LOG_LEVELS)}")
    lease = channel.float("lease_seconds", 120.0)
    if lease <= 0:
        raise ConfigError(f"{path}.card_channel.lease_seconds: must be positive")
    key_mgmt = root.section("key_mgmt")
    cache = key_mgmt.float("cache_seconds", 10.0)
    if cache < 0:
        raise ConfigError(f"{path}.key_mgmt.cache_seconds: must not be negative")
    return AccessConfig(
        path=path,
        listen=server.str("listen", "127.0.0.1:0"),
        metrics_listen=server.str("metrics_listen", "127.0.0.1:0"),
        max_workers=server.int("max_workers", 32, minimum=2, maximum=1024),
        tls=tls_from_section(root.section("tls", required=True)),
        database_url=_database_url(root.section("database", required=True)),
        proxy_address=root.section("proxy").str("address"),
        key_mgmt_address=key_mgmt.str("address"),
        masters_cache_seconds=cache,
        allow_agents_without_certificate=channel.bool("allow_agents_without_certificate", False),
        lease_seconds=lease,
        log_level=level,
        log_file=log.path("file"),
        keepalive=_server_keepalive(server),
        hello_timeout_seconds=_timeout(channel, "hello_timeout_seconds", 10.0),
        answer_timeout_seconds=_answer_timeout(channel, lease),
        stream_limits=_stream_limits(channel),
        flow_workers=channel.int("flow_workers", 32, minimum=1, maximum=1024),
        levels=_levels(channel),
    )
