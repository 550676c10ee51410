"""The transactions of a card contact, as driver statements.

A campaign contact reads the card (``Store.read_contact``), has the card
prove its keys, then runs two write transactions (``Store.start_contact``,
which takes the lease and journals the replacement, and
``Store.complete_replacement``); a fleet runs them for every card. Through
the ORM's unit of work each statement cost about 0.4 ms of CPU, and through
SQLAlchemy Core still about 0.15 ms; these functions say the same rules in
plain SQL run on the transaction's driver connection (``driver``), several
times cheaper again. The rest of the store keeps the ORM, where readability
wins over the last millisecond.

The rules the ORM enforced are restated here: the card's row is locked
first (``FOR UPDATE`` on PostgreSQL; SQLite has one writer), and every
update of it checks and bumps ``row_version``, so a lost update is Aborted,
never silent. Lock order as in ``rows``: card, campaign, campaign items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection

from access_server.store import rows
from access_server.store.driver import Sql, execute
from access_server.store.models import IntentRow, PsdRow, UtcDateTime
from access_server.store.records import (
    CampaignItem,
    CampaignState,
    Intent,
    IntentKind,
    IntentStatus,
    ItemStatus,
    PsdRecord,
    PsdState,
)
from cms.runtime.errors import Aborted, FailedPrecondition, NotFound

EV_REPLACEMENT_BEGUN = "replacement_begun"
EV_REPLACEMENT_COMPLETED = "replacement_completed"


class CardRow(NamedTuple):
    """A ``psd`` row; ``cryptogram`` is None unless it was asked for."""

    psd_id: str
    state: str
    mk_version: int | None
    mkrk_version: int | None
    pending_mk_version: int | None
    cryptogram_key_label: str | None
    created: datetime
    updated: datetime
    last_contact: datetime | None
    lease_holder: str | None
    lease_expires: datetime | None
    row_version: int
    attention: str | None
    attention_detail: str | None
    attention_since: datetime | None
    cryptogram: bytes | None


class IntentColumns(NamedTuple):
    intent_id: int
    psd_id: str
    kind: str
    from_version: int | None
    to_version: int
    mkrk_version: int | None
    status: str
    campaign_id: str | None
    created: datetime
    updated: datetime


class WorkRow(NamedTuple):
    campaign_id: str
    status: str
    attempts: int
    last_error: str | None
    updated: datetime
    from_version: int
    to_version: int


class CampaignVersions(NamedTuple):
    state: str
    from_version: int
    to_version: int


def _times(table: Any, row: type[NamedTuple]) -> tuple[str, ...]:
    """The fields of ``row`` that ``table`` declares as times (read back as aware UTC)."""
    return tuple(c.name for c in table.c
                 if isinstance(c.type, UtcDateTime) and c.name in row._fields)


_CARD_TIMES = _times(PsdRow.__table__, CardRow)
_INTENT_TIMES = _times(IntentRow.__table__, IntentColumns)
_STATES = {"open": IntentStatus.OPEN.value, "pending": ItemStatus.PENDING.value,
           "done": ItemStatus.DONE.value, "running": CampaignState.RUNNING.value}
UPDATABLE_CARD_COLUMNS = frozenset(c.name for c in PsdRow.__table__.c) - {"psd_id",
                                                                          "row_version"}

_LOCK_CARD = Sql("SELECT {columns} FROM psd WHERE psd_id = :psd_id{for_update}",
                 CardRow, times=_CARD_TIMES, nulls=("cryptogram",))
_LOCK_CARD_WITH_CRYPTOGRAM = Sql("SELECT {columns} FROM psd WHERE psd_id = :psd_id{for_update}",
                                 CardRow, times=_CARD_TIMES)
_READ_CARD = Sql("SELECT {columns} FROM psd WHERE psd_id = :psd_id",
                 CardRow, times=_CARD_TIMES, nulls=("cryptogram",))
_READ_CARD_WITH_CRYPTOGRAM = Sql("SELECT {columns} FROM psd WHERE psd_id = :psd_id",
                                 CardRow, times=_CARD_TIMES)
_INSERT_EVENT = Sql("INSERT INTO psd_event (psd_id, at, event, detail, actor) "
                    "VALUES (:psd_id, :at, :event, :detail, :actor)")
_INSERT_INTENT = Sql(
    "INSERT INTO intent (psd_id, kind, from_version, to_version, mkrk_version, status, "
    "campaign_id, created, updated) VALUES (:psd_id, :kind, :from_version, :to_version, "
    ":mkrk_version, :status, :campaign_id, :created, :updated) RETURNING intent_id")
_OPEN_INTENT = Sql("SELECT {columns} FROM intent WHERE psd_id = :psd_id AND status = {open}",
                   IntentColumns, times=_INTENT_TIMES, literals=_STATES)
_INTENT = Sql("SELECT {columns} FROM intent WHERE intent_id = :intent_id",
              IntentColumns, times=_INTENT_TIMES)
_CLOSE_INTENT = Sql("UPDATE intent SET status = :status, updated = :updated "
                    "WHERE intent_id = :intent_id")
_WORK = (
    "SELECT campaign_item.campaign_id, campaign_item.status, campaign_item.attempts, "
    "campaign_item.last_error, campaign_item.updated, campaign.from_version, "
    "campaign.to_version FROM campaign_item "
    "JOIN campaign ON campaign.campaign_id = campaign_item.campaign_id "
    "WHERE campaign_item.psd_id = :psd_id AND campaign_item.status = {pending} "
    "AND campaign.state = {running} AND campaign.from_version = :mk_version"
)
_READ_WORK = Sql(_WORK, WorkRow, times=("updated",), literals=_STATES)
# The campaign row share-locked: a pause or cancel waits for this transaction.
_SHARE_WORK = Sql(_WORK + "{for_share:campaign}", WorkRow, times=("updated",),
                  literals=_STATES)
_SHARE_CAMPAIGN = Sql("SELECT state, from_version, to_version FROM campaign "
                      "WHERE campaign_id = :campaign_id{for_share}", CampaignVersions)
_LOCK_CAMPAIGN_STATE = Sql("SELECT state FROM campaign WHERE campaign_id = :campaign_id"
                           "{for_update}")
_COUNT_ATTEMPT = Sql(
    "UPDATE campaign_item SET attempts = attempts + 1, updated = :updated "
    "WHERE campaign_id = :campaign_id AND psd_id = :psd_id AND status = {pending}",
    literals=_STATES)
_ITEM_STATUS = Sql("SELECT status FROM campaign_item "
                   "WHERE campaign_id = :campaign_id AND psd_id = :psd_id")
_FINISH_ITEM = Sql(
    "UPDATE campaign_item SET status = {done}, last_error = NULL, updated = :updated "
    "WHERE campaign_id = :campaign_id AND psd_id = :psd_id", literals=_STATES)
_ANY_PENDING_OF_CARD = Sql("SELECT campaign_id FROM campaign_item "
                           "WHERE psd_id = :psd_id AND status = {pending} LIMIT 1",
                           literals=_STATES)
_UPDATE_CARD: dict[frozenset[str], Sql] = {}


def _update_card_sql(columns: frozenset[str]) -> Sql:
    """``UPDATE psd SET <columns>`` guarded by the row version, built once per column set."""
    sql = _UPDATE_CARD.get(columns)
    if sql is None:
        unknown = columns - UPDATABLE_CARD_COLUMNS
        if unknown:
            raise ValueError(f"not updatable psd columns: {sorted(unknown)}")
        # Column names from the table's own list (checked above), values bound.
        sets = ", ".join(f"{c} = :{c}" for c in sorted(columns))
        sql = _UPDATE_CARD[columns] = Sql(
            "UPDATE psd SET " + sets + ", row_version = :new_row_version "  # noqa: S608
            "WHERE psd_id = :w_psd_id AND row_version = :w_row_version")
    return sql


def lock_card(conn: Connection, psd_id: str, *, with_cryptogram: bool = False) -> CardRow:
    """The card's row, locked for the rest of the transaction; NotFound if absent."""
    return _card(conn, _LOCK_CARD_WITH_CRYPTOGRAM if with_cryptogram else _LOCK_CARD, psd_id)


