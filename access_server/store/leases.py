"""Card sessions' leases: who works on a card now, and until when.

A card agent's session holds the card's lease while it works on the card,
so two sessions (two agents, or an agent and a retry) never drive the same
card at once; a lease whose expiry has passed is free, so a crashed session
cannot lock a card out for longer than its ttl. A contact takes the lease in
``Store.start_contact``; these are the lease on its own and the last-contact
time. None of them bumps the card's row version: they change nothing a
journaled step depends on.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import update

from access_server.store import cards
from access_server.store import validate as v
from access_server.store.models import PsdRow
from access_server.store.records import PsdRecord, PsdState
from access_server.store.transactions import Transactions
from cms.runtime.errors import InvalidArgument

MAX_LEASE_SECONDS = 3600
"""A card session that needs longer renews its lease."""


class Leases(Transactions):
    """The store's lease operations."""

    def acquire_lease(self, psd_id: str, holder: str, ttl_seconds: float) -> bool:
        """Take (or renew) the card's session lease; False while another holds it."""
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        ttl = lease_ttl(ttl_seconds)
        with self._write() as session:
            now = self._now()
            result = session.execute(
                update(PsdRow)
                .where(
                    PsdRow.psd_id == psd_id,
                    (PsdRow.lease_holder.is_(None))
                    | (PsdRow.lease_holder == holder)
                    | (PsdRow.lease_expires <= now),
                )
                .values(lease_holder=holder, lease_expires=now + ttl)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                return True
            cards.read_card(session.connection(), psd_id)
            return False

    def release_lease(self, psd_id: str, holder: str) -> bool:
        """Give the lease back; False (and no change) if ``holder`` does not hold it."""
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        with self._write() as session:
            result = session.execute(
                update(PsdRow)
                .where(PsdRow.psd_id == psd_id, PsdRow.lease_holder == holder)
                .values(lease_holder=None, lease_expires=None)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount == 1:
                return True
            cards.read_card(session.connection(), psd_id)
            return False

    def touch_contact(self, psd_id: str) -> datetime:
        """Record that the card's agent is in contact now; returns the time stored."""
        psd_id = v.psd_id(psd_id)
        with self._write() as session:
            now = self._now()
            result = session.execute(
                update(PsdRow)
                .where(PsdRow.psd_id == psd_id)
                .values(last_contact=now)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:
                raise cards.not_registered(psd_id)
            return now


def lease_free(card: PsdRecord, holder: str, now: datetime) -> bool:
    """Whether ``holder`` may take the card's lease at ``now`` (never on a revoked card)."""
    return card.state is not PsdState.REVOKED and (
        card.lease_holder is None or card.lease_holder == holder
        or card.lease_expires is None or card.lease_expires <= now)


def lease_ttl(ttl_seconds: object) -> timedelta:
    """A lease's time to live, checked."""
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise InvalidArgument("ttl_seconds must be a number")
    if not 0 < ttl_seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(f"ttl_seconds must be in (0, {MAX_LEASE_SECONDS}]")
    return timedelta(seconds=ttl_seconds)
