"""Campaigns: the store's campaign operations, and what they do in their transaction.

A campaign snapshots, when it starts, the cards it will move from one MK
version to another: one ``campaign_item`` per card. Cards are then updated
as their agents connect (``Store.campaign_work_for`` tells the flow).

A card that needs an operator's attention (``psd.attention``) is part of the
campaign as a failed item with its reason, and the campaign completes only
once no item is pending or failed: it waits for the operator as for a card.

Overlap rule: a card waits in at most one campaign at a time. Starting a
campaign whose cards include one that is pending in another running or
paused campaign is refused with FailedPrecondition naming that campaign;
the operator cancels it or lets it finish first. Two campaigns racing for
the same card would otherwise move it to whichever target version connects
first, and the other campaign's count would be wrong. A partial unique index
(one pending item per card) enforces the rule in the database as well.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, case, func, insert, literal, null, select, text
from sqlalchemy.orm import Session

from access_server.store import paging, rows
from access_server.store import validate as v
from access_server.store.models import CampaignItemRow, CampaignRow, PsdRow, UtcDateTime
from access_server.store.records import (
    Campaign,
    CampaignItem,
    CampaignState,
    ItemPage,
    ItemStatus,
    PsdState,
)
from access_server.store.transactions import Transactions
from cms.runtime.errors import FailedPrecondition, InvalidArgument, NotFound

MAX_CAMPAIGN_IDS = 100_000

CHUNK = 500
"""Ids per IN (...) list: well under SQLite's bound-parameter limit."""

START_LOCK_KEY = 0x434D5343
"""PostgreSQL advisory lock that serializes campaign starts (SQLite has one writer anyway)."""

SHOWN_IDS = 5
"""How many offending ids an error message lists."""

TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "pause": ((CampaignState.RUNNING.value,), CampaignState.PAUSED.value),
    "resume": ((CampaignState.PAUSED.value,), CampaignState.RUNNING.value),
    "cancel": (
        (CampaignState.RUNNING.value, CampaignState.PAUSED.value),
        CampaignState.CANCELLED.value,
    ),
}
"""Operator transition -> (states it is allowed from, state it leads to)."""

CANCELLED_REASON = "campaign cancelled"


def chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def start(
    session: Session,
    *,
    name: str,
    from_version: int,
    to_version: int,
    psd_ids: Sequence[str] | None,
    prefix: str | None,
    actor: str,
    now: datetime,
) -> str:
    """Create the campaign and its items; returns the new campaign id."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": START_LOCK_KEY})
    if psd_ids is not None:
        _refuse_unknown(session, psd_ids)
    matches = list(_match_clauses(from_version, prefix, psd_ids))
    _refuse_overlap(session, matches)
    campaign_id = uuid.uuid4().hex
    session.add(
        CampaignRow(
            campaign_id=campaign_id,
            name=name,
            from_version=from_version,
            to_version=to_version,
            psd_id_prefix=prefix,
            listed_ids=None if psd_ids is None else len(psd_ids),
            state=CampaignState.RUNNING.value,
            created_by=actor,
            created=now,
            updated=now,
        )
    )
    session.flush()
    added = sum(_snapshot(session, campaign_id, match, now) for match in matches)
    if added == 0:
        raise FailedPrecondition(
            f"no active card with MK v{from_version} matches the campaign's filter"
        )
    if psd_ids is not None:
        _skip_unmatched(session, campaign_id, psd_ids, from_version, prefix, now)
    return campaign_id


def _match_clauses(
    from_version: int, prefix: str | None, psd_ids: Sequence[str] | None
) -> Iterator[ColumnElement[bool]]:
    """WHERE clauses (one per chunk of listed ids) selecting the campaign's cards."""
    base = [PsdRow.state == PsdState.ACTIVE.value, PsdRow.mk_version == from_version]
    if prefix is not None:
        base.append(PsdRow.psd_id.startswith(prefix, autoescape=True))
    if psd_ids is None:
        yield and_(*base)
        return
    for chunk in chunks(psd_ids):
        yield and_(*base, PsdRow.psd_id.in_(chunk))


