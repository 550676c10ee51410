"""The PSD registry: cards registered, read, listed, revoked, flagged for an operator.

These are the operator's transactions (and ``flag_attention``, which a
contact calls on the rare endings that need an operator): the card's row,
its intents and its history through the one helper of each in ``cards``, on
the session's connection; campaign items through the ORM (``rows``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import grpc
from sqlalchemy import func, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from access_server.store import cards, paging, rows
from access_server.store import validate as v
from access_server.store.models import CampaignItemRow, CampaignRow, PsdEventRow, PsdRow
from access_server.store.records import (
    Cryptogram,
    IntentStatus,
    ItemStatus,
    PsdEvent,
    PsdPage,
    PsdRecord,
    PsdState,
    RegisterOutcome,
)
from access_server.store.transactions import Transactions
from cms.runtime.errors import FailedPrecondition, InvalidArgument

MAX_REGISTER_BATCH = 100_000
REGISTER_CHUNK = 500

ALREADY_REGISTERED = "already registered"
LISTED_TWICE = "already registered (listed more than once in this request)"

EV_REGISTERED = "registered"
EV_REVOKED = "revoked"
EV_NEEDS_ATTENTION = "needs_attention"
EV_ATTENTION_CLEARED = "attention_cleared"
MAX_ATTENTION_REASON = 32
"""The ``psd.attention`` column: a reason code, not prose."""


class Registry(Transactions):
    """The store's registry operations."""

    def register_psds(self, psd_ids: Iterable[str], actor: str) -> list[RegisterOutcome]:
        """Register blank cards; one outcome per given id, in order, one transaction."""
        actor = v.actor(actor)
        if isinstance(psd_ids, str):
            raise InvalidArgument("psd_ids must be a list of PSD ids, not a string")
        given = list(psd_ids)
        if len(given) > MAX_REGISTER_BATCH:
            raise InvalidArgument(
                f"at most {MAX_REGISTER_BATCH} PSD ids per call, got {len(given)}"
            )
        outcomes: list[RegisterOutcome | None] = [None] * len(given)
        first_index: dict[str, int] = {}
        for index, psd_id in enumerate(given):
            problem = v.psd_id_problem(psd_id)
            if problem is not None:
                outcomes[index] = RegisterOutcome(
                    str(psd_id), False, problem, grpc.StatusCode.INVALID_ARGUMENT
                )
            elif psd_id in first_index:
                outcomes[index] = RegisterOutcome(
                    psd_id, False, LISTED_TWICE, grpc.StatusCode.ALREADY_EXISTS
                )
            else:
                first_index[psd_id] = index
        added: set[str] = set()
        if first_index:
            with self._write() as session:
                added = self._insert_blank(session, list(first_index), actor, self._now())
        for psd_id, index in first_index.items():
            outcomes[index] = (
                RegisterOutcome(psd_id, True, None, grpc.StatusCode.OK)
                if psd_id in added
                else RegisterOutcome(
                    psd_id, False, ALREADY_REGISTERED, grpc.StatusCode.ALREADY_EXISTS
                )
            )
        return [outcome for outcome in outcomes if outcome is not None]

    def _insert_blank(
        self, session: Session, psd_ids: Sequence[str], actor: str, now: datetime
    ) -> set[str]:
        """Insert the ids not yet registered; returns those actually inserted.

        ON CONFLICT DO NOTHING makes a concurrent registration of the same id
        a plain "already registered" instead of a failed transaction. A blank
        card's other columns are NULL: it holds no key the server made.
        """
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        added: set[str] = set()
        for start in range(0, len(psd_ids), REGISTER_CHUNK):
            chunk = psd_ids[start : start + REGISTER_CHUNK]
            values = [{"psd_id": psd_id, "state": PsdState.BLANK.value, "created": now,
                       "updated": now, "row_version": 1} for psd_id in chunk]
            statement = (
                dialect_insert(PsdRow)
                .values(values)
                .on_conflict_do_nothing(index_elements=["psd_id"])
                .returning(PsdRow.psd_id)
            )
            inserted = list(session.scalars(statement))
            added.update(inserted)
            if inserted:
                session.execute(
                    insert(PsdEventRow),
                    [
                        {
                            "psd_id": psd_id,
                            "at": now,
                            "event": EV_REGISTERED,
                            "detail": "registered as blank (transport keys only)",
                            "actor": actor,
                        }
                        for psd_id in inserted
                    ],
                )
        return added

    def get_psd(self, psd_id: str) -> PsdRecord:
        psd_id = v.psd_id(psd_id)
        with self._read_connection() as conn:
            return cards.read_card(conn, psd_id)

    def get_cryptogram(self, psd_id: str) -> Cryptogram:
        """The card's stored cryptogram (flow A2 decrypts it in the HSM)."""
        psd_id = v.psd_id(psd_id)
        with self._read_connection() as conn:
            _, found = cards.card_and_cryptogram(conn, psd_id, lock=False)
        if found is None:
            raise FailedPrecondition(f"PSD {psd_id} has no cryptogram (no installation begun)")
        return found

    def list_psds(
        self,
        state: PsdState | None = None,
        mk_version: int | None = None,
        page_size: int = paging.DEFAULT_PAGE_SIZE,
        page_token: str = "",
        needs_attention: bool = False,
    ) -> PsdPage:
        """One page in PSD id order (keyset pagination: stable under inserts); with
        ``needs_attention``, only the cards an operator must act on."""
        state = None if state is None else psd_state(state)
        mk_version = v.optional_key_version("mk_version", mk_version)
        size = paging.page_size(page_size)
        after = paging.decode_token(page_token, state, mk_version, needs_attention)
        filters = []
        if needs_attention:
            filters.append(PsdRow.attention.is_not(None))
        if state is not None:
            filters.append(PsdRow.state == state.value)
        if mk_version is not None:
            filters.append(PsdRow.mk_version == mk_version)
        with self._read() as session:
            total = session.scalar(select(func.count()).select_from(PsdRow).where(*filters))
            query = select(PsdRow).where(*filters).order_by(PsdRow.psd_id).limit(size + 1)
            if after is not None:
                query = query.where(PsdRow.psd_id > after)
            found = list(session.scalars(query))
            items = [rows.psd_record(row) for row in found[:size]]
        next_token = (
            paging.encode_token(items[-1].psd_id, state, mk_version, needs_attention)
            if len(found) > size else ""
        )
        return PsdPage(items, next_token, int(total or 0))

    def history(self, psd_id: str) -> list[PsdEvent]:
        """The card's events, oldest first."""
        psd_id = v.psd_id(psd_id)
        with self._read() as session:
            cards.read_card(session.connection(), psd_id)
            events = session.scalars(
                select(PsdEventRow)
                .where(PsdEventRow.psd_id == psd_id)
                .order_by(PsdEventRow.event_id)
            )
            return [PsdEvent(e.at, e.event, e.detail, e.actor) for e in events]

    def record_event(self, psd_id: str, event: str, detail: str, actor: str) -> None:
        """Append to the card's history (the flows' own steps and findings)."""
        psd_id = v.psd_id(psd_id)
        event = v.text("event", event, v.MAX_EVENT)
        detail = v.text("detail", detail, v.MAX_DETAIL, required=False)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            cards.lock_card(conn, psd_id)
            cards.add_event(conn, psd_id, self._now(), event, detail, actor)

    def revoke(self, psd_id: str, reason: str, actor: str) -> PsdRecord:
        """Revoke a card: any open intent is abandoned, pending campaign items skipped."""
        psd_id = v.psd_id(psd_id)
        reason = v.text("reason", reason, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._change_card(psd_id) as (session, conn, card, now):
            if card.state is PsdState.REVOKED:
                raise FailedPrecondition(f"PSD {psd_id} is already revoked")
            detail = f"was {card.state}: {reason}"
            intent = cards.open_intent(conn, psd_id)
            if intent is not None:
                cards.close_intent(conn, intent.intent_id, IntentStatus.ABANDONED, now)
                rows.abandon_campaign_attempt(session, intent, "card revoked", now)
                cards.add_event(conn, psd_id, now, cards.EV_INTENT_ABANDONED,
                                f"{cards.describe(intent)}: card revoked", actor)
            if card.pending_mk_version is not None:
                detail += f" (MK v{card.pending_mk_version} was pending)"
            record = cards.update_card(conn, card, {
                "state": PsdState.REVOKED.value, "pending_mk_version": None, "updated": now})
            cards.add_event(conn, psd_id, now, EV_REVOKED, detail, actor)
            rows.settle_items(session, record, now)
            return record

    def flag_attention(self, psd_id: str, *, reason: str, detail: str, actor: str,
                       release_lease_of: str | None = None) -> PsdRecord:
        """Record that the card needs an operator before the server works on it again.

        One transaction, on the rare contacts that end so: the flag (``reason``, a
        code from ``access_server.outcomes``, and ``detail``, what happened, for
        people) and its event in the history; the card's pending campaign items
        fail with ``detail`` (their campaigns wait for the card: one completes only
        when none of its cards is pending or needing attention); and the lease of
        ``release_lease_of``, if it holds it, is given back. An open intent stays
        open: the card may hold part of it, and the contact after the operator
        cleared the flag finishes it. A card flagged again keeps the time it first
        needed attention and takes the newest reason.
        """
        psd_id = v.psd_id(psd_id)
        reason = v.text("reason", reason, MAX_ATTENTION_REASON)
        detail = v.text("detail", detail, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._change_card(psd_id) as (session, conn, card, now):
            cards.refuse_revoked(card, "flag for attention")
            values = {"attention": reason, "attention_detail": detail,
                      "attention_since": card.attention_since or now, "updated": now}
            cards.release_lease(card, release_lease_of, values)
            record = cards.update_card(conn, card, values)
            cards.add_event(conn, psd_id, now, EV_NEEDS_ATTENTION, f"{reason}: {detail}",
                            actor)
            pending = session.scalars(
                select(CampaignItemRow.campaign_id).where(
                    CampaignItemRow.psd_id == psd_id,
                    CampaignItemRow.status == ItemStatus.PENDING.value)).all()
            for campaign_id in pending:
                campaign = rows.lock_campaign(session, campaign_id)
                item = rows.lock_item(session, campaign_id, psd_id)
                rows.set_item(session, campaign, item, ItemStatus.FAILED, detail, now)
            return record

    def clear_attention(self, psd_id: str, *, note: str, actor: str) -> PsdRecord:
        """An operator dealt with the cause: the server works on the card again.

        The flag goes, with ``note`` (what was done) in the history, and the card's
        failed items in running or paused campaigns are pending again, so their
        campaign takes the card at its next contact; unless the card waits in
        another campaign meanwhile, or no longer holds what the campaign replaces
        (then the item is settled as done or skipped). A cancelled campaign's item
        stays as it was.
        """
        psd_id = v.psd_id(psd_id)
        note = v.text("note", note, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._change_card(psd_id) as (session, conn, card, now):
            if card.attention is None:
                raise FailedPrecondition(f"PSD {psd_id} does not need attention")
            record = cards.update_card(conn, card, {
                "attention": None, "attention_detail": None, "attention_since": None,
                "updated": now})
            cards.add_event(conn, psd_id, now, EV_ATTENTION_CLEARED,
                            f"{card.attention}: {note}", actor)
            failed = session.scalars(
                select(CampaignItemRow.campaign_id)
                .join(CampaignRow, CampaignRow.campaign_id == CampaignItemRow.campaign_id)
                .where(CampaignItemRow.psd_id == psd_id,
                       CampaignItemRow.status == ItemStatus.FAILED.value,
                       CampaignRow.state.in_(rows.LIVE_CAMPAIGN_STATES))
                .order_by(CampaignRow.created)).all()
            waiting = cards.has_pending_items(conn, psd_id)
            for campaign_id in failed:
                if waiting:
                    break           # a card waits in one campaign at a time
                campaign = rows.lock_campaign(session, campaign_id)
                item = rows.lock_item(session, campaign_id, psd_id)
                rows.set_item(session, campaign, item, ItemStatus.PENDING, None, now)
                waiting = True
            session.flush()
            rows.settle_items(session, record, now)
            return record

    def attention_counts(self) -> dict[str, int]:
        """How many cards need attention, by reason (for the metrics)."""
        with self._read() as session:
            found = session.execute(
                select(PsdRow.attention, func.count())
                .where(PsdRow.attention.is_not(None))
                .group_by(PsdRow.attention))
            return {str(reason): int(count) for reason, count in found}


def psd_state(value: object) -> PsdState:
    try:
        return PsdState(value)
    except ValueError:
        raise InvalidArgument(f"unknown PSD state {value!r}") from None
