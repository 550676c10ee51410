"""The access server's durable store: PSD registry, intent journal, campaigns.

Crash safety rests on three habits the flows follow and this store makes
cheap and hard to get wrong:

1. Journal first. ``begin_install`` commits the card's cryptogram (R under
   the cryptogram key pair) and an open *intent* before anything is written
   to the card; ``begin_replacement`` commits the intent before the new MK
   goes in. Each returns only after the commit is durable.
2. One transaction per step. Every method is one transaction: it either
   happened completely or not at all, and a caller never sees a half state.
3. Reconcile on contact. After a crash, the next session probes the card and
   calls ``reconcile`` with what the card holds; the row is set to agree and
   the open intent is closed as done or abandoned, in one transaction.

The cryptogram is never deleted: only a new installation, on a card that
still holds its transport keys, replaces it. So no sequence of calls can
leave an installed MKRK without the value that reproduces it.

Concurrency: a write transaction on SQLite starts with BEGIN IMMEDIATE (one
writer at a time); on PostgreSQL it locks the card's row FOR UPDATE before
reading it. Card rows also carry a row version that every update checks and
bumps (``cards.update_card``, the one writer of a card's journaled state),
so a lost update surfaces as Aborted rather than silently.

``Store`` is assembled from one part per concern, each in its own module:
``registry`` (cards registered, listed, revoked, flagged for an operator),
``contacts`` (what a contact reads, journals and completes, and reconcile),
``leases``, ``campaigns``, ``stock`` (the issuer's blank cards, seed 004) and
``issuance`` (users, their cards, the bureau's results), ``activations``
(online issuance's codes, for the user's own PC);
``transactions`` is the base they share.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from types import TracebackType

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from access_server.migrations import MIGRATIONS_DIR
from access_server.store.activations import Activations
from access_server.store.campaigns import Campaigns
from access_server.store.contacts import Contacts
from access_server.store.issuance import Issuance
from access_server.store.leases import Leases
from access_server.store.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from access_server.store.registry import Registry
from access_server.store.stock import Stock
from access_server.store.transactions import utc_now

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "Store", "utc_now"]

MIGRATION_LOCK_KEY = 0x434D5341
"""PostgreSQL advisory lock: replicas starting together migrate one at a time."""

_MIGRATING = threading.Lock()
"""Alembic's ``context`` and ``op`` are process-wide: one migration at a time per process."""


class Store(Registry, Contacts, Leases, Campaigns, Stock, Issuance, Activations):
    """Repository of the access server. Thread safe; one instance per process.

    ``clock`` returns aware datetimes; tests pass a fake one to move time
    (lease expiry) without sleeping.
    """

    @classmethod
    def from_url(
        cls, url: str, *, migrate: bool = True, clock: Callable[[], datetime] = utc_now
    ) -> Store:
        store = cls(url, clock=clock)
        if migrate:
            try:
                store.migrate()
            except BaseException:
                store.close()
                raise
        return store

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def migrate(self) -> None:
        """Bring the schema to the newest revision (idempotent, safe to race)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with _MIGRATING, self._guard(), self._writer.begin() as connection:
            if self._postgres:
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
