"""The card's row, its intents and its events, as Core statements on the driver connection.

A campaign contact reads the card (``Store.read_contact``), has the card
prove its keys, then runs two write transactions (``Store.start_contact``,
which takes the lease and journals the replacement, and
``Store.complete_replacement``); a station's installation runs the same
kind of transactions. Through the ORM's unit of work each statement
cost about 0.4 ms of CPU, and through SQLAlchemy's statement layer still
about 0.15 ms; these are Core expressions over the model tables compiled
once per dialect (``driver``) and run on the transaction's driver
connection, several times cheaper again. Each operation on a card's row, on
the intent journal and on the history has its one helper here, with the
rules a card's state sets; the transactions that also change campaign items
(``registry``, and ``reconcile`` and ``abandon_intent`` in ``contacts``)
call them on their session's connection and keep the ORM for the items.

The rules the ORM's version counter enforced are kept here: the card's row
is locked first (``FOR UPDATE`` on PostgreSQL; SQLite has one writer), and
every update of it checks and bumps ``row_version``, so a lost update is
Aborted, never silent. Lock order as in ``rows``: card, campaign, campaign
items. Rows are read straight into the store's records.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.sql import ColumnElement

from access_server.store import rows
from access_server.store.driver import Statement, execute, fixed
from access_server.store.models import CampaignItemRow, CampaignRow, IntentRow, PsdEventRow, PsdRow
from access_server.store.records import (
    CampaignItem,
    CampaignState,
    Cryptogram,
    Intent,
    IntentKind,
    IntentStatus,
    ItemStatus,
    PsdRecord,
    PsdState,
)
from cms.runtime.errors import Aborted, FailedPrecondition, NotFound

EV_INSTALL_BEGUN = "install_begun"
EV_INSTALL_COMPLETED = "install_completed"
EV_REPLACEMENT_BEGUN = "replacement_begun"
EV_REPLACEMENT_COMPLETED = "replacement_completed"
EV_INTENT_ABANDONED = "intent_abandoned"

_PSD = PsdRow.__table__
_EVENT = PsdEventRow.__table__
_INTENT = IntentRow.__table__
_CAMPAIGN = CampaignRow.__table__
_ITEM = CampaignItemRow.__table__


def _param(column: ColumnElement[Any], name: str | None = None) -> Any:
    """A bound parameter for ``column``'s value, of its type (which processes the value)."""
    return bindparam(name or column.key, type_=column.type)


def _insert(table: Any, columns: list[str]) -> Any:
    return insert(table).values({name: _param(table.c[name]) for name in columns})


_PENDING = fixed(_ITEM.c.status, ItemStatus.PENDING.value)
_CARD_COLUMNS = [column for column in _PSD.c if column.key != "cryptogram"]
_BY_PSD_ID = _PSD.c.psd_id == _param(_PSD.c.psd_id)
_LOCK_CARD = Statement(select(*_CARD_COLUMNS).where(_BY_PSD_ID).with_for_update())
_LOCK_CARD_WITH_CRYPTOGRAM = Statement(select(_PSD).where(_BY_PSD_ID).with_for_update())
_READ_CARD = Statement(select(*_CARD_COLUMNS).where(_BY_PSD_ID))
_READ_CARD_WITH_CRYPTOGRAM = Statement(select(_PSD).where(_BY_PSD_ID))
_INSERT_EVENT = Statement(_insert(_EVENT, ["psd_id", "at", "event", "detail", "actor"]))
_INSERT_INTENT = Statement(
    _insert(_INTENT, [c.key for c in _INTENT.c if c.key != "intent_id"])
    .returning(_INTENT.c.intent_id))
_OPEN_INTENT = Statement(select(_INTENT).where(
    _INTENT.c.psd_id == _param(_INTENT.c.psd_id),
    _INTENT.c.status == fixed(_INTENT.c.status, IntentStatus.OPEN.value)))
_INTENT_BY_ID = Statement(select(_INTENT).where(
    _INTENT.c.intent_id == _param(_INTENT.c.intent_id)))
_CLOSE_INTENT = Statement(
    update(_INTENT).where(_INTENT.c.intent_id == _param(_INTENT.c.intent_id))
    .values(status=_param(_INTENT.c.status), updated=_param(_INTENT.c.updated)))
