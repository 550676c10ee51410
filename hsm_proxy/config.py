"""The proxy's configuration file (YAML), read into typed, validated settings.

Schema (every path absolute, or relative to the file's directory)::

    server: {listen: "127.0.0.1:0", metrics_listen: "127.0.0.1:0", max_workers: 32}
    tls: {ca: ca.pem, cert: hsm-proxy.pem, key: hsm-proxy.key}
    pkcs11:
      module: /usr/lib/softhsm/libsofthsm2.so
      env: {SOFTHSM2_CONF: softhsm2.conf}   # environment of the worker processes
      workers: 2                            # default: CPU count
      tokens:
        - {label: access, pin_file: secrets/access.pin}   # or pin_env: VAR
        - {label: kms, pin_file: secrets/kms.pin,
           so_pin_file: secrets/kms.so-pin}                # or so_pin_env: VAR
      call_timeout_seconds: 30              # optional: a worker silent this long is restarted
      probe_interval_seconds: 1.0           # optional: backend liveness probe period
      max_backoff_seconds: 2.0              # optional: cap of the reconnection backoff
    policy: policy.yaml
    audit: {file: audit/hsm-proxy.jsonl, sync_interval_seconds: 1.0,
            token: access,                      # optional: where the audit key lives
            checkpoint_interval_seconds: 60}    # optional: signed heads this often
    handles: {ttl_seconds: 300, max_per_identity: 10000,
              ceremony_ttl_seconds: 3600}   # optional: a key ceremony's component import
    limits: {max_batch_items: 4096, max_data_bytes: 65536}
    log: {level: info, file: null}

Errors name the file and the key (``file: pkcs11.tokens[1].pin_file: required``)
so an operator can fix them without reading code. PINs are not read here: the
worker processes read them (cms.runtime.config.read_secret) so a PIN never
crosses a process boundary; ``check_pins`` only proves they are readable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cms.runtime.config import ConfigError, Section, load_yaml, read_secret
from cms.runtime.tls import TlsFiles

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_CALL_TIMEOUT_S = 30.0
DEFAULT_PROBE_INTERVAL_S = 1.0
DEFAULT_MAX_BACKOFF_S = 2.0
DEFAULT_AUDIT_SYNC_S = 1.0
DEFAULT_AUDIT_CHECKPOINT_S = 60.0


@dataclass(frozen=True)
class TokenConfig:
    """One token the proxy fronts, and where its user PIN (and SO PIN) are.

    The security officer's PIN is needed only on a token that receives the
    trusted half of a transport key: CKA_TRUSTED can be set only in an SO
    session. Only the proxy's officer worker reads it, for that one step.
    """

    label: str
    pin_file: Path | None = None
    pin_env: str | None = None
    so_pin_file: Path | None = None
    so_pin_env: str | None = None

    def read_pin(self) -> str:
        return read_secret(file=self.pin_file, env=self.pin_env,
                           what=f"user PIN of token {self.label!r}")

    @property
    def has_so_pin(self) -> bool:
        return self.so_pin_file is not None or self.so_pin_env is not None

    def read_so_pin(self) -> str:
        return read_secret(file=self.so_pin_file, env=self.so_pin_env,
                           what=f"security officer PIN of token {self.label!r}")


@dataclass(frozen=True)
class Pkcs11Config:
    module: str
    tokens: tuple[TokenConfig, ...]
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 1
    call_timeout_seconds: float = DEFAULT_CALL_TIMEOUT_S
    probe_interval_seconds: float = DEFAULT_PROBE_INTERVAL_S
    max_backoff_seconds: float = DEFAULT_MAX_BACKOFF_S

    @property
    def token_labels(self) -> tuple[str, ...]:
        return tuple(t.label for t in self.tokens)


@dataclass(frozen=True)
class AuditConfig:
    """The audit log, and the key that signs its head at every checkpoint.

    ``token``: the configured token holding the audit key (``audit/hsm-proxy``,
    made there on first start); default the first configured token. The
    records since the last checkpoint are covered by no signature, so
    ``checkpoint_interval_seconds`` bounds how much of the tail can be cut
    without a trace (docs/threat-model.md).
    """

    file: Path
    token: str
    sync_interval_seconds: float = DEFAULT_AUDIT_SYNC_S
    checkpoint_interval_seconds: float = DEFAULT_AUDIT_CHECKPOINT_S


@dataclass(frozen=True)
class HandlesConfig:
    ttl_seconds: int = 300
    max_per_identity: int = 10000
    # A ceremony waits for its custodians, who may come one after the other.
    ceremony_ttl_seconds: int = 3600


@dataclass(frozen=True)
class LimitsConfig:
    max_batch_items: int = 4096
    max_data_bytes: int = 65536


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    file: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:0"
    metrics_listen: str | None = "127.0.0.1:0"
    max_workers: int = 32


@dataclass(frozen=True)
class ProxyConfig:
    path: Path
    server: ServerConfig
    tls: TlsFiles
    pkcs11: Pkcs11Config
    policy: Path
    audit: AuditConfig
    handles: HandlesConfig
    limits: LimitsConfig
    log: LogConfig


def load_config(path: str | os.PathLike[str]) -> ProxyConfig:
    """Read and validate a proxy configuration file."""
    p = Path(path).resolve()
    root = Section(load_yaml(p), str(p), p.parent)

    srv = root.section("server")
    server = ServerConfig(
        listen=srv.str("listen", "127.0.0.1:0"),
        metrics_listen=srv.str("metrics_listen", "127.0.0.1:0"),
        max_workers=srv.int("max_workers", 32, minimum=2, maximum=1024),
    )

    tls_s = root.section("tls", required=True)
    tls = TlsFiles(tls_s.path("ca", required=True), tls_s.path("cert", required=True),
                   tls_s.path("key", required=True))

    pkcs11 = _pkcs11(root.section("pkcs11", required=True))

    policy = root.path("policy", required=True)
    assert policy is not None

    audit = _audit(root.section("audit", required=True), pkcs11)

    hs = root.section("handles")
    handles = HandlesConfig(ttl_seconds=hs.int("ttl_seconds", 300, minimum=1),
                            max_per_identity=hs.int("max_per_identity", 10000, minimum=1),
                            ceremony_ttl_seconds=hs.int("ceremony_ttl_seconds", 3600,
                                                        minimum=1))

    ls = root.section("limits")
    limits = LimitsConfig(max_batch_items=ls.int("max_batch_items", 4096, minimum=1),
                          max_data_bytes=ls.int("max_data_bytes", 65536, minimum=16))

    lg = root.section("log")
    level = lg.str("level", "info").lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{lg.where}.level: one of {', '.join(LOG_LEVELS)}, got {level!r}")
    log = LogConfig(level=level, file=lg.path("file"))

    return ProxyConfig(p, server, tls, pkcs11, policy, audit, handles, limits, log)


def _audit(aud: Section, pkcs11: Pkcs11Config) -> AuditConfig:
    audit_file = aud.path("file", required=True)
    assert audit_file is not None
    token = aud.str("token", pkcs11.tokens[0].label)
    if token not in pkcs11.token_labels:
        raise ConfigError(f"{aud.where}.token: {token!r} is not a configured token "
                          f"(pkcs11.tokens: {', '.join(pkcs11.token_labels)})")
    return AuditConfig(
        audit_file, token,
        sync_interval_seconds=_positive(aud, "sync_interval_seconds", DEFAULT_AUDIT_SYNC_S),
        checkpoint_interval_seconds=_positive(aud, "checkpoint_interval_seconds",
                                              DEFAULT_AUDIT_CHECKPOINT_S))


def _positive(section: Section, key: str, default: float) -> float:
    value = section.float(key, default)
    if value <= 0:
        raise ConfigError(f"{section.where}.{key}: must be positive")
    return value


def _pkcs11(sec: Section) -> Pkcs11Config:
    module = sec.path("module", required=True)
    assert module is not None
    if not module.is_file():
        raise ConfigError(f"{sec.where}.module: no PKCS#11 module at {module}")
    env_raw = sec.mapping("env")
    env: dict[str, str] = {}
    for key, value in env_raw.items():
        if not isinstance(key, str) or not isinstance(value, str | int | float):
            raise ConfigError(f"{sec.where}.env.{key}: expected a string value")
        env[key] = str(value)
    workers = sec.int("workers", os.cpu_count() or 1, minimum=1, maximum=64)

    raw_tokens = sec.list("tokens", required=True)
    if not raw_tokens:
        raise ConfigError(f"{sec.where}.tokens: at least one token is required")
    tokens: list[TokenConfig] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_tokens):
        ts = Section(raw, f"{sec.where}.tokens[{i}]", sec.base_dir)
        label = ts.str("label", required=True)
        if label in seen:
            raise ConfigError(f"{ts.where}.label: token {label!r} is listed twice")
        seen.add(label)
        pin_file = ts.path("pin_file")
        pin_env = ts.str("pin_env")
        if (pin_file is None) == (pin_env is None):
            raise ConfigError(f"{ts.where}: give exactly one of pin_file and pin_env")
        so_pin_file = ts.path("so_pin_file")
        so_pin_env = ts.str("so_pin_env")
        if so_pin_file is not None and so_pin_env is not None:
            raise ConfigError(f"{ts.where}: give at most one of so_pin_file and so_pin_env")
        tokens.append(TokenConfig(label, pin_file, pin_env, so_pin_file, so_pin_env))

    return Pkcs11Config(
        module=str(module),
        tokens=tuple(tokens),
        env=env,
        workers=workers,
        call_timeout_seconds=_positive(sec, "call_timeout_seconds", DEFAULT_CALL_TIMEOUT_S),
        probe_interval_seconds=_positive(sec, "probe_interval_seconds",
                                         DEFAULT_PROBE_INTERVAL_S),
        max_backoff_seconds=_positive(sec, "max_backoff_seconds", DEFAULT_MAX_BACKOFF_S),
    )


def check_pins(config: Pkcs11Config) -> None:
    """Fail at start-up, with the file or variable named, if a PIN cannot be read.

    The value is discarded at once; the workers read it again for themselves.
    """
    for token in config.tokens:
        token.read_pin()
        if token.has_so_pin:
            token.read_so_pin()

