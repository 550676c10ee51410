"""Assembling and running ``cms key-mgmt serve --config FILE``."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from cms.runtime.logs import fields, setup_logging
from cms.runtime.server import GrpcService, ServerSettings
from cms.runtime.tls import secure_channel
from cms.v1 import key_blocks_pb2_grpc, key_mgmt_pb2_grpc
from key_mgmt.config import KeyMgmtConfig, load_config
from key_mgmt.core import KeyManager
from key_mgmt.service import KeyManagementServicer
from key_mgmt.store import KeyStore

log = logging.getLogger("key_mgmt.server")

SERVICE_NAMES = ("cms.v1.KeyManagement",)


class KeyMgmtServer:
    def __init__(self, cfg: KeyMgmtConfig, ready_file: Path | None = None) -> None:
        self.cfg = cfg
        self.store = KeyStore(cfg.database_url)
        self.proxy = secure_channel(cfg.proxy_address, cfg.tls)
        self.manager = KeyManager(key_blocks_pb2_grpc.KeyBlocksStub(self.proxy), self.store,
                                  hsm2_token=cfg.hsm2_token, hsm1_token=cfg.hsm1_token)
        settings = ServerSettings(listen=cfg.listen, metrics_listen=cfg.metrics_listen,
                                  tls=cfg.tls, max_workers=8, ready_file=ready_file)
        self.service = GrpcService("key-mgmt", settings, self._register, on_stop=self._stop)

    def _register(self, server: grpc.Server) -> list[str]:
        key_mgmt_pb2_grpc.add_KeyManagementServicer_to_server(
            KeyManagementServicer(self.manager), server)
        return list(SERVICE_NAMES)

    def _stop(self) -> None:
        self.proxy.close()
        self.store.close()

    def run(self) -> int:
        return self.service.run()


def serve(config_path: Path, ready_file: Path | None = None) -> int:
    cfg = load_config(config_path)
    setup_logging("key-mgmt", cfg.log_level, cfg.log_file)
    log.info("starting", extra=fields(config=str(cfg.path), proxy=cfg.proxy_address))
    return KeyMgmtServer(cfg, ready_file).run()