_WORK = (
    select(_ITEM.c.campaign_id, _ITEM.c.status, _ITEM.c.attempts, _ITEM.c.last_error,
           _ITEM.c.updated, _CAMPAIGN.c.from_version, _CAMPAIGN.c.to_version)
    .join_from(_ITEM, _CAMPAIGN, _CAMPAIGN.c.campaign_id == _ITEM.c.campaign_id)
    .where(_ITEM.c.psd_id == _param(_ITEM.c.psd_id),
           _ITEM.c.status == _PENDING,
           _CAMPAIGN.c.state == fixed(_CAMPAIGN.c.state, CampaignState.RUNNING.value),
           _CAMPAIGN.c.from_version == _param(_CAMPAIGN.c.from_version, "mk_version")))
_READ_WORK = Statement(_WORK)
# The campaign row share-locked: a pause or cancel waits for this transaction.
_SHARE_WORK = Statement(_WORK.with_for_update(read=True, of=_CAMPAIGN))
_BY_CAMPAIGN_ID = _CAMPAIGN.c.campaign_id == _param(_CAMPAIGN.c.campaign_id)
_SHARE_CAMPAIGN = Statement(
    select(_CAMPAIGN.c.state, _CAMPAIGN.c.from_version, _CAMPAIGN.c.to_version)
    .where(_BY_CAMPAIGN_ID).with_for_update(read=True))
_LOCK_CAMPAIGN_STATE = Statement(
    select(_CAMPAIGN.c.state).where(_BY_CAMPAIGN_ID).with_for_update())
_THE_ITEM = (_ITEM.c.campaign_id == _param(_ITEM.c.campaign_id),
             _ITEM.c.psd_id == _param(_ITEM.c.psd_id))
_COUNT_ATTEMPT = Statement(
    update(_ITEM).where(*_THE_ITEM, _ITEM.c.status == _PENDING)
    .values(attempts=_ITEM.c.attempts + 1, updated=_param(_ITEM.c.updated)))
_ITEM_STATUS = Statement(select(_ITEM.c.status).where(*_THE_ITEM))
_FINISH_ITEM = Statement(
    update(_ITEM).where(*_THE_ITEM)
    .values(status=ItemStatus.DONE.value, last_error=None, updated=_param(_ITEM.c.updated)))
_ANY_PENDING_OF_CARD = Statement(
    select(_ITEM.c.campaign_id)
    .where(_ITEM.c.psd_id == _param(_ITEM.c.psd_id),
           _ITEM.c.status == _PENDING).limit(1))

UPDATABLE_CARD_COLUMNS = frozenset(_PSD.c.keys()) - {"psd_id", "row_version"}
_UPDATE_CARD: dict[frozenset[str], Statement] = {}


def _update_card_statement(columns: frozenset[str]) -> Statement:
    """``UPDATE psd SET <columns>`` guarded by the row version, made once per column set."""
    statement = _UPDATE_CARD.get(columns)
    if statement is None:
        unknown = columns - UPDATABLE_CARD_COLUMNS
        if unknown:
            raise ValueError(f"not updatable psd columns: {sorted(unknown)}")
        statement = _UPDATE_CARD[columns] = Statement(
            update(_PSD)
            .where(_PSD.c.psd_id == _param(_PSD.c.psd_id, "w_psd_id"),
                   _PSD.c.row_version == _param(_PSD.c.row_version, "w_row_version"))
            .values({**{name: _param(_PSD.c[name]) for name in sorted(columns)},
                     "row_version": _param(_PSD.c.row_version, "new_row_version")}))
    return statement


# -- the card's row -------------------------------------------------------------------


def not_registered(psd_id: str) -> NotFound:
    return NotFound(f"PSD {psd_id} is not registered")


def refuse_revoked(card: PsdRecord, action: str) -> None:
    """FailedPrecondition for a revoked card: the server does no more work on it."""
    if card.state is PsdState.REVOKED:
        raise FailedPrecondition(
            f"PSD {card.psd_id} is revoked: the server does no further work on it ({action})"
        )


