"""Durable store of the access server: PSD registry, intent journal, campaigns.

``Store`` is the only entry point; it hands out the frozen dataclasses of
``records`` and raises ``cms.runtime.errors.ServiceError`` subclasses.
SQLite by default (``sqlite:///path``), PostgreSQL for production
(``postgresql+psycopg://...``); the schema is migrated by Alembic from
``access_server/migrations``.
"""

from access_server.store.records import (
    ActivationRecord,
    ActivationState,
    BureauRecord,
    Campaign,
    CampaignItem,
    CampaignState,
    CardDispatched,
    CardResult,
    ContactStart,
    Cryptogram,
    Intent,
    IntentKind,
    IntentStatus,
    IssuanceRecord,
    IssuanceState,
    IssuedCard,
    ItemPage,
    ItemStatus,
    NewActivation,
    PackRecord,
    PackStock,
    PreparedCard,
    ProviderRecord,
    PsdEvent,
    PsdPage,
    PsdRecord,
    PsdState,
    RegisterOutcome,
    StockCard,
    StockState,
    UserRecord,
)
from access_server.store.store import Store

__all__ = [
    "ActivationRecord",
    "ActivationState",
    "BureauRecord",
    "Campaign",
    "CampaignItem",
    "CampaignState",
    "CardDispatched",
    "CardResult",
    "ContactStart",
    "Cryptogram",
    "Intent",
    "IntentKind",
    "IntentStatus",
    "IssuanceRecord",
    "IssuanceState",
    "IssuedCard",
    "ItemPage",
    "ItemStatus",
    "NewActivation",
    "PackRecord",
    "PackStock",
    "PreparedCard",
    "ProviderRecord",
    "PsdEvent",
    "PsdPage",
    "PsdRecord",
    "PsdState",
    "RegisterOutcome",
    "StockCard",
    "StockState",
    "Store",
    "UserRecord",
]
