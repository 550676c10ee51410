"""Assembling and running the proxy: ``cms hsm-proxy serve --config FILE``.

Start-up order: configuration (every bad value named), logs, PIN files
readable, policy, audit log (continuing its chain), worker processes (each
has tried its backend once), the audit key (made on first start) and a
signed checkpoint of the log as found, then the gRPC server; health of ``cms.v1.Hsm``
then follows the backend: SERVING while at least one worker has a working
backend, NOT_SERVING otherwise (the overall "" service stays SERVING while the
process is healthy, so a liveness probe does not restart the proxy because an
HSM is down). SIGTERM: health NOT_SERVING, in-flight calls finish within the
grace period, a final checkpoint signs the audit head, the audit log is
synced, and the workers stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from cms import keynames
from cms.runtime.config import ConfigError
from cms.runtime.errors import DeadlineExceeded, ServiceError, Unavailable
from cms.runtime.logs import fields, setup_logging
from cms.runtime.server import GrpcService, ServerSettings
from hsm_proxy.audit import AuditError, AuditLog, HsmHeadSigner, public_key_path
from hsm_proxy.ceremonies import CeremonyRegistry
from hsm_proxy.config import ProxyConfig, check_pins, load_config
from hsm_proxy.core import ProxyCore
from hsm_proxy.handles import HandleRegistry
from hsm_proxy.policy import load_policy
from hsm_proxy.pool import WorkerPool
from hsm_proxy.worker import DEFAULT_OPERATION_MODULES, WorkerSpec

log = logging.getLogger("hsm_proxy.server")

HSM_SERVICE = "cms.v1.Hsm"


class ProxyStartError(ConfigError):
    """The proxy cannot start (reported as one line by the cms command)."""


def _register_hsm(server: grpc.Server, core: ProxyCore) -> list[str]:
    from cms.v1 import hsm_pb2_grpc
    from hsm_proxy.service import HsmServicer

    hsm_pb2_grpc.add_HsmServicer_to_server(HsmServicer(core), server)
    return [HSM_SERVICE]


# Services the proxy serves, each a function (server, core) -> service names. A
# later contract (e.g. CardKeys) adds its registration here and its worker
# operations module to OPERATION_MODULES.
def _register_card_keys(server: grpc.Server, core: ProxyCore) -> list[str]:
    from hsm_proxy.card_keys_service import register

    return register(server, core)


def _register_key_blocks(server: grpc.Server, core: ProxyCore) -> list[str]:
    from hsm_proxy.key_blocks_service import register

    return register(server, core)


def _register_provider(server: grpc.Server, core: ProxyCore) -> list[str]:
    from hsm_proxy.provider_service import register

    return register(server, core)


def _register_issuer(server: grpc.Server, core: ProxyCore) -> list[str]:
    from hsm_proxy.issuer_service import register

    return register(server, core)


def _register_partners(server: grpc.Server, core: ProxyCore) -> list[str]:
    from hsm_proxy.partners_service import register

    return register(server, core)


SERVICE_REGISTRATIONS: list[Callable[[grpc.Server, ProxyCore], list[str]]] = [
    _register_hsm, _register_card_keys, _register_key_blocks, _register_provider,
    _register_issuer, _register_partners]
OPERATION_MODULES: tuple[str, ...] = (*DEFAULT_OPERATION_MODULES, "hsm_proxy.card_keys_ops",
                                      "hsm_proxy.key_blocks_ops", "hsm_proxy.audit_ops",
                                      "hsm_proxy.provider_ops", "hsm_proxy.issuer_ops",
                                      "hsm_proxy.partners_ops")


def worker_specs(cfg: ProxyConfig) -> list[WorkerSpec]:
    """``pkcs11.workers`` general workers, then the officer worker (ceremonies and
    transport keys: the steps that need the security officer's login)."""
    p = cfg.pkcs11
    return [
        WorkerSpec(index=i, module=p.module, tokens=p.tokens, env=dict(p.env),
                   max_backoff=p.max_backoff_seconds, log_level=cfg.log.level,
                   log_file=str(cfg.log.file) if cfg.log.file else None,
                   operation_modules=OPERATION_MODULES, officer=i == p.workers)
        for i in range(p.workers + 1)
    ]


class Proxy:
    """The running proxy: pool, core and gRPC service."""

    def __init__(self, cfg: ProxyConfig, ready_file: Path | None = None):
        self.cfg = cfg
        policy = load_policy(cfg.policy)
        check_pins(cfg.pkcs11)
        try:
            self.audit = AuditLog(
                cfg.audit.file, sync_interval=cfg.audit.sync_interval_seconds,
                checkpoint_interval=cfg.audit.checkpoint_interval_seconds).open()
        except (AuditError, OSError) as exc:
            raise ProxyStartError(str(exc)) from None
        self.pool = WorkerPool(
            worker_specs(cfg), call_timeout=cfg.pkcs11.call_timeout_seconds,
            probe_interval=cfg.pkcs11.probe_interval_seconds,
            on_change=self.update_health, on_reset=self._reset, on_tick=self._tick)
        self.audit.signer = HsmHeadSigner(
            self.pool, token=cfg.audit.token, label=keynames.AUDIT_KEY,
            public_key_file=public_key_path(cfg.audit.file),
            timeout=cfg.pkcs11.call_timeout_seconds)
        self.core = ProxyCore(
            policy=policy, audit=self.audit,
            handles=HandleRegistry(cfg.handles.ttl_seconds, cfg.handles.max_per_identity),
            pool=self.pool, limits=cfg.limits, tokens=cfg.pkcs11.token_labels,
            ceremonies=CeremonyRegistry(cfg.handles.ceremony_ttl_seconds))
        settings = ServerSettings(
            listen=cfg.server.listen, metrics_listen=cfg.server.metrics_listen, tls=cfg.tls,
            max_workers=cfg.server.max_workers, ready_file=ready_file)
        self.service = GrpcService("hsm-proxy", settings, self._register, on_stop=self._stop)
        self._serving: bool | None = None

    def _register(self, server: grpc.Server) -> list[str]:
        names: list[str] = []
        for registration in SERVICE_REGISTRATIONS:
            names += registration(server, self.core)
        return names

    def _reset(self, worker: int, keep: tuple[int, int] | None) -> None:
        self.core.worker_reset(worker, keep)

    def _tick(self) -> None:
        self.core.expire_handles()
        self.update_health()

    def update_health(self) -> None:
        serving = self.pool.any_backend_ok
        if serving == self._serving:
            return
        self._serving = serving
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        self.service.health.set(HSM_SERVICE, status)
        log.info("health", extra=fields(grpc_service=HSM_SERVICE,
                                        status="SERVING" if serving else "NOT_SERVING"))

    def start(self) -> None:
        try:
            self.pool.start()
        except RuntimeError as exc:
            self.pool.shutdown()
            self.audit.close()
            raise ProxyStartError(str(exc)) from None
        self._start_checkpoint()
        self.service.start()
        self._serving = None
        self.update_health()

    def _start_checkpoint(self) -> None:
        """Sign the log as found before serving: each run of the proxy begins with a
        checkpoint of the chain it continues.

        An HSM that is down only delays it (the checkpoint loop retries; the
        proxy starts NOT_SERVING as it would anyway); an audit key that does
        not match its class, or a log signed by another key, stops the start.
        """
        try:
            self.audit.checkpoint("start")
        except (Unavailable, DeadlineExceeded) as exc:
            log.warning("audit key not reachable; checkpoints retry every interval",
                        extra=fields(error=exc.message))
        except (ServiceError, AuditError, OSError) as exc:
            self.audit.close()
            self.pool.shutdown()
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            raise ProxyStartError(f"audit: {message}") from None
        self.audit.start_checkpoints()

    def _stop(self) -> None:
        # The final checkpoint is signed by a worker: the log closes before the pool.
        self.audit.close()
        self.pool.shutdown()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.service.stop())
        signal.signal(signal.SIGINT, lambda *_: self.service.stop())
        self.start()
        self.service.wait()
        return 0


def serve(config_path: Path, ready_file: Path | None = None) -> int:
    cfg = load_config(config_path)
    setup_logging("hsm-proxy", cfg.log.level, cfg.log.file)
    log.info("starting", extra=fields(config=str(cfg.path), workers=cfg.pkcs11.workers,
                                      tokens=list(cfg.pkcs11.token_labels)))
    return Proxy(cfg, ready_file).run()