def _refuse_unknown(session: Session, psd_ids: Sequence[str]) -> None:
    known: set[str] = set()
    for chunk in chunks(psd_ids):
        known.update(session.scalars(select(PsdRow.psd_id).where(PsdRow.psd_id.in_(chunk))))
    unknown = [p for p in psd_ids if p not in known]
    if unknown:
        shown = ", ".join(unknown[:SHOWN_IDS])
        more = f" and {len(unknown) - SHOWN_IDS} more" if len(unknown) > SHOWN_IDS else ""
        raise NotFound(f"{len(unknown)} listed PSD(s) are not registered: {shown}{more}")


def _refuse_overlap(session: Session, matches: list[ColumnElement[bool]]) -> None:
    conflicts: dict[str, int] = {}
    for match in matches:
        query = (
            select(CampaignItemRow.campaign_id, func.count())
            .join(PsdRow, PsdRow.psd_id == CampaignItemRow.psd_id)
            .where(CampaignItemRow.status == ItemStatus.PENDING.value, match)
            .group_by(CampaignItemRow.campaign_id)
        )
        for campaign_id, count in session.execute(query):
            conflicts[campaign_id] = conflicts.get(campaign_id, 0) + count
    if not conflicts:
        return
    found = session.execute(
        select(CampaignRow.campaign_id, CampaignRow.name).where(
            CampaignRow.campaign_id.in_(list(conflicts))
        )
    )
    names = {campaign_id: name for campaign_id, name in found}
    described = "; ".join(
        f"{count} card(s) in campaign {names.get(cid, '?')!r} ({cid})"
        for cid, count in sorted(conflicts.items())
    )
    raise FailedPrecondition(
        "cards of this campaign are already waiting in another campaign: "
        f"{described}; cancel it or let it complete first"
    )


def _snapshot(session: Session, campaign_id: str, match: ColumnElement[bool], now: datetime) -> int:
    """The matching cards' items: pending, or failed with its reason for a card that
    needs an operator (it is part of the campaign, and counts as needing attention)."""
    flagged = PsdRow.attention.is_not(None)
    source = select(
        literal(campaign_id),
        PsdRow.psd_id,
        case((flagged, literal(ItemStatus.FAILED.value)),
             else_=literal(ItemStatus.PENDING.value)),
        literal(0),
        case((flagged, PsdRow.attention_detail), else_=null()),
        literal(now, UtcDateTime),
    ).where(match)
    statement = insert(CampaignItemRow).from_select(
        ["campaign_id", "psd_id", "status", "attempts", "last_error", "updated"], source
    )
    # SQLAlchemy keeps the row count of an INSERT only when asked to.
    result = session.execute(statement, execution_options={"preserve_rowcount": True})
    return int(result.rowcount)  # type: ignore[attr-defined]


def _skip_unmatched(
    session: Session,
    campaign_id: str,
    psd_ids: Sequence[str],
    from_version: int,
    prefix: str | None,
    now: datetime,
) -> None:
    """Listed cards that do not qualify appear as skipped items, with the reason."""
    for chunk in chunks(psd_ids):
        found = session.execute(
            select(PsdRow.psd_id, PsdRow.state, PsdRow.mk_version).where(
                PsdRow.psd_id.in_(chunk)
            )
        ).all()
        skipped = [
            {
                "campaign_id": campaign_id,
                "psd_id": psd_id,
                "status": ItemStatus.SKIPPED.value,
                "attempts": 0,
                "last_error": reason,
                "updated": now,
            }
            for psd_id, state, mk_version in found
            if (reason := _unmatched_reason(psd_id, state, mk_version, from_version, prefix))
        ]
        if skipped:
            session.execute(insert(CampaignItemRow), skipped)


def _unmatched_reason(
    psd_id: str, state: str, mk_version: int | None, from_version: int, prefix: str | None
) -> str | None:
    if prefix is not None and not psd_id.startswith(prefix):
        return f"PSD id does not start with {prefix}"
    if state != PsdState.ACTIVE.value:
        return f"card was {state} when the campaign started"
    if mk_version != from_version:
        return f"card held MK v{mk_version}, not v{from_version}, when the campaign started"
    return None


