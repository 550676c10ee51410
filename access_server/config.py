"""Configuration of ``cms access-server serve`` (YAML).

::

    server: {listen: 127.0.0.1:0, metrics_listen: 127.0.0.1:0, max_workers: 32}
    tls: {ca: ca.pem, cert: access-server.pem, key: access-server.key}
    database: {url: sqlite:///var/access.db}     # or postgresql+psycopg://...
    proxy: {address: 127.0.0.1:PORT}              # the HSM proxy (mTLS with the same tls files)
    key_mgmt: {address: 127.0.0.1:PORT, cache_seconds: 10}   # which master versions it transferred
    card_channel: {allow_agents_without_certificate: false, lease_seconds: 120}
    log: {level: info, file: null}

Every value is checked at start-up and a bad one is named with its path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cms.runtime.config import ConfigError, Section, load_yaml
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


def _database_url(section: Section) -> str:
    url = section.str("url", required=True)
    if not url.startswith(("sqlite://", "postgresql")):
        raise ConfigError(f"{section.where}.url: expected sqlite:///PATH or "
                          f"postgresql+psycopg://..., got a {url.split(':', 1)[0]!r} URL")
    return url


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
    )