def expect_state(card: PsdRecord, state: PsdState) -> None:
    """FailedPrecondition unless the card is in ``state``."""
    if card.state is not state:
        raise FailedPrecondition(f"PSD {card.psd_id} is {card.state}, not {state.value}")


def lock_card(conn: Connection, psd_id: str) -> PsdRecord:
    """The card's record, its row locked for the rest of the transaction; NotFound if absent."""
    return rows.psd_record(_card(conn, _LOCK_CARD, psd_id))


def read_card(conn: Connection, psd_id: str) -> PsdRecord:
    """The card's record, without a lock; NotFound if absent."""
    return rows.psd_record(_card(conn, _READ_CARD, psd_id))


def card_and_cryptogram(conn: Connection, psd_id: str, *,
                        lock: bool) -> tuple[PsdRecord, Cryptogram | None]:
    """The card's record and its cryptogram (None if it has none), in one read."""
    row = _card(conn, _LOCK_CARD_WITH_CRYPTOGRAM if lock else _READ_CARD_WITH_CRYPTOGRAM, psd_id)
    cryptogram = None
    if row.cryptogram is not None and row.cryptogram_key_label is not None:
        cryptogram = Cryptogram(psd_id=psd_id, ciphertext=bytes(row.cryptogram),
                                key_label=row.cryptogram_key_label)
    return rows.psd_record(row), cryptogram


def _card(conn: Connection, statement: Statement, psd_id: str) -> Any:
    card = execute(conn, statement, {"psd_id": psd_id}).one_or_none()
    if card is None:
        raise not_registered(psd_id)
    return card


def update_card(conn: Connection, card: PsdRecord, values: dict[str, Any]) -> PsdRecord:
    """Write ``values`` (columns of ``psd``) to the locked card if its row version is
    unchanged; the card's record as the transaction leaves it."""
    version = card.row_version + 1
    result = execute(conn, _update_card_statement(frozenset(values)),
                     {"w_psd_id": card.psd_id, "w_row_version": card.row_version,
                      "new_row_version": version, **values})
    if result.rowcount != 1:
        raise Aborted("the record changed concurrently; retry the operation")
    changed = {name: value for name, value in values.items() if name != "cryptogram"}
    if "state" in changed:
        changed["state"] = PsdState(changed["state"])
    if "cryptogram_key_label" in changed:
        changed["has_cryptogram"] = changed["cryptogram_key_label"] is not None
    return replace(card, row_version=version, **changed)


def release_lease(card: PsdRecord, holder: str | None, values: dict[str, Any]) -> None:
    """Have ``values`` give back ``holder``'s lease, in the transaction that ends its work."""
    if holder is not None and card.lease_holder == holder:
        values.update(lease_holder=None, lease_expires=None)


# -- history and intents -------------------------------------------------------------


def add_event(conn: Connection, psd_id: str, at: datetime, event: str, detail: str,
              actor: str) -> None:
    execute(conn, _INSERT_EVENT, {"psd_id": psd_id, "at": at, "event": event,
                                  "detail": detail, "actor": actor})


def open_intent(conn: Connection, psd_id: str) -> Intent | None:
    found = execute(conn, _OPEN_INTENT, {"psd_id": psd_id}).one_or_none()
    return None if found is None else rows.intent_record(found)


def checked_open_intent(conn: Connection, psd_id: str, intent_id: int,
                        kind: IntentKind | None) -> Intent:
    """The open intent ``intent_id`` of this card (of ``kind`` if given), or why not."""
    found = execute(conn, _INTENT_BY_ID, {"intent_id": intent_id}).one_or_none()
    if found is None or found.psd_id != psd_id:
        raise NotFound(f"intent {intent_id} of PSD {psd_id} not found")
    if found.status != IntentStatus.OPEN.value:
        raise FailedPrecondition(
            f"intent {intent_id} of PSD {psd_id} is {found.status}, not open")
    if kind is not None and found.kind != kind.value:
        raise FailedPrecondition(
            f"intent {intent_id} of PSD {psd_id} is an {found.kind} intent, not {kind.value}")
    return rows.intent_record(found)


def get_intent(conn: Connection, intent_id: int) -> Intent | None:
    found = execute(conn, _INTENT_BY_ID, {"intent_id": intent_id}).one_or_none()
    return None if found is None else rows.intent_record(found)