def transition(session: Session, campaign_id: str, action: str, now: datetime) -> None:
    allowed, target = TRANSITIONS[action]
    campaign = rows.lock_campaign(session, campaign_id)
    if campaign.state not in allowed:
        raise FailedPrecondition(
            f"cannot {action} campaign {campaign_id}: it is {campaign.state}"
        )
    campaign.state = target
    campaign.updated = now
    if target == CampaignState.CANCELLED.value:
        pending = session.scalars(
            select(CampaignItemRow)
            .where(
                CampaignItemRow.campaign_id == campaign_id,
                CampaignItemRow.status == ItemStatus.PENDING.value,
            )
            .with_for_update()
        )
        for item in pending:
            item.status = ItemStatus.SKIPPED.value
            item.last_error = CANCELLED_REASON
            item.updated = now


def mark(
    session: Session,
    campaign_id: str,
    psd_id: str,
    status: ItemStatus,
    error: str | None,
    now: datetime,
) -> tuple[CampaignItemRow, CampaignRow]:
    campaign = rows.lock_campaign(session, campaign_id)
    item = rows.lock_item(session, campaign_id, psd_id)
    if status is ItemStatus.PENDING and campaign.state not in rows.LIVE_CAMPAIGN_STATES:
        raise FailedPrecondition(
            f"campaign {campaign_id} is {campaign.state}: its items cannot be reopened"
        )
    if status is ItemStatus.PENDING and item.status != ItemStatus.PENDING.value:
        _refuse_pending_elsewhere(session, campaign_id, psd_id)
    rows.set_item(session, campaign, item, status, error, now)
    return item, campaign


def _refuse_pending_elsewhere(session: Session, campaign_id: str, psd_id: str) -> None:
    other = session.scalar(
        select(CampaignItemRow.campaign_id).where(
            CampaignItemRow.psd_id == psd_id,
            CampaignItemRow.status == ItemStatus.PENDING.value,
            CampaignItemRow.campaign_id != campaign_id,
        )
    )
    if other is not None:
        raise FailedPrecondition(
            f"PSD {psd_id} is already waiting in campaign {other}; a card waits in one "
            "campaign at a time"
        )


