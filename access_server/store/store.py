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
bumps (the ORM's version counter; ``contact`` does the same in Core for the
per-contact transactions), so a lost update surfaces as Aborted rather than
silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any

import grpc
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, func, insert, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from access_server.migrations import MIGRATIONS_DIR
from access_server.store import campaigns, contact, paging, probe, rows
from access_server.store import validate as v
from access_server.store.dberrors import translate
from access_server.store.engine import is_memory_sqlite, make_engine, write_engine
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
    ContactStart,
    Cryptogram,
    Intent,
    IntentKind,
    IntentStatus,
    ItemPage,
    ItemStatus,
    PsdEvent,
    PsdPage,
    PsdRecord,
    PsdState,
    RegisterOutcome,
)
from cms.runtime.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""Larger requested pages are clamped to this size."""

MAX_REGISTER_BATCH = 100_000
MAX_CAMPAIGN_IDS = 100_000
MAX_LEASE_SECONDS = 3600
"""A card session that needs longer renews its lease."""

REGISTER_CHUNK = 500
MIGRATION_LOCK_KEY = 0x434D5341
"""PostgreSQL advisory lock: replicas starting together migrate one at a time."""

ALREADY_REGISTERED = "already registered"
LISTED_TWICE = "already registered (listed more than once in this request)"

# Event names written by the store itself (flows add their own via record_event).
EV_REGISTERED = "registered"
EV_INSTALL_BEGUN = "install_begun"
EV_INSTALL_COMPLETED = "install_completed"
EV_REPLACEMENT_BEGUN = contact.EV_REPLACEMENT_BEGUN
EV_REPLACEMENT_COMPLETED = contact.EV_REPLACEMENT_COMPLETED
EV_INTENT_DONE = "intent_done"
EV_INTENT_ABANDONED = "intent_abandoned"
EV_REVOKED = "revoked"
EV_NEEDS_ATTENTION = "needs_attention"
EV_ATTENTION_CLEARED = "attention_cleared"
MAX_ATTENTION_REASON = 32
"""The ``psd.attention`` column: a reason code, not prose."""

_MIGRATING = threading.Lock()
"""Alembic's ``context`` and ``op`` are process-wide: one migration at a time per process."""