def journal(conn: Connection, psd_id: str, kind: IntentKind, *, from_version: int | None,
            to_version: int, mkrk_version: int | None, campaign_id: str | None,
            now: datetime) -> Intent:
    """An open intent of ``kind`` for the card (its row already locked)."""
    intent_id = execute(conn, _INSERT_INTENT, {
        "psd_id": psd_id, "kind": kind.value, "from_version": from_version,
        "to_version": to_version, "mkrk_version": mkrk_version,
        "status": IntentStatus.OPEN.value, "campaign_id": campaign_id,
        "created": now, "updated": now,
    }).scalar()
    return Intent(intent_id=intent_id, psd_id=psd_id, kind=kind, from_version=from_version,
                  to_version=to_version, mkrk_version=mkrk_version, status=IntentStatus.OPEN,
                  campaign_id=campaign_id, created=now, updated=now)


def close_intent(conn: Connection, intent_id: int, status: IntentStatus,
                 now: datetime) -> None:
    execute(conn, _CLOSE_INTENT, {"intent_id": intent_id, "status": status.value,
                                  "updated": now})


def describe(intent: Intent) -> str:
    """How the history names an intent."""
    if intent.kind is IntentKind.INSTALL:
        return (f"intent {intent.intent_id}: install MKRK v{intent.mkrk_version} "
                f"and MK v{intent.to_version}")
    via = f" (campaign {intent.campaign_id})" if intent.campaign_id else ""
    return (f"intent {intent.intent_id}: replace MK v{intent.from_version} "
            f"by v{intent.to_version}{via}")


# -- flow A: journal and complete ----------------------------------------------------


@dataclass(frozen=True)
class Journaled:
    """An intent written, and what the card's row must become with it."""

    intent: Intent
    card_values: dict[str, Any]


def journal_install(conn: Connection, card: PsdRecord, *, cryptogram: bytes, label: str,
                    mkrk_version: int, mk_version: int, restart: bool, actor: str,
                    now: datetime) -> Journaled:
    """Journal an installation on the locked card, with the cryptogram it will store.

    From blank; from installing only with ``restart`` (the caller found the
    card still on its transport keys), which abandons the earlier intent.
    """
    _allow_install(conn, card, restart, actor, now)
    intent = journal(conn, card.psd_id, IntentKind.INSTALL, from_version=None,
                     to_version=mk_version, mkrk_version=mkrk_version, campaign_id=None,
                     now=now)
    add_event(conn, card.psd_id, now, EV_INSTALL_BEGUN,
              f"{describe(intent)}; cryptogram made with {label}", actor)
    return Journaled(intent, {
        "state": PsdState.INSTALLING.value, "cryptogram": cryptogram,
        "cryptogram_key_label": label, "mk_version": None, "mkrk_version": None,
        "pending_mk_version": mk_version, "updated": now})


def _allow_install(conn: Connection, card: PsdRecord, restart: bool, actor: str,
                   now: datetime) -> None:
    if card.state is PsdState.BLANK:
        return
    refuse_revoked(card, "installation")
    if card.state is not PsdState.INSTALLING:
        raise FailedPrecondition(
            f"PSD {card.psd_id} is {card.state}; installation starts from blank")
    if not restart:
        raise FailedPrecondition(
            f"PSD {card.psd_id} already has an installation journaled: probe the card, and "
            "restart only if it still holds its transport keys (else reconcile)")
    previous = open_intent(conn, card.psd_id)
    if previous is not None:
        close_intent(conn, previous.intent_id, IntentStatus.ABANDONED, now)
        add_event(conn, card.psd_id, now, EV_INTENT_ABANDONED,
                  f"{describe(previous)}: superseded, card still on transport keys", actor)