class Campaigns(Transactions):
    """The store's campaign operations."""

    def start_campaign(
        self,
        name: str,
        from_version: int,
        to_version: int,
        psd_ids: Sequence[str] | None = None,
        psd_id_prefix: str | None = None,
        *,
        actor: str,
    ) -> Campaign:
        """Snapshot the active cards at MK ``from_version`` that match the filter.

        ``psd_ids`` (empty means no list) and ``psd_id_prefix`` both narrow
        the set. Listed ids must be registered (NotFound otherwise); listed
        cards that do not qualify become skipped items with the reason. See
        the module's docstring for the overlap rule.
        """
        name = v.text("name", name, v.MAX_NAME)
        from_version = v.key_version("from_version", from_version)
        to_version = v.key_version("to_version", to_version)
        if from_version == to_version:
            raise InvalidArgument("to_version must differ from from_version")
        listed = _listed_ids(psd_ids)
        prefix = None if not psd_id_prefix else v.psd_id_prefix(psd_id_prefix)
        actor = v.actor(actor)
        with self._write() as session:
            campaign_id = start(
                session,
                name=name,
                from_version=from_version,
                to_version=to_version,
                psd_ids=listed,
                prefix=prefix,
                actor=actor,
                now=self._now(),
            )
            return _campaign(session, campaign_id)

    def get_campaign(self, campaign_id: str) -> Campaign:
        with self._read() as session:
            return _campaign(session, campaign_id)

    def list_campaigns(self, state: CampaignState | None = None) -> list[Campaign]:
        """All campaigns (or those in ``state``), oldest first, with counts."""
        query = select(CampaignRow).order_by(CampaignRow.created, CampaignRow.campaign_id)
        if state is not None:
            try:
                wanted = CampaignState(state)
            except ValueError:
                raise InvalidArgument(f"unknown campaign state {state!r}") from None
            query = query.where(CampaignRow.state == wanted.value)
        with self._read() as session:
            found = list(session.scalars(query))
            counts = rows.item_counts(session, (c.campaign_id for c in found))
            return [rows.campaign_record(c, counts[c.campaign_id]) for c in found]

    def pause_campaign(self, campaign_id: str) -> Campaign:
        return self._transition(campaign_id, "pause")

    def resume_campaign(self, campaign_id: str) -> Campaign:
        return self._transition(campaign_id, "resume")

    def cancel_campaign(self, campaign_id: str) -> Campaign:
        """Cancel: pending items become skipped; replacements in flight may still finish."""
        return self._transition(campaign_id, "cancel")

    def _transition(self, campaign_id: str, action: str) -> Campaign:
        with self._write() as session:
            transition(session, campaign_id, action, self._now())
            session.flush()
            return _campaign(session, campaign_id)

    def get_campaign_item(self, campaign_id: str, psd_id: str) -> CampaignItem:
        psd_id = v.psd_id(psd_id)
        with self._read() as session:
            campaign = session.get(CampaignRow, campaign_id)
            item = session.get(CampaignItemRow, (campaign_id, psd_id))
            if campaign is None or item is None:
                raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
            return rows.item_record(item, campaign)

    def list_campaign_items(
        self,
        campaign_id: str,
        status: ItemStatus | None = None,
        page_size: int = paging.DEFAULT_PAGE_SIZE,
        after: str = "",
    ) -> ItemPage:
        """One page of a campaign's items (``status`` only, if given) in PSD id order,
        starting after the PSD id ``after``; the PSD id the next page starts after
        ("" on the last page), and how many there are in all."""
        if status is not None:
            status = _item_status(status)
        size = paging.page_size(page_size)
        if after:
            after = v.psd_id(after)
        filters = [CampaignItemRow.campaign_id == campaign_id]
        if status is not None:
            filters.append(CampaignItemRow.status == status.value)
        with self._read() as session:
            campaign = session.get(CampaignRow, campaign_id)
            if campaign is None:
                raise NotFound(f"campaign {campaign_id} not found")
            total = session.scalar(select(func.count()).select_from(CampaignItemRow)
                                   .where(*filters))
            query = select(CampaignItemRow).where(*filters).order_by(CampaignItemRow.psd_id)
            if after:
                query = query.where(CampaignItemRow.psd_id > after)
            found = [rows.item_record(item, campaign)
                     for item in session.scalars(query.limit(size + 1))]
        more = len(found) > size
        return ItemPage(found[:size], found[size - 1].psd_id if more else "", int(total or 0))

    def mark_item(
        self, campaign_id: str, psd_id: str, status: ItemStatus, error: str | None = None
    ) -> CampaignItem:
        """Set an item's outcome (pending again retries it); completes a drained campaign."""
        psd_id = v.psd_id(psd_id)
        status = _item_status(status)
        if error is not None:
            error = v.text("error", error, v.MAX_DETAIL, required=False)
        with self._write() as session:
            item, campaign = mark(session, campaign_id, psd_id, status, error, self._now())
            return rows.item_record(item, campaign)


def _campaign(session: Session, campaign_id: str) -> Campaign:
    row = session.get(CampaignRow, campaign_id)
    if row is None:
        raise NotFound(f"campaign {campaign_id} not found")
    counts = rows.item_counts(session, [campaign_id])
    return rows.campaign_record(row, counts[campaign_id])


def _item_status(value: object) -> ItemStatus:
    try:
        return ItemStatus(value)
    except ValueError:
        raise InvalidArgument(f"unknown item status {value!r}") from None


def _listed_ids(psd_ids: Sequence[str] | None) -> list[str] | None:
    """Validated, de-duplicated listed ids in their given order; None for no list."""
    if not psd_ids:
        return None
    if isinstance(psd_ids, str):
        raise InvalidArgument("psd_ids must be a list of PSD ids, not a string")
    if len(psd_ids) > MAX_CAMPAIGN_IDS:
        raise InvalidArgument(f"at most {MAX_CAMPAIGN_IDS} listed PSD ids per campaign")
    return list(dict.fromkeys(v.psd_id(psd_id) for psd_id in psd_ids))