TRANSIENT_STATES = (PsdState.INSTALLING, PsdState.REPLACEMENT_PENDING)
"""States that exist only while an intent is open."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _release_with(row: PsdRow, holder: str | None) -> None:
    """Give back ``holder``'s lease in the transaction that ends its session's work."""
    if holder is not None and row.lease_holder == holder:
        row.lease_holder = None
        row.lease_expires = None


class Store:
    """Repository of the access server. Thread safe; one instance per process.

    ``clock`` returns aware datetimes; tests pass a fake one to move time
    (lease expiry) without sleeping.
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utc_now) -> None:
        self._engine = make_engine(url)
        self._writer = write_engine(self._engine)
        self._postgres = self._engine.dialect.name == "postgresql"
        self._reader = (
            self._engine.execution_options(isolation_level="REPEATABLE READ")
            if self._postgres
            else self._engine
        )
        # An in-memory SQLite database is a single shared connection: one
        # transaction at a time on it.
        self._serial = threading.RLock() if is_memory_sqlite(url) else None
        # SQLite has one writer at a time. Threads of this process queue for it
        # on a mutex: SQLite's own busy handler would make them poll with
        # sleeps of up to 100 ms, which under load costs far more than the
        # writes. Other processes still meet the busy timeout.
        self._sqlite_writer = (threading.RLock()
                               if not self._postgres and self._serial is None else None)
        self._clock = clock

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

    @property
    def engine(self) -> Engine:
        return self._engine

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

    # -- schema ---------------------------------------------------------------

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

    # -- transactions ---------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialize on in-memory SQLite; turn database errors into domain errors."""
        with self._serial if self._serial is not None else nullcontext():
            try:
                yield
            except ServiceError:
                raise
            except SQLAlchemyError as exc:
                raise translate(exc) from None

    @contextmanager
    def _write(self) -> Iterator[Session]:
        writer = self._sqlite_writer if self._sqlite_writer is not None else nullcontext()
        with writer, self._guard(), Session(self._writer, expire_on_commit=False) as session:
            with session.begin():
                yield session

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """A write transaction without a unit of work, for the per-contact paths.

        They run driver statements only (``contact``); a Session around them
        cost about 0.2 ms of CPU per transaction and did nothing.
        """
        writer = self._sqlite_writer if self._sqlite_writer is not None else nullcontext()
        with writer, self._guard(), self._writer.begin() as connection:
            yield connection

    @contextmanager
    def _read_connection(self) -> Iterator[Connection]:
        """A read transaction without a unit of work, for the per-contact read."""
        with self._guard(), self._reader.connect() as connection, connection.begin():
            yield connection

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._guard(), Session(self._reader, expire_on_commit=False) as session:
            with session.begin():
                yield session

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the store's clock must return aware datetimes")
        return now.astimezone(UTC)

    # -- registry -------------------------------------------------------------

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
        a plain "already registered" instead of a failed transaction.
        """
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        added: set[str] = set()
        for start in range(0, len(psd_ids), REGISTER_CHUNK):
            chunk = psd_ids[start : start + REGISTER_CHUNK]
            values = [_blank_row(psd_id, now) for psd_id in chunk]
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
        with self._read() as session:
            return rows.psd_record(rows.get_psd(session, psd_id))

    def get_cryptogram(self, psd_id: str) -> Cryptogram:
        """The card's stored cryptogram (flow A2 decrypts it in the HSM)."""
        psd_id = v.psd_id(psd_id)
        with self._read() as session:
            found = session.execute(
                select(PsdRow.cryptogram, PsdRow.cryptogram_key_label).where(
                    PsdRow.psd_id == psd_id
                )
            ).one_or_none()
        if found is None:
            raise rows.not_registered(psd_id)
        ciphertext, label = found
        if ciphertext is None or label is None:
            raise FailedPrecondition(f"PSD {psd_id} has no cryptogram (no installation begun)")
        return Cryptogram(psd_id=psd_id, ciphertext=bytes(ciphertext), key_label=label)

    def list_psds(
        self,
        state: PsdState | None = None,
        mk_version: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
        needs_attention: bool = False,
    ) -> PsdPage:
        """One page in PSD id order (keyset pagination: stable under inserts); with
        ``needs_attention``, only the cards an operator must act on."""
        state = None if state is None else _psd_state(state)
        mk_version = v.optional_key_version("mk_version", mk_version)
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidArgument("page_size must be a non-negative integer")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
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
            rows.get_psd(session, psd_id)
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
        with self._write() as session:
            rows.lock_psd(session, psd_id)
            rows.add_event(session, psd_id, self._now(), event, detail, actor)

    def revoke(self, psd_id: str, reason: str, actor: str) -> PsdRecord:
        """Revoke a card: any open intent is abandoned, pending campaign items skipped."""
        psd_id = v.psd_id(psd_id)
        reason = v.text("reason", reason, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            if row.state == PsdState.REVOKED.value:
                raise FailedPrecondition(f"PSD {psd_id} is already revoked")
            detail = f"was {row.state}: {reason}"
            intent = rows.open_intent_row(session, psd_id)
            if intent is not None:
                rows.close_intent(intent, IntentStatus.ABANDONED, now)
                self._abandon_campaign_attempt(session, intent, "card revoked", now)
                rows.add_event(
                    session, psd_id, now, EV_INTENT_ABANDONED,
                    f"{_describe(intent)}: card revoked", actor,
                )
            if row.pending_mk_version is not None:
                detail += f" (MK v{row.pending_mk_version} was pending)"
            row.state = PsdState.REVOKED.value
            row.pending_mk_version = None
            row.updated = now
            rows.add_event(session, psd_id, now, EV_REVOKED, detail, actor)
            session.flush()
            rows.settle_items(session, row, now)
            return _flushed_record(session, row)

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
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            rows.refuse_revoked(row, "flag for attention")
            if row.attention_since is None:
                row.attention_since = now
            row.attention = reason
            row.attention_detail = detail
            row.updated = now
            _release_with(row, release_lease_of)
            rows.add_event(session, psd_id, now, EV_NEEDS_ATTENTION, f"{reason}: {detail}",
                           actor)
            pending = session.scalars(
                select(CampaignItemRow.campaign_id).where(
                    CampaignItemRow.psd_id == psd_id,
                    CampaignItemRow.status == ItemStatus.PENDING.value)).all()
            for campaign_id in pending:
                campaign = rows.lock_campaign(session, campaign_id)
                item = rows.lock_item(session, campaign_id, psd_id)
                rows.set_item(session, campaign, item, ItemStatus.FAILED, detail, now)
            return _flushed_record(session, row)

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
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            if row.attention is None:
                raise FailedPrecondition(f"PSD {psd_id} does not need attention")
            reason = row.attention
            row.attention = None
            row.attention_detail = None
            row.attention_since = None
            row.updated = now
            rows.add_event(session, psd_id, now, EV_ATTENTION_CLEARED, f"{reason}: {note}",
                           actor)
            failed = session.scalars(
                select(CampaignItemRow.campaign_id)
                .join(CampaignRow, CampaignRow.campaign_id == CampaignItemRow.campaign_id)
                .where(CampaignItemRow.psd_id == psd_id,
                       CampaignItemRow.status == ItemStatus.FAILED.value,
                       CampaignRow.state.in_(rows.LIVE_CAMPAIGN_STATES))
                .order_by(CampaignRow.created)).all()
            waiting = contact.has_pending_items(session.connection(), psd_id)
            for campaign_id in failed:
                if waiting:
                    break           # a card waits in one campaign at a time
                campaign = rows.lock_campaign(session, campaign_id)
                item = rows.lock_item(session, campaign_id, psd_id)
                rows.set_item(session, campaign, item, ItemStatus.PENDING, None, now)
                waiting = True
            session.flush()
            rows.settle_items(session, row, now)
            return _flushed_record(session, row)

    def attention_counts(self) -> dict[str, int]:
        """How many cards need attention, by reason (for the metrics)."""
        with self._read() as session:
            found = session.execute(
                select(PsdRow.attention, func.count())
                .where(PsdRow.attention.is_not(None))
                .group_by(PsdRow.attention))
            return {str(reason): int(count) for reason, count in found}

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
                raise rows.not_registered(psd_id)
            return now

    # -- leases ---------------------------------------------------------------

    def acquire_lease(self, psd_id: str, holder: str, ttl_seconds: float) -> bool:
        """Take (or renew) the card's session lease; False while another holds it.

        A lease whose expiry has passed is free, so a crashed agent session
        cannot lock a card out for longer than its ttl.
        """
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        ttl = _ttl(ttl_seconds)
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
            rows.get_psd(session, psd_id)
            return False

    def read_contact(self, psd_id: str, holder: str) -> ContactStart:
        """What a contact needs, read in one transaction that writes nothing.

        The same as ``get_psd``, ``open_intent``, ``campaign_work_for`` and
        ``get_cryptogram``, plus whether ``holder`` could take the lease now
        (``lease_free``; nothing is taken). A user PC's contact reads here,
        has the card prove it holds its keys (the proxy checks the card
        cryptogram of its INITIALIZE UPDATE answer as it opens the channel),
        and only then calls ``start_contact(seen=...)``: an agent that
        replays a card's CPLC changes nothing in the registry.
        """
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        with self._read_connection() as conn:
            now = self._now()
            card = contact.read_card(conn, psd_id, with_cryptogram=True)
            intent_row = contact.open_intent(conn, psd_id)
            return ContactStart(
                psd=rows.psd_record(card), leased=False,
                intent=None if intent_row is None else rows.intent_record(intent_row),
                work=contact.pending_work(conn, card, lock=False),
                cryptogram=_card_cryptogram(card),
                lease_free=_lease_free(card, holder, now))

    def start_contact(self, psd_id: str, holder: str, ttl_seconds: float, *,
                      seen: ContactStart | None = None, journal: bool = False,
                      actor: str | None = None) -> ContactStart:
        """Take the card's session lease and read what the contact needs, in one transaction.

        Without ``seen``: the same as ``get_psd``, ``acquire_lease``,
        ``touch_contact``, ``open_intent``, ``campaign_work_for`` and
        ``get_cryptogram`` one after the other, but with the card's row locked
        throughout: what is read is what the lease holder works from, and a
        contact costs one round trip to the database instead of six.

        With ``seen`` (what ``read_contact`` returned to this contact before
        the card proved its keys): the lease is taken only if the card's row
        is still the one read (else Aborted: the contact starts again), and
        the rest comes from ``seen``. With ``journal`` as well, the campaign
        replacement ``seen.work`` names is journaled in this same transaction
        (what ``begin_replacement`` does), if the card is still pending in
        that running campaign (else Aborted): it is durable before the
        secured script is sent, and ``ContactStart.intent_begun`` says so.
        """
        psd_id = v.psd_id(psd_id)
        holder = v.text("holder", holder, v.MAX_ACTOR)
        ttl = _ttl(ttl_seconds)
        if journal:
            if seen is None or seen.work is None or seen.intent is not None:
                raise InvalidArgument("journal needs what read_contact saw: campaign work "
                                      "and no open intent")
            if actor is None:
                raise InvalidArgument("actor is required with journal")
            actor = v.actor(actor)
        if seen is not None and seen.psd.psd_id != psd_id:
            raise InvalidArgument(f"seen describes PSD {seen.psd.psd_id}, not {psd_id}")
        with self._write_connection() as conn:
            now = self._now()
            card = contact.lock_card(conn, psd_id, with_cryptogram=seen is None)
            if seen is not None and card.row_version != seen.psd.row_version:
                raise Aborted(f"PSD {psd_id} changed while this contact checked the card; "
                              "the next contact starts afresh")
            leased = _lease_free(card, holder, now)
            if seen is None:
                intent_row = contact.open_intent(conn, psd_id)
                intent = None if intent_row is None else rows.intent_record(intent_row)
                work = contact.pending_work(conn, card)
                cryptogram = _card_cryptogram(card)
            else:
                intent, work, cryptogram = seen.intent, seen.work, seen.cryptogram
            begun = False
            if not leased:
                return ContactStart(psd=rows.psd_record(card), leased=False, intent=intent,
                                    work=work, cryptogram=cryptogram)   # nothing was written
            values: dict[str, Any] = {"lease_holder": holder, "lease_expires": now + ttl,
                                      "last_contact": now}
            if journal:
                assert seen is not None and seen.work is not None and actor is not None
                work = contact.pending_work(conn, card)
                if work is None or (work.campaign_id, work.from_version, work.to_version) != (
                        seen.work.campaign_id, seen.work.from_version, seen.work.to_version):
                    raise Aborted(f"the campaign work of PSD {psd_id} changed while this "
                                  "contact checked the card; the next contact starts afresh")
                journaled = contact.journal_replacement(
                    conn, card, from_version=work.from_version, to_version=work.to_version,
                    campaign_id=work.campaign_id, actor=actor, now=now, campaign_checked=True)
                values.update(journaled.card_values)
                intent, begun = journaled.intent, True
            version = contact.update_card(conn, card, values)
            return ContactStart(psd=contact.record_after(card, version, values), leased=True,
                                intent=intent, work=work, cryptogram=cryptogram,
                                intent_begun=begun, lease_free=True)

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
            rows.get_psd(session, psd_id)
            return False

    # -- flow A1: initial installation ----------------------------------------

    def begin_install(
        self,
        psd_id: str,
        *,
        cryptogram: bytes,
        cryptogram_key_label: str,
        mkrk_version: int,
        mk_version: int,
        actor: str,
        card_holds_transport_keys: bool = False,
    ) -> Intent:
        """Journal an installation and store the cryptogram; durable on return.

        Allowed from blank. Allowed again from installing only when the caller
        has probed the card and found it still on its transport keys
        (``card_holds_transport_keys=True``): then no key from the earlier
        attempt is on the card, the earlier intent is abandoned and the new
        cryptogram replaces the old one, in this one transaction. Without that
        assurance the old cryptogram may be all that reproduces an MKRK
        already on the card, so it is kept and the call is refused.
        """
        psd_id = v.psd_id(psd_id)
        ciphertext = v.cryptogram(cryptogram)
        label = v.text("cryptogram_key_label", cryptogram_key_label, v.MAX_LABEL)
        mkrk_version = v.key_version("mkrk_version", mkrk_version)
        mk_version = v.key_version("mk_version", mk_version)
        actor = v.actor(actor)
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            self._allow_install(session, row, card_holds_transport_keys, actor, now)
            row.state = PsdState.INSTALLING.value
            row.cryptogram = ciphertext
            row.cryptogram_key_label = label
            row.mk_version = None
            row.mkrk_version = None
            row.pending_mk_version = mk_version
            row.updated = now
            intent = IntentRow(
                psd_id=psd_id,
                kind=IntentKind.INSTALL.value,
                from_version=None,
                to_version=mk_version,
                mkrk_version=mkrk_version,
                status=IntentStatus.OPEN.value,
                campaign_id=None,
                created=now,
                updated=now,
            )
            session.add(intent)
            session.flush()
            rows.add_event(
                session, psd_id, now, EV_INSTALL_BEGUN,
                f"{_describe(intent)}; cryptogram made with {label}", actor,
            )
            return rows.intent_record(intent)

    def _allow_install(
        self, session: Session, row: PsdRow, restart: bool, actor: str, now: datetime
    ) -> None:
        if row.state == PsdState.BLANK.value:
            return
        rows.refuse_revoked(row, "installation")
        if row.state != PsdState.INSTALLING.value:
            raise FailedPrecondition(
                f"PSD {row.psd_id} is {row.state}; installation starts from blank"
            )
        if not restart:
            raise FailedPrecondition(
                f"PSD {row.psd_id} already has an installation journaled: probe the card, and "
                "restart only if it still holds its transport keys (else reconcile)"
            )
        previous = rows.open_intent_row(session, row.psd_id)
        if previous is not None:
            rows.close_intent(previous, IntentStatus.ABANDONED, now)
            rows.add_event(
                session, row.psd_id, now, EV_INTENT_ABANDONED,
                f"{_describe(previous)}: superseded, card still on transport keys", actor,
            )
            session.flush()

    def complete_install(self, psd_id: str, intent_id: int, actor: str, *,
                         release_lease_of: str | None = None) -> PsdRecord:
        """The card now holds the MKRK and MK of the intent: it becomes active."""
        psd_id = v.psd_id(psd_id)
        intent_id = v.intent_id(intent_id)
        actor = v.actor(actor)
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            rows.refuse_revoked(row, "complete installation")
            intent = rows.checked_open_intent(session, psd_id, intent_id, IntentKind.INSTALL)
            rows.expect_state(row, PsdState.INSTALLING)
            row.state = PsdState.ACTIVE.value
            row.mk_version = intent.to_version
            row.mkrk_version = intent.mkrk_version
            row.pending_mk_version = None
            row.updated = now
            _release_with(row, release_lease_of)
            rows.close_intent(intent, IntentStatus.DONE, now)
            rows.add_event(
                session, psd_id, now, EV_INSTALL_COMPLETED, _describe(intent), actor
            )
            return _flushed_record(session, row)

    # -- flow A2: master key replacement --------------------------------------

    def begin_replacement(
        self,
        psd_id: str,
        *,
        from_version: int,
        to_version: int,
        campaign_id: str | None = None,
        actor: str,
    ) -> Intent:
        """Journal the replacement of MK ``from_version`` by ``to_version``.

        With ``campaign_id``, the card's item in that (running) campaign is
        the reason, and counts an attempt.
        """
        psd_id = v.psd_id(psd_id)
        from_version = v.key_version("from_version", from_version)
        to_version = v.key_version("to_version", to_version)
        if from_version == to_version:
            raise InvalidArgument("to_version must differ from from_version")
        if campaign_id is not None:
            campaign_id = v.text("campaign_id", campaign_id, 64)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            now = self._now()
            card = contact.lock_card(conn, psd_id)
            journaled = contact.journal_replacement(
                conn, card, from_version=from_version, to_version=to_version,
                campaign_id=campaign_id, actor=actor, now=now)
            contact.update_card(conn, card, journaled.card_values)
            return journaled.intent

    def complete_replacement(self, psd_id: str, intent_id: int, actor: str, *,
                             release_lease_of: str | None = None) -> PsdRecord:
        """The card holds the new MK and the old one is deleted: active at the new version."""
        psd_id = v.psd_id(psd_id)
        intent_id = v.intent_id(intent_id)
        actor = v.actor(actor)
        with self._write_connection() as conn:
            now = self._now()
            card = contact.lock_card(conn, psd_id)
            rows.refuse_revoked(card, "complete replacement")
            intent = contact.checked_open_intent(conn, psd_id, intent_id, IntentKind.REPLACE)
            rows.expect_state(card, PsdState.REPLACEMENT_PENDING)
            values: dict[str, Any] = {"state": PsdState.ACTIVE.value,
                                      "mk_version": intent.to_version,
                                      "pending_mk_version": None, "updated": now}
            if release_lease_of is not None and card.lease_holder == release_lease_of:
                values.update(lease_holder=None, lease_expires=None)
            version = contact.update_card(conn, card, values)
            contact.close_intent(conn, intent_id, IntentStatus.DONE, now)
            contact.add_event(
                conn, psd_id, now, EV_REPLACEMENT_COMPLETED,
                contact.describe_replacement(intent_id, intent.from_version,
                                             intent.to_version, intent.campaign_id), actor)
            if intent.campaign_id is not None:
                contact.finish_campaign_item(conn, intent.campaign_id, psd_id, now)
            if contact.has_pending_items(conn, psd_id):
                # Rare: the card waits in another campaign its new version
                # settles. The ORM joins this transaction for it (its own
                # rollback would roll this one back; its commit would not
                # commit it).
                with Session(bind=conn, expire_on_commit=False,
                             join_transaction_mode="rollback_only") as session:
                    rows.settle_items(session, rows.get_psd(session, psd_id), now)
                    session.flush()
            return contact.record_after(card, version, values)

    def _finish_campaign_item(self, session: Session, intent: IntentRow, now: datetime) -> None:
        """A completed campaign replacement counts as done, even if cancelled meanwhile."""
        if intent.campaign_id is None:
            return
        session.flush()
        contact.finish_campaign_item(session.connection(), intent.campaign_id, intent.psd_id,
                                     now)

    def _abandon_campaign_attempt(
        self, session: Session, intent: IntentRow, reason: str, now: datetime
    ) -> None:
        """An abandoned attempt leaves the item pending (retried on next contact)."""
        if intent.campaign_id is None:
            return
        rows.lock_campaign(session, intent.campaign_id)
        item = rows.lock_item(session, intent.campaign_id, intent.psd_id)
        item.last_error = reason[: v.MAX_DETAIL]
        item.updated = now

    def abandon_intent(self, psd_id: str, intent_id: int, reason: str, actor: str) -> PsdRecord:
        """Give up an open intent whose step the card did not take.

        The row goes back to what the card is then known to hold: blank for
        an installation (the cryptogram is kept; only a new installation
        replaces it), active at the old MK for a replacement.
        """
        psd_id = v.psd_id(psd_id)
        intent_id = v.intent_id(intent_id)
        reason = v.text("reason", reason, v.MAX_DETAIL)
        actor = v.actor(actor)
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            rows.refuse_revoked(row, "abandon intent")
            intent = rows.checked_open_intent(session, psd_id, intent_id, None)
            if intent.kind == IntentKind.INSTALL.value:
                row.state = PsdState.BLANK.value
                row.mk_version = None
                row.mkrk_version = None
            else:
                row.state = PsdState.ACTIVE.value
            row.pending_mk_version = None
            row.updated = now
            rows.close_intent(intent, IntentStatus.ABANDONED, now)
            self._abandon_campaign_attempt(session, intent, reason, now)
            rows.add_event(
                session, psd_id, now, EV_INTENT_ABANDONED, f"{_describe(intent)}: {reason}", actor
            )
            return _flushed_record(session, row)

    def open_intent(self, psd_id: str) -> Intent | None:
        psd_id = v.psd_id(psd_id)
        with self._read() as session:
            rows.get_psd(session, psd_id)
            intent = rows.open_intent_row(session, psd_id)
            return None if intent is None else rows.intent_record(intent)

    def get_intent(self, intent_id: int) -> Intent:
        intent_id = v.intent_id(intent_id)
        with self._read() as session:
            intent = session.get(IntentRow, intent_id)
            if intent is None:
                raise NotFound(f"intent {intent_id} not found")
            return rows.intent_record(intent)

    # -- reconciliation -------------------------------------------------------

    def reconcile(
        self,
        psd_id: str,
        *,
        state: PsdState,
        mk_version: int | None,
        mkrk_version: int | None,
        pending: int | None = None,
        event: str,
        detail: str,
        actor: str,
    ) -> PsdRecord:
        """Make the row agree with what a probe found on the card, in one transaction.

        ``state`` is what the card is in: blank (transport keys only), active
        (an MKRK and exactly one MK), or a transient state while an open
        intent is still being carried out (installing: MKRK in, MK not yet;
        replacement_pending: old and new MK both present, ``pending`` the new
        one). Reaching blank or active closes the open intent: done if the
        card holds what it aimed at, abandoned otherwise. A transient state
        keeps the intent open so the flow can finish it.
        """
        psd_id = v.psd_id(psd_id)
        target = _psd_state(state)
        mk_version = v.optional_key_version("mk_version", mk_version)
        mkrk_version = v.optional_key_version("mkrk_version", mkrk_version)
        pending = v.optional_key_version("pending", pending)
        probe.check_shape(target, mk_version, mkrk_version, pending)
        event = v.text("event", event, v.MAX_EVENT)
        detail = v.text("detail", detail, v.MAX_DETAIL, required=False)
        actor = v.actor(actor)
        with self._write() as session:
            now = self._now()
            row = rows.lock_psd(session, psd_id)
            rows.refuse_revoked(row, "reconcile")
            intent = rows.open_intent_row(session, psd_id)
            if target in TRANSIENT_STATES:
                pending = probe.check_transient(row, intent, target, mk_version, pending)
            elif target is PsdState.ACTIVE and row.cryptogram_key_label is None:
                raise FailedPrecondition(
                    f"PSD {psd_id} has no cryptogram: the server cannot reproduce its MKRK"
                )
            row.state = target.value
            row.mk_version = mk_version
            row.mkrk_version = mkrk_version
            row.pending_mk_version = pending
            row.updated = now
            rows.add_event(session, psd_id, now, event, detail, actor)
            if intent is not None and target not in TRANSIENT_STATES:
                self._close_reconciled(session, intent, row, detail, actor, now)
            session.flush()
            rows.settle_items(session, row, now)
            return _flushed_record(session, row)

    def _close_reconciled(
        self,
        session: Session,
        intent: IntentRow,
        row: PsdRow,
        detail: str,
        actor: str,
        now: datetime,
    ) -> None:
        reached = row.state == PsdState.ACTIVE.value and row.mk_version == intent.to_version
        if intent.kind == IntentKind.INSTALL.value:
            reached = reached and row.mkrk_version == intent.mkrk_version
        if reached:
            rows.close_intent(intent, IntentStatus.DONE, now)
            rows.add_event(
                session, row.psd_id, now, EV_INTENT_DONE,
                f"{_describe(intent)}: confirmed on the card", actor,
            )
            self._finish_campaign_item(session, intent, now)
            return
        rows.close_intent(intent, IntentStatus.ABANDONED, now)
        rows.add_event(
            session, row.psd_id, now, EV_INTENT_ABANDONED,
            f"{_describe(intent)}: not on the card", actor,
        )
        self._abandon_campaign_attempt(session, intent, detail or "not on the card", now)

    # -- campaigns ------------------------------------------------------------

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
        ``campaigns`` for the overlap rule.
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
            campaign_id = campaigns.start(
                session,
                name=name,
                from_version=from_version,
                to_version=to_version,
                psd_ids=listed,
                prefix=prefix,
                actor=actor,
                now=self._now(),
            )
            return self._campaign(session, campaign_id)

    def get_campaign(self, campaign_id: str) -> Campaign:
        with self._read() as session:
            return self._campaign(session, campaign_id)

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
            campaigns.transition(session, campaign_id, action, self._now())
            session.flush()
            return self._campaign(session, campaign_id)

    def _campaign(self, session: Session, campaign_id: str) -> Campaign:
        row = session.get(CampaignRow, campaign_id)
        if row is None:
            raise NotFound(f"campaign {campaign_id} not found")
        counts = rows.item_counts(session, [campaign_id])
        return rows.campaign_record(row, counts[campaign_id])

    def campaign_work_for(self, psd_id: str) -> CampaignItem | None:
        """The card's pending item in a running campaign, if the card can act on it now."""
        psd_id = v.psd_id(psd_id)
        with self._read() as session:
            conn = session.connection()
            return contact.pending_work(conn, contact.read_card(conn, psd_id), lock=False)

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
        page_size: int = DEFAULT_PAGE_SIZE,
        after: str = "",
    ) -> ItemPage:
        """One page of a campaign's items (``status`` only, if given) in PSD id order,
        starting after the PSD id ``after``; the PSD id the next page starts after
        ("" on the last page), and how many there are in all."""
        if status is not None:
            try:
                status = ItemStatus(status)
            except ValueError:
                raise InvalidArgument(f"unknown item status {status!r}") from None
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 0:
            raise InvalidArgument("page_size must be a non-negative integer")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
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
        try:
            status = ItemStatus(status)
        except ValueError:
            raise InvalidArgument(f"unknown item status {status!r}") from None
        if error is not None:
            error = v.text("error", error, v.MAX_DETAIL, required=False)
        with self._write() as session:
            item, campaign = campaigns.mark(
                session, campaign_id, psd_id, status, error, self._now()
            )
            return rows.item_record(item, campaign)