def read_card(conn: Connection, psd_id: str, *, with_cryptogram: bool = False) -> CardRow:
    """The card's row, without a lock; NotFound if absent."""
    return _card(conn, _READ_CARD_WITH_CRYPTOGRAM if with_cryptogram else _READ_CARD, psd_id)


def _card(conn: Connection, statement: Sql, psd_id: str) -> CardRow:
    card = execute(conn, statement, {"psd_id": psd_id}).one_or_none()
    if card is None:
        raise rows.not_registered(psd_id)
    return card


def record_after(card: CardRow, version: int, values: dict[str, Any]) -> PsdRecord:
    """The card's record once ``update_card`` has written ``values`` as ``version``."""
    changed = {k: PsdState(x) if k == "state" else x for k, x in values.items()}
    return replace(rows.psd_record(card), row_version=version, **changed)


def update_card(conn: Connection, card: CardRow, values: dict[str, Any]) -> int:
    """Write ``values`` to the locked card if its row version is unchanged; the new version."""
    version = card.row_version + 1
    result = execute(conn, _update_card_sql(frozenset(values)),
                     {"w_psd_id": card.psd_id, "w_row_version": card.row_version,
                      "new_row_version": version, **values})
    if result.rowcount != 1:
        raise Aborted("the record changed concurrently; retry the operation")
    return version


