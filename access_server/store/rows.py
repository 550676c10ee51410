"""Session-level helpers shared by the store's operations.

Everything here runs inside a transaction the Store opened. Lock order, to
keep PostgreSQL free of deadlocks: a card's ``psd`` row first, then a
``campaign`` row, then ``campaign_item`` rows. (SQLite has one writer at a
time, and ``FOR UPDATE`` is simply not rendered there.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from access_server.store.driver import Sql, execute
from access_server.store.models import (
    CampaignItemRow,
    CampaignRow,
    IntentRow,
    PsdEventRow,
    PsdRow,
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
from cms.runtime.errors import FailedPrecondition, NotFound

LIVE_CAMPAIGN_STATES = (CampaignState.RUNNING.value, CampaignState.PAUSED.value)
"""Campaigns whose pending items still wait for their cards."""


def psd_record(row: PsdRow) -> PsdRecord:
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


def intent_record(row: IntentRow) -> Intent:
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


def not_registered(psd_id: str) -> NotFound:
    return NotFound(f"PSD {psd_id} is not registered")


def lock_psd(session: Session, psd_id: str) -> PsdRow:
    """The card's row, locked for the rest of the transaction; NotFound if absent."""
    row = session.scalars(
        select(PsdRow).where(PsdRow.psd_id == psd_id).with_for_update()
    ).one_or_none()
    if row is None:
        raise not_registered(psd_id)
    return row


def get_psd(session: Session, psd_id: str) -> PsdRow:
    row = session.get(PsdRow, psd_id)
    if row is None:
        raise not_registered(psd_id)
    return row


def refuse_revoked(row: PsdRow, action: str) -> None:
    if row.state == PsdState.REVOKED.value:
        raise FailedPrecondition(
            f"PSD {row.psd_id} is revoked: the server does no further work on it ({action})"
        )


def expect_state(row: Any, state: PsdState) -> None:
    """FailedPrecondition unless the card's row (ORM or Core) is in ``state``."""
    if row.state != state.value:
        raise FailedPrecondition(f"PSD {row.psd_id} is {row.state}, not {state.value}")


def add_event(
    session: Session, psd_id: str, at: datetime, event: str, detail: str, actor: str
) -> None:
    session.add(PsdEventRow(psd_id=psd_id, at=at, event=event, detail=detail, actor=actor))


def open_intent_row(session: Session, psd_id: str) -> IntentRow | None:
    return session.scalars(
        select(IntentRow).where(
            IntentRow.psd_id == psd_id, IntentRow.status == IntentStatus.OPEN.value
        )
    ).one_or_none()


def checked_open_intent(
    session: Session, psd_id: str, intent_id: int, kind: IntentKind | None
) -> IntentRow:
    """The open intent ``intent_id`` of this card (of ``kind`` if given), or why not."""
    return check_open_intent(session.get(IntentRow, intent_id), psd_id, intent_id, kind)


def check_open_intent(intent: Any, psd_id: str, intent_id: int, kind: IntentKind | None) -> Any:
    """``intent`` (an ORM or a Core row, or None) if it is the open intent asked for, or why not."""
    if intent is None or intent.psd_id != psd_id:
        raise NotFound(f"intent {intent_id} of PSD {psd_id} not found")
    if intent.status != IntentStatus.OPEN.value:
        raise FailedPrecondition(
            f"intent {intent_id} of PSD {psd_id} is {intent.status}, not open"
        )
    if kind is not None and intent.kind != kind.value:
        raise FailedPrecondition(
            f"intent {intent_id} of PSD {psd_id} is an {intent.kind} intent, not {kind.value}"
        )
    return intent


def close_intent(intent: IntentRow, status: IntentStatus, now: datetime) -> None:
    intent.status = status.value
    intent.updated = now


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


_ANY_OPEN_IN_CAMPAIGN = Sql(
    "SELECT psd_id FROM campaign_item WHERE campaign_id = :campaign_id "
    "AND status IN ({pending}, {failed}) LIMIT 1",
    literals={"pending": ItemStatus.PENDING.value, "failed": ItemStatus.FAILED.value})
_COMPLETE_CAMPAIGN = Sql(
    "UPDATE campaign SET state = {completed}, updated = :updated "
    "WHERE campaign_id = :campaign_id", literals={"completed": CampaignState.COMPLETED.value})


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


def settle_items(session: Session, row: PsdRow, now: datetime) -> None:
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


def _settled_status(row: PsdRow, campaign: CampaignRow) -> tuple[ItemStatus, str | None] | None:
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
