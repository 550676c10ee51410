"""Records from rows, and the ORM's helpers for campaign items, shared by the store's parts.

Everything here runs inside a transaction the Store opened; the card's row,
its intents and its history have their helpers in ``cards``. Lock order, to
keep PostgreSQL free of deadlocks: a card's ``psd`` row first, then a
``campaign`` row, then ``campaign_item`` rows. (SQLite has one writer at a
time, and ``FOR UPDATE`` is simply not rendered there.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from access_server.store.driver import Statement, execute, fixed
from access_server.store.models import (
    CampaignItemRow,
    CampaignRow,
)
from access_server.store.records import (
    Campaign,
    CampaignItem,
    CampaignState,
    Intent,
    IntentKind,
    IntentStatus,
    ItemStatus,
    PsdRecord,
    PsdState,
)
from access_server.store.validate import MAX_DETAIL
from cms.runtime.errors import NotFound

LIVE_CAMPAIGN_STATES = (CampaignState.RUNNING.value, CampaignState.PAUSED.value)
"""Campaigns whose pending items still wait for their cards."""


def psd_record(row: Any) -> PsdRecord:
    """The record of a ``psd`` row (an ORM row, or one the contact path read)."""
    return PsdRecord(
        psd_id=row.psd_id,
        state=PsdState(row.state),
        mk_version=row.mk_version,
        mkrk_version=row.mkrk_version,
        pending_mk_version=row.pending_mk_version,
        # The label is set exactly when the cryptogram is (a CHECK says so),
        # and reading it avoids loading the ciphertext.
        has_cryptogram=row.cryptogram_key_label is not None,
        cryptogram_key_label=row.cryptogram_key_label,
        created=row.created,
        updated=row.updated,
        last_contact=row.last_contact,
        lease_holder=row.lease_holder,
        lease_expires=row.lease_expires,
        row_version=row.row_version,
        attention=row.attention,
        attention_detail=row.attention_detail,
        attention_since=row.attention_since,
    )


def intent_record(row: Any) -> Intent:
    """The record of an ``intent`` row (an ORM row, or one the contact path read)."""
    return Intent(
        intent_id=row.intent_id,
        psd_id=row.psd_id,
        kind=IntentKind(row.kind),
        from_version=row.from_version,
        to_version=row.to_version,
        mkrk_version=row.mkrk_version,
        status=IntentStatus(row.status),
        campaign_id=row.campaign_id,
        created=row.created,
        updated=row.updated,
    )


def campaign_record(row: CampaignRow, counts: Counter[str]) -> Campaign:
    total = sum(counts.values())
    return Campaign(
        campaign_id=row.campaign_id,
        name=row.name,
        from_version=row.from_version,
        to_version=row.to_version,
        state=CampaignState(row.state),
        psd_id_prefix=row.psd_id_prefix,
        listed_ids=row.listed_ids,
        created_by=row.created_by,
        total=total,
        done=counts[ItemStatus.DONE.value],
        pending=counts[ItemStatus.PENDING.value],
        failed=counts[ItemStatus.FAILED.value],
        skipped=counts[ItemStatus.SKIPPED.value],
        created=row.created,
        updated=row.updated,
    )


def item_record(item: CampaignItemRow, campaign: CampaignRow) -> CampaignItem:
    return CampaignItem(
        campaign_id=item.campaign_id,
        psd_id=item.psd_id,
        status=ItemStatus(item.status),
        attempts=item.attempts,
        last_error=item.last_error,
        updated=item.updated,
        from_version=campaign.from_version,
        to_version=campaign.to_version,
    )


def item_counts(session: Session, campaign_ids: Iterable[str]) -> dict[str, Counter[str]]:
    """Item counts by status for each campaign, in one grouped query."""
    ids = list(campaign_ids)
    counts: dict[str, Counter[str]] = {cid: Counter() for cid in ids}
    if not ids:
        return counts
    rows = session.execute(
        select(CampaignItemRow.campaign_id, CampaignItemRow.status, func.count())
        .where(CampaignItemRow.campaign_id.in_(ids))
        .group_by(CampaignItemRow.campaign_id, CampaignItemRow.status)
    )
    for campaign_id, status, count in rows:
        counts[campaign_id][status] = count
    return counts


def lock_campaign(session: Session, campaign_id: str) -> CampaignRow:
    row = session.scalars(
        select(CampaignRow)
        .where(CampaignRow.campaign_id == campaign_id)
        .with_for_update()
    ).one_or_none()
    if row is None:
        raise NotFound(f"campaign {campaign_id} not found")
    return row


def lock_item(session: Session, campaign_id: str, psd_id: str) -> CampaignItemRow:
    item = session.scalars(
        select(CampaignItemRow)
        .where(CampaignItemRow.campaign_id == campaign_id, CampaignItemRow.psd_id == psd_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one_or_none()
    if item is None:
        raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
    return item


_ITEM = CampaignItemRow.__table__
_CAMPAIGN = CampaignRow.__table__
_ANY_OPEN_IN_CAMPAIGN = Statement(
    select(_ITEM.c.psd_id)
    .where(_ITEM.c.campaign_id == bindparam("campaign_id", type_=_ITEM.c.campaign_id.type),
           _ITEM.c.status.in_([fixed(_ITEM.c.status, ItemStatus.PENDING.value),
                               fixed(_ITEM.c.status, ItemStatus.FAILED.value)]))
    .limit(1))
_COMPLETE_CAMPAIGN = Statement(
    update(_CAMPAIGN)
    .where(_CAMPAIGN.c.campaign_id == bindparam("campaign_id", type_=_CAMPAIGN.c.campaign_id.type))
    .values(state=CampaignState.COMPLETED.value,
            updated=bindparam("updated", type_=_CAMPAIGN.c.updated.type)))


def complete_campaign_if_drained(conn: Connection, campaign_id: str, state: str,
                                 now: datetime) -> bool:
    """A live campaign with no item left pending or failed is completed; True if it just was.

    A failed item is a card that needs an operator's attention: the campaign
    waits for it (the operator clears the card, which is then retried, or
    revokes it, which skips it) as it waits for a pending one. The one statement
    of the rule, for the ORM paths and the per-contact driver ones alike. The
    caller holds the campaign row lock and has written its item changes, so
    two transactions finishing the last two items cannot both miss each
    other's update.
    """
    if state not in LIVE_CAMPAIGN_STATES:
        return False
    campaign = {"campaign_id": campaign_id}
    if execute(conn, _ANY_OPEN_IN_CAMPAIGN, campaign).one_or_none() is not None:
        return False
    execute(conn, _COMPLETE_CAMPAIGN, {**campaign, "updated": now})
    return True


def complete_if_drained(session: Session, campaign: CampaignRow, now: datetime) -> None:
    """``complete_campaign_if_drained`` for a locked ORM campaign row (kept in step)."""
    session.flush()
    if complete_campaign_if_drained(session.connection(), campaign.campaign_id,
                                    campaign.state, now):
        # Already written: the session learns it without flushing it again.
        set_committed_value(campaign, "state", CampaignState.COMPLETED.value)
        set_committed_value(campaign, "updated", now)


def abandon_campaign_attempt(session: Session, intent: Intent, reason: str,
                             now: datetime) -> None:
    """An abandoned campaign attempt leaves its item pending (retried on next contact)."""
    if intent.campaign_id is None:
        return
    lock_campaign(session, intent.campaign_id)
    item = lock_item(session, intent.campaign_id, intent.psd_id)
    item.last_error = reason[:MAX_DETAIL]
    item.updated = now


def set_item(
    session: Session,
    campaign: CampaignRow,
    item: CampaignItemRow,
    status: ItemStatus,
    error: str | None,
    now: datetime,
) -> None:
    item.status = status.value
    item.last_error = error
    item.updated = now
    complete_if_drained(session, campaign, now)


def settle_items(session: Session, row: PsdRecord, now: datetime) -> None:
    """Close a card's pending or failed campaign item that its new state has made moot.

    Called after a card's MK version or state changed outside (or alongside)
    a campaign: an item whose target the card already holds is done; one
    whose starting version the card no longer holds, or on a revoked card,
    is skipped. So a pending item always names a card that still needs it,
    and a failed one (needing attention) a card that still has it to do.
    """
    pending = session.execute(
        select(CampaignItemRow.campaign_id).where(
            CampaignItemRow.psd_id == row.psd_id,
            CampaignItemRow.status.in_((ItemStatus.PENDING.value, ItemStatus.FAILED.value)),
        )
    ).scalars().all()
    for campaign_id in pending:
        campaign = lock_campaign(session, campaign_id)
        outcome = _settled_status(row, campaign)
        if outcome is None:
            continue
        item = lock_item(session, campaign_id, row.psd_id)
        status, reason = outcome
        set_item(session, campaign, item, status, reason, now)


def _settled_status(row: PsdRecord, campaign: CampaignRow) -> tuple[ItemStatus, str | None] | None:
    if row.state == PsdState.REVOKED.value:
        return ItemStatus.SKIPPED, "card revoked"
    if row.state != PsdState.ACTIVE.value:
        return None
    if row.mk_version == campaign.to_version:
        return ItemStatus.DONE, None
    if row.mk_version != campaign.from_version:
        return ItemStatus.SKIPPED, (
            f"card holds MK v{row.mk_version}, no longer v{campaign.from_version}"
        )
    return None