def add_event(conn: Connection, psd_id: str, at: datetime, event: str, detail: str,
              actor: str) -> None:
    execute(conn, _INSERT_EVENT, {"psd_id": psd_id, "at": at, "event": event,
                                  "detail": detail, "actor": actor})


def open_intent(conn: Connection, psd_id: str) -> IntentColumns | None:
    return execute(conn, _OPEN_INTENT, {"psd_id": psd_id}).one_or_none()


def pending_work(conn: Connection, card: CardRow, *, lock: bool = True) -> CampaignItem | None:
    """The card's pending item in a running campaign it can act on now, if any.

    With ``lock`` (a write transaction), on PostgreSQL the campaign row is
    share-locked, so a pause or cancel waits for this transaction rather than
    slipping between the read and the journal entry made from it.
    """
    if card.state != PsdState.ACTIVE.value or card.attention is not None:
        return None     # a card that needs an operator is passed by until one clears it
    found: WorkRow | None = execute(conn, _SHARE_WORK if lock else _READ_WORK,
                                    {"psd_id": card.psd_id,
                                     "mk_version": card.mk_version}).one_or_none()
    if found is None:
        return None
    return CampaignItem(
        campaign_id=found.campaign_id, psd_id=card.psd_id, status=ItemStatus(found.status),
        attempts=found.attempts, last_error=found.last_error, updated=found.updated,
        from_version=found.from_version, to_version=found.to_version)


@dataclass(frozen=True)
class Journaled:
    """A replacement intent written, and what the card's row must become with it."""

    intent: Intent
    card_values: dict[str, Any]


def describe_replacement(intent_id: int, from_version: int | None, to_version: int,
                         campaign_id: str | None) -> str:
    via = f" (campaign {campaign_id})" if campaign_id else ""
    return f"intent {intent_id}: replace MK v{from_version} by v{to_version}{via}"


