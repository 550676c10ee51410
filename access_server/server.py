"""Assembling and running ``cms access-server serve --config FILE``.

Start-up order: configuration (a bad value is named), logs, the database
(migrated to the current schema), the proxy channel (mutual TLS as identity
access-server), then the gRPC server with the operator services.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc
from prometheus_client import REGISTRY

from access_server.card_channel import CardChannelServicer, ChannelTimeouts
from access_server.channel_opener import ChannelOpener
from access_server.config import AccessConfig, load_config
from access_server.flows import FlowContext
from access_server.issuance_service import IssuanceServicer, UsersServicer
from access_server.masters import UsableMasters
from access_server.operator import CampaignsServicer, PsdRegistryServicer
from access_server.stock_service import StockServicer
from access_server.store import Store
from cms import keynames
from cms.identity import KEY_MGMT
from cms.runtime.errors import Unavailable
from cms.runtime.logs import fields, setup_logging
from cms.runtime.loop_threads import LoopThreads
from cms.runtime.server import AsyncGrpcService, ServerSettings
from cms.runtime.tls import secure_channel
from cms.v1 import (
    access_pb2_grpc,
    card_channel_pb2_grpc,
    issuance_pb2_grpc,
    issuer_pb2_grpc,
    key_blocks_pb2_grpc,
    key_mgmt_pb2_grpc,
    stock_pb2_grpc,
)
from cms.v1.card_keys_pb2_grpc import CardKeysStub

log = logging.getLogger("access_server.server")

PROXY_TIMEOUT_S = 10.0
# A restarted proxy is found again within a second, not after gRPC's default
# exponential backoff (up to two minutes): card contacts meanwhile end with
# RETRY_LATER, and the next one works.
PROXY_CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                         ("grpc.min_reconnect_backoff_ms", 200),
                         ("grpc.max_reconnect_backoff_ms", 1000)]
METRIC_CAMPAIGNS = 50
"""Campaigns exported as metrics (the newest)."""
SERVICE_NAMES = ("cms.v1.PsdRegistry", "cms.v1.Campaigns", "cms.v1.CardChannel", "cms.v1.Stock",
                 "cms.v1.Users", "cms.v1.Issuance")


class CampaignCollector:
    """Campaign and attention counts for Prometheus, read from the store at each scrape.

    ``cms_campaign_cards{campaign, name, status, state}``: cards done, pending,
    failed (they need an operator's attention) and in total for the newest
    campaigns, so a dashboard follows a campaign the way ``cms campaign status``
    does; ``cms_psd_attention{reason}``: cards that need attention, by reason,
    campaign or not (an alert on it is an alert that someone must act).
    """

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("cms_campaign_cards", "Cards of each campaign by state",
                                   labels=["campaign", "name", "status", "state"])
        try:
            campaigns = self.store.list_campaigns()
        except Exception:  # a scrape must not fail because the database is busy
            campaigns = []
        campaigns = sorted(campaigns, key=lambda c: c.created)[-METRIC_CAMPAIGNS:]
        for c in campaigns:
            for state, value in (("done", c.done), ("pending", c.pending),
                                 ("failed", c.failed), ("total", c.total)):
                family.add_metric([c.campaign_id, c.name, c.state.value, state], value)
        yield family
        attention = GaugeMetricFamily("cms_psd_attention",
                                      "Cards that need an operator's attention, by reason",
                                      labels=["reason"])
        try:
            counts = self.store.attention_counts()
        except Exception:  # as above: the scrape goes on without it
            counts = {}
        for reason, value in sorted(counts.items()):
            attention.add_metric([reason], value)
        yield attention
        yield from stock_metrics(self.store)


def stock_metrics(store: Store):
    """``cms_stock_cards{pack, state}``: the issuer's blank cards per pack and state (seed
    004), so a dashboard sees the stock run low; ``cms_packs_imported``: packs in stock;
    ``cms_issuance_cards{state}``: cards issued to users, at the bureau, personalized or
    failed."""
    from prometheus_client.core import GaugeMetricFamily

    cards = GaugeMetricFamily("cms_stock_cards", "Cards of the issuer's stock by pack and state",
                              labels=["pack", "state"])
    try:
        counts = store.stock_counts()
    except Exception:  # as for the campaigns: the scrape goes on without it
        counts = []
    for pack in counts:
        for state, value in pack.counts.items():
            cards.add_metric([pack.pack_serial, state.value], value)
    yield cards
    yield GaugeMetricFamily("cms_packs_imported", "Packs imported into the issuer's stock",
                            value=len(counts))
    issued = GaugeMetricFamily("cms_issuance_cards",
                               "Cards issued to users, by state (failed: the bureau said so)",
                               labels=["state"])
    try:
        states = store.issuance_counts()
    except Exception:  # as above
        states = {}
    for state, value in states.items():
        issued.add_metric([state.value], value)
    yield issued


class _NoProxy:
    """CardKeys without a proxy configured: every call is Unavailable (a clear outcome)."""

    def __getattr__(self, name: str) -> Callable[..., object]:
        def unavailable(*_args: object, **_kwargs: object) -> object:
            raise Unavailable("no HSM proxy configured (proxy.address)")
        return unavailable


class AccessServer:
    """The running access server: store, proxy channel and gRPC service."""

    def __init__(self, cfg: AccessConfig, ready_file: Path | None = None) -> None:
        self.cfg = cfg
        self.store = Store.from_url(cfg.database_url)
        self.proxy = (secure_channel(cfg.proxy_address, cfg.tls, options=PROXY_CHANNEL_OPTIONS)
                      if cfg.proxy_address else None)
        # One stub for every contact: making one builds a callable per method.
        # The contacts' channels travel together to the proxy (channel_opener).
        self._card_keys = (ChannelOpener(CardKeysStub(self.proxy)) if self.proxy is not None
                           else _NoProxy())
        self.key_mgmt = (secure_channel(cfg.key_mgmt_address, cfg.tls, server_identity=KEY_MGMT,
                                        options=PROXY_CHANNEL_OPTIONS)
                         if cfg.key_mgmt_address else None)
        self.masters = UsableMasters(
            key_blocks_pb2_grpc.KeyBlocksStub(self.proxy) if self.proxy is not None
            else _NoProxy(),
            key_mgmt_pb2_grpc.KeyManagementStub(self.key_mgmt) if self.key_mgmt is not None
            else None, ttl=cfg.masters_cache_seconds)
        settings = ServerSettings(
            listen=cfg.listen, metrics_listen=cfg.metrics_listen, tls=cfg.tls,
            max_workers=cfg.max_workers, ready_file=ready_file, keepalive=cfg.keepalive,
            require_client_auth=not cfg.allow_agents_without_certificate)
        # An asyncio server: a card channel stream waiting for its agent holds
        # no thread; the contacts' store and proxy calls run in these threads,
        # the operator services in the server's own (max_workers).
        self._flow_threads = LoopThreads(cfg.flow_workers, "card-flow")
        self.card_channel: CardChannelServicer | None = None
        self.service = AsyncGrpcService("access-server", settings, self._register,
                                        on_stop=self._shutdown)
        self._collector = CampaignCollector(self.store)
        REGISTRY.register(self._collector)

    def mk_versions_in_hsm1(self) -> set[int]:
        """MK versions key management transferred to HSM1 (see access_server.masters)."""
        if self.proxy is None:
            raise Unavailable("no HSM proxy configured (proxy.address)")
        return self.masters.versions(keynames.MK, fresh=True)

    def install_versions(self) -> tuple[int, int, int]:
        """Newest usable MK, MKRK and cryptogram key versions, for a new installation."""
        if self.proxy is None:
            raise Unavailable("no HSM proxy configured (proxy.address)")
        return (self.masters.newest(keynames.MK), self.masters.newest(keynames.MKRK),
                self.masters.newest(keynames.CRYPTOGRAM))

    def flow_context(self, actor: str) -> FlowContext:
        return FlowContext(store=self.store, card_keys=self._card_keys,
                           install_versions=self.install_versions, actor=actor,
                           require_usable=self.masters.require,
                           # The same agent (identity and label) coming back after a
                           # crash takes over its own lease; another agent waits.
                           lease_holder=actor,
                           lease_seconds=self.cfg.lease_seconds, levels=self.cfg.levels)

    def _register(self, server: grpc.Server) -> list[str]:
        access_pb2_grpc.add_PsdRegistryServicer_to_server(PsdRegistryServicer(self.store), server)
        access_pb2_grpc.add_CampaignsServicer_to_server(
            CampaignsServicer(self.store, self.mk_versions_in_hsm1), server)
        self.card_channel = CardChannelServicer(
            self.flow_context, self.cfg.allow_agents_without_certificate,
            threads=self._flow_threads,
            timeouts=ChannelTimeouts(self.cfg.hello_timeout_seconds,
                                     self.cfg.answer_timeout_seconds),
            limits=self.cfg.stream_limits)
        card_channel_pb2_grpc.add_CardChannelServicer_to_server(self.card_channel, server)
        stock_pb2_grpc.add_StockServicer_to_server(StockServicer(self.store), server)
        issuance_pb2_grpc.add_UsersServicer_to_server(UsersServicer(self.store), server)
        issuer_hsm = (issuer_pb2_grpc.IssuerHsmStub(self.proxy) if self.proxy is not None
                      else _NoProxy())
        issuance_pb2_grpc.add_IssuanceServicer_to_server(
            IssuanceServicer(self.store, issuer_hsm), server)
        return list(SERVICE_NAMES)

    async def _shutdown(self) -> None:
        """Once the gRPC server has stopped: the contacts' flows end (their leases
        released) before the store they write to closes."""
        if self.card_channel is not None:
            await self.card_channel.wait_closed(self.service.settings.grace_seconds)
        self._flow_threads.shutdown(wait=True)
        self._stop()

    def _stop(self) -> None:
        REGISTRY.unregister(self._collector)
        if self.proxy is not None:
            self.proxy.close()
        if self.key_mgmt is not None:
            self.key_mgmt.close()
        self.store.close()

    def run(self) -> int:
        return self.service.run()


def serve(config_path: Path, ready_file: Path | None = None) -> int:
    cfg = load_config(config_path)
    setup_logging("access-server", cfg.log_level, cfg.log_file)
    log.info("starting", extra=fields(config=str(cfg.path), proxy=cfg.proxy_address))
    return AccessServer(cfg, ready_file).run()