def journal_replacement(conn: Connection, card: PsdRecord, *, from_version: int,
                        to_version: int, campaign_id: str | None, actor: str,
                        now: datetime, campaign_checked: bool = False) -> Journaled:
    """Journal MK ``from_version`` -> ``to_version`` on the locked card.

    The caller writes ``card_values`` to the card's row in the same
    transaction (with whatever else it changes there). With a campaign, the
    card's pending item in it (running, same versions) counts an attempt;
    ``campaign_checked`` says this transaction already read (and share-locked)
    the campaign as running with these versions, through ``pending_work``.
    """
    refuse_revoked(card, "replacement")
    expect_state(card, PsdState.ACTIVE)
    if card.mk_version != from_version:
        raise FailedPrecondition(
            f"PSD {card.psd_id} holds MK v{card.mk_version}, not v{from_version}")
    if campaign_id is not None:
        if not campaign_checked:
            _check_campaign(conn, campaign_id, from_version, to_version)
        _count_attempt(conn, campaign_id, card.psd_id, now)
    intent = journal(conn, card.psd_id, IntentKind.REPLACE, from_version=from_version,
                     to_version=to_version, mkrk_version=None, campaign_id=campaign_id,
                     now=now)
    add_event(conn, card.psd_id, now, EV_REPLACEMENT_BEGUN, describe(intent), actor)
    return Journaled(intent, {"state": PsdState.REPLACEMENT_PENDING.value,
                              "pending_mk_version": to_version, "updated": now})


_COMPLETING = {
    IntentKind.INSTALL: (PsdState.INSTALLING, "complete installation", EV_INSTALL_COMPLETED),
    IntentKind.REPLACE: (PsdState.REPLACEMENT_PENDING, "complete replacement",
                         EV_REPLACEMENT_COMPLETED),
}
"""For each kind of intent: the state the card is in until it completes, the action
named when a revoked card refuses it, and the event that records it."""


def complete_intent(conn: Connection, psd_id: str, intent_id: int, kind: IntentKind, *,
                    actor: str, release_lease_of: str | None,
                    now: datetime) -> tuple[PsdRecord, bool]:
    """The card holds what its open intent of ``kind`` aimed at: active, intent done.

    An installation's card takes the intent's MKRK and MK versions, a
    replacement's the new MK; a campaign replacement's item is done. Returns
    the card's record and whether it still waits in a campaign (rare: another
    campaign its new version settles, which the caller does).
    """
    waiting_state, action, event = _COMPLETING[kind]
    card = lock_card(conn, psd_id)
    refuse_revoked(card, action)
    intent = checked_open_intent(conn, psd_id, intent_id, kind)
    expect_state(card, waiting_state)
    values: dict[str, Any] = {"state": PsdState.ACTIVE.value, "mk_version": intent.to_version,
                              "pending_mk_version": None, "updated": now}
    if kind is IntentKind.INSTALL:
        values["mkrk_version"] = intent.mkrk_version
    release_lease(card, release_lease_of, values)
    record = update_card(conn, card, values)
    close_intent(conn, intent_id, IntentStatus.DONE, now)
    add_event(conn, psd_id, now, event, describe(intent), actor)
    if intent.campaign_id is not None:
        finish_campaign_item(conn, intent.campaign_id, psd_id, now)
    return record, has_pending_items(conn, psd_id)


# -- campaign work -----------------------------------------------------------------


def pending_work(conn: Connection, card: PsdRecord, *, lock: bool = True) -> CampaignItem | None:
    """The card's pending item in a running campaign it can act on now, if any.

    With ``lock`` (a write transaction), on PostgreSQL the campaign row is
    share-locked, so a pause or cancel waits for this transaction rather than
    slipping between the read and the journal entry made from it.
    """
    if card.state is not PsdState.ACTIVE or card.attention is not None:
        return None     # a card that needs an operator is passed by until one clears it
    found = execute(conn, _SHARE_WORK if lock else _READ_WORK,
                    {"psd_id": card.psd_id, "mk_version": card.mk_version}).one_or_none()
    if found is None:
        return None
    return CampaignItem(
        campaign_id=found.campaign_id, psd_id=card.psd_id, status=ItemStatus(found.status),
        attempts=found.attempts, last_error=found.last_error, updated=found.updated,
        from_version=found.from_version, to_version=found.to_version)


def _check_campaign(conn: Connection, campaign_id: str, from_version: int,
                    to_version: int) -> None:
    campaign = execute(conn, _SHARE_CAMPAIGN, {"campaign_id": campaign_id}).one_or_none()
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