# -- helpers ---------------------------------------------------------------------


def _lease_free(card: contact.CardRow, holder: str, now: datetime) -> bool:
    """Whether ``holder`` may take the card's lease at ``now`` (never on a revoked card)."""
    return card.state != PsdState.REVOKED.value and (
        card.lease_holder is None or card.lease_holder == holder
        or card.lease_expires is None or card.lease_expires <= now)


def _card_cryptogram(card: contact.CardRow) -> Cryptogram | None:
    """The cryptogram of a row read with it, or None when the card has none."""
    if card.cryptogram_key_label is None or card.cryptogram is None:
        return None
    return Cryptogram(psd_id=card.psd_id, ciphertext=bytes(card.cryptogram),
                      key_label=card.cryptogram_key_label)


def _flushed_record(session: Session, row: PsdRow) -> PsdRecord:
    """The row as it will be committed (the flush assigns the new row version)."""
    session.flush()
    return rows.psd_record(row)


def _blank_row(psd_id: str, now: datetime) -> dict[str, Any]:
    return {
        "psd_id": psd_id,
        "state": PsdState.BLANK.value,
        "mk_version": None,
        "mkrk_version": None,
        "pending_mk_version": None,
        "cryptogram": None,
        "cryptogram_key_label": None,
        "created": now,
        "updated": now,
        "last_contact": None,
        "lease_holder": None,
        "lease_expires": None,
        "row_version": 1,
    }