def journal_replacement(conn: Connection, card: CardRow, *, from_version: int,
                        to_version: int, campaign_id: str | None, actor: str,
                        now: datetime, campaign_checked: bool = False) -> Journaled:
    """Journal MK ``from_version`` -> ``to_version`` on the locked card.

    The caller writes ``card_values`` to the card's row in the same
    transaction (with whatever else it changes there). With a campaign, the
    card's pending item in it (running, same versions) counts an attempt;
    ``campaign_checked`` says this transaction already read (and share-locked)
    the campaign as running with these versions, through ``pending_work``.
    """
    rows.refuse_revoked(card, "replacement")
    rows.expect_state(card, PsdState.ACTIVE)
    if card.mk_version != from_version:
        raise FailedPrecondition(
            f"PSD {card.psd_id} holds MK v{card.mk_version}, not v{from_version}")
    if campaign_id is not None:
        if not campaign_checked:
            _check_campaign(conn, campaign_id, from_version, to_version)
        _count_attempt(conn, campaign_id, card.psd_id, now)
    intent_id = execute(conn, _INSERT_INTENT, {
        "psd_id": card.psd_id, "kind": IntentKind.REPLACE.value,
        "from_version": from_version, "to_version": to_version, "mkrk_version": None,
        "status": IntentStatus.OPEN.value, "campaign_id": campaign_id,
        "created": now, "updated": now,
    }).scalar()
    add_event(conn, card.psd_id, now, EV_REPLACEMENT_BEGUN,
              describe_replacement(intent_id, from_version, to_version, campaign_id), actor)
    intent = Intent(intent_id=intent_id, psd_id=card.psd_id, kind=IntentKind.REPLACE,
                    from_version=from_version, to_version=to_version, mkrk_version=None,
                    status=IntentStatus.OPEN, campaign_id=campaign_id, created=now,
                    updated=now)
    return Journaled(intent, {"state": PsdState.REPLACEMENT_PENDING.value,
                              "pending_mk_version": to_version, "updated": now})


def _check_campaign(conn: Connection, campaign_id: str, from_version: int,
                    to_version: int) -> None:
    campaign: CampaignVersions | None = execute(
        conn, _SHARE_CAMPAIGN, {"campaign_id": campaign_id}).one_or_none()
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    if campaign.state != CampaignState.RUNNING.value:
        raise FailedPrecondition(f"campaign {campaign_id} is {campaign.state}, not running")
    if (campaign.from_version, campaign.to_version) != (from_version, to_version):
        raise FailedPrecondition(
            f"campaign {campaign_id} replaces v{campaign.from_version} by "
            f"v{campaign.to_version}, not v{from_version} by v{to_version}")


def _count_attempt(conn: Connection, campaign_id: str, psd_id: str, now: datetime) -> None:
    where = {"campaign_id": campaign_id, "psd_id": psd_id}
    if execute(conn, _COUNT_ATTEMPT, {**where, "updated": now}).rowcount == 1:
        return
    status = execute(conn, _ITEM_STATUS, where).scalar()
    if status is None:
        raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
    raise FailedPrecondition(
        f"PSD {psd_id} is {status} in campaign {campaign_id}, not pending")


def checked_open_intent(conn: Connection, psd_id: str, intent_id: int,
                        kind: IntentKind) -> IntentColumns:
    """The open intent ``intent_id`` of this card, of ``kind``, or why not."""
    intent = execute(conn, _INTENT, {"intent_id": intent_id}).one_or_none()
    return rows.check_open_intent(intent, psd_id, intent_id, kind)


def close_intent(conn: Connection, intent_id: int, status: IntentStatus,
                 now: datetime) -> None:
    execute(conn, _CLOSE_INTENT, {"intent_id": intent_id, "status": status.value,
                                  "updated": now})


def finish_campaign_item(conn: Connection, campaign_id: str, psd_id: str,
                         now: datetime) -> None:
    """The card's item is done (even if its campaign was cancelled meanwhile).

    The campaign row is locked first, so two cards finishing the last two
    items cannot both miss that the campaign has drained.
    """
    state = execute(conn, _LOCK_CAMPAIGN_STATE, {"campaign_id": campaign_id}).scalar()
    if state is None:
        raise NotFound(f"campaign {campaign_id} not found")
    done = execute(conn, _FINISH_ITEM, {"campaign_id": campaign_id, "psd_id": psd_id,
                                        "updated": now})
    if done.rowcount != 1:
        raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
    rows.complete_campaign_if_drained(conn, campaign_id, state, now)


def has_pending_items(conn: Connection, psd_id: str) -> bool:
    return execute(conn, _ANY_PENDING_OF_CARD, {"psd_id": psd_id}).one_or_none() is not None
