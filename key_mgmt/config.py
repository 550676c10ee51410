"""Configuration of ``cms key-mgmt serve`` (YAML).

::

    server: {listen: 127.0.0.1:0, metrics_listen: 127.0.0.1:0}
    tls: {ca: ca.pem, cert: key-mgmt.pem, key: key-mgmt.key}
    database: {url: sqlite:///var/key-mgmt.db}     # records only, never key material
    proxy: {address: 127.0.0.1:PORT}                # the HSM proxy (mTLS, identity key-mgmt)
    tokens: {hsm2: kms, hsm1: access}
    log: {level: info, file: null}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cms.keynames import HSM1_TOKEN, HSM2_TOKEN
from cms.runtime.config import ConfigError, Section, load_yaml
from cms.runtime.tls import TlsFiles, tls_from_section

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class KeyMgmtConfig:
    path: Path
    listen: str
    metrics_listen: str | None
    tls: TlsFiles
    database_url: str
    proxy_address: str
    hsm2_token: str
    hsm1_token: str
    log_level: str
    log_file: Path | None


def load_config(path: Path) -> KeyMgmtConfig:
    root = Section(load_yaml(path), str(path), path.parent)
    server = root.section("server")
    files = tls_from_section(root.section("tls", required=True))
    url = root.section("database", required=True).str("url", required=True)
    if not url.startswith(("sqlite://", "postgresql")):
        raise ConfigError(f"{path}.database.url: expected sqlite:///PATH or "
                          f"postgresql+psycopg://...")
    tokens = root.section("tokens")
    log = root.section("log")
    level = log.str("level", "info")
    if level not in LOG_LEVELS:
        raise ConfigError(f"{path}.log.level: one of {', '.join(LOG_LEVELS)}")
    return KeyMgmtConfig(
        path=path,
        listen=server.str("listen", "127.0.0.1:0"),
        metrics_listen=server.str("metrics_listen", "127.0.0.1:0"),
        tls=files,
        database_url=url,
        proxy_address=root.section("proxy", required=True).str("address", required=True),
        hsm2_token=tokens.str("hsm2", HSM2_TOKEN),
        hsm1_token=tokens.str("hsm1", HSM1_TOKEN),
        log_level=level,
        log_file=log.path("file"),
    )