def _describe(intent: IntentRow) -> str:
    if intent.kind == IntentKind.INSTALL.value:
        return (
            f"intent {intent.intent_id}: install MKRK v{intent.mkrk_version} "
            f"and MK v{intent.to_version}"
        )
    return contact.describe_replacement(intent.intent_id, intent.from_version,
                                        intent.to_version, intent.campaign_id)


def _psd_state(value: object) -> PsdState:
    try:
        return PsdState(value)
    except ValueError:
        raise InvalidArgument(f"unknown PSD state {value!r}") from None


def _ttl(ttl_seconds: object) -> timedelta:
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int | float):
        raise InvalidArgument("ttl_seconds must be a number")
    if not 0 < ttl_seconds <= MAX_LEASE_SECONDS:
        raise InvalidArgument(f"ttl_seconds must be in (0, {MAX_LEASE_SECONDS}]")
    return timedelta(seconds=ttl_seconds)


def _listed_ids(psd_ids: Sequence[str] | None) -> list[str] | None:
    """Validated, de-duplicated listed ids in their given order; None for no list."""
    if not psd_ids:
        return None
    if isinstance(psd_ids, str):
        raise InvalidArgument("psd_ids must be a list of PSD ids, not a string")
    if len(psd_ids) > MAX_CAMPAIGN_IDS:
        raise InvalidArgument(f"at most {MAX_CAMPAIGN_IDS} listed PSD ids per campaign")
    return list(dict.fromkeys(v.psd_id(psd_id) for psd_id in psd_ids))
