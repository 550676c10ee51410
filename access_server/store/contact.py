"""The transactions of a card contact, in SQLAlchemy Core.

A campaign contact runs two write transactions (``Store.start_contact``,
which also journals the replacement, and ``Store.complete_replacement``),
and a fleet runs them for every card. Through the ORM's unit of work each
statement cost about 0.4 ms of CPU, most of a contact's cost in the access
server; these functions say the same rules in plain statements on the
session's connection, several times cheaper. The rest of the store keeps the
ORM, where readability wins over the last millisecond.

The rules the ORM enforced are restated here: the card's row is locked
first (``FOR UPDATE`` on PostgreSQL; SQLite has one writer), and every
update of it checks and bumps ``row_version``, so a lost update is Aborted,
never silent. Lock order as in ``rows``: card, campaign, campaign items.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, bindparam, insert, select, update

from access_server.store import rows
from access_server.store.models import (
    CampaignItemRow,
    CampaignRow,
    IntentRow,
    PsdEventRow,
    PsdRow,
)
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

PSD = PsdRow.__table__
INTENT = IntentRow.__table__
EVENT = PsdEventRow.__table__
CAMPAIGN = CampaignRow.__table__
ITEM = CampaignItemRow.__table__

EV_REPLACEMENT_BEGUN = "replacement_begun"
EV_REPLACEMENT_COMPLETED = "replacement_completed"

# The statements are built once, here: building one per call (operators,
# cache keys) cost about as much as running it. Parameters in WHERE clauses
# are named ``w_*`` so they never clash with the columns an UPDATE sets from
# its parameters.
_PSD_ID = bindparam("w_psd_id")
_LOCK_CARD = select(*(c for c in PSD.c if c.name != "cryptogram")).where(
    PSD.c.psd_id == _PSD_ID).with_for_update()
_LOCK_CARD_WITH_CRYPTOGRAM = select(PSD).where(PSD.c.psd_id == _PSD_ID).with_for_update()
_READ_CARD = select(*(c for c in PSD.c if c.name != "cryptogram")).where(PSD.c.psd_id == _PSD_ID)
_UPDATE_CARD = update(PSD).where(PSD.c.psd_id == _PSD_ID,
                                 PSD.c.row_version == bindparam("w_row_version"))
_INSERT_EVENT = insert(EVENT)
_INSERT_INTENT = insert(INTENT)
_OPEN_INTENT = select(INTENT).where(INTENT.c.psd_id == _PSD_ID,
                                    INTENT.c.status == IntentStatus.OPEN.value)
_INTENT = select(INTENT).where(INTENT.c.intent_id == bindparam("w_intent_id"))
_CLOSE_INTENT = update(INTENT).where(INTENT.c.intent_id == bindparam("w_intent_id"))
_READ_WORK = (
    select(ITEM.c.campaign_id, ITEM.c.status, ITEM.c.attempts, ITEM.c.last_error,
           ITEM.c.updated, CAMPAIGN.c.from_version, CAMPAIGN.c.to_version)
    .join(CAMPAIGN, CAMPAIGN.c.campaign_id == ITEM.c.campaign_id)
    .where(ITEM.c.psd_id == _PSD_ID, ITEM.c.status == ItemStatus.PENDING.value,
           CAMPAIGN.c.state == CampaignState.RUNNING.value,
           CAMPAIGN.c.from_version == bindparam("w_mk_version"))
)
_SHARE_WORK = _READ_WORK.with_for_update(read=True, of=CAMPAIGN)
_CAMPAIGN_ID = bindparam("w_campaign_id")
_SHARE_CAMPAIGN = select(CAMPAIGN.c.state, CAMPAIGN.c.from_version, CAMPAIGN.c.to_version).where(
    CAMPAIGN.c.campaign_id == _CAMPAIGN_ID).with_for_update(read=True)
_LOCK_CAMPAIGN_STATE = select(CAMPAIGN.c.state).where(
    CAMPAIGN.c.campaign_id == _CAMPAIGN_ID).with_for_update()
_COUNT_ATTEMPT = update(ITEM).where(
    ITEM.c.campaign_id == _CAMPAIGN_ID, ITEM.c.psd_id == _PSD_ID,
    ITEM.c.status == ItemStatus.PENDING.value,
).values(attempts=ITEM.c.attempts + 1, updated=bindparam("w_now"))
_ITEM_STATUS = select(ITEM.c.status).where(ITEM.c.campaign_id == _CAMPAIGN_ID,
                                           ITEM.c.psd_id == _PSD_ID)
_UPDATE_ITEM = update(ITEM).where(ITEM.c.campaign_id == _CAMPAIGN_ID, ITEM.c.psd_id == _PSD_ID)
_ANY_PENDING_OF_CARD = select(ITEM.c.campaign_id).where(
    ITEM.c.psd_id == _PSD_ID, ITEM.c.status == ItemStatus.PENDING.value).limit(1)


def lock_card(conn: Connection, psd_id: str, *, with_cryptogram: bool = False) -> Row[Any]:
    """The card's row, locked for the rest of the transaction; NotFound if absent."""
    return _card(conn, _LOCK_CARD_WITH_CRYPTOGRAM if with_cryptogram else _LOCK_CARD, psd_id)


def read_card(conn: Connection, psd_id: str) -> Row[Any]:
    """The card's row, without its cryptogram and without a lock; NotFound if absent."""
    return _card(conn, _READ_CARD, psd_id)


def _card(conn: Connection, statement: Any, psd_id: str) -> Row[Any]:
    card = conn.execute(statement, {"w_psd_id": psd_id}).one_or_none()
    if card is None:
        raise rows.not_registered(psd_id)
    return card


def record_after(card: Row[Any], version: int, values: dict[str, Any]) -> PsdRecord:
    """The card's record once ``update_card`` has written ``values`` as ``version``."""
    changed = {k: PsdState(x) if k == "state" else x for k, x in values.items()}
    return replace(rows.psd_record(card), row_version=version, **changed)


def update_card(conn: Connection, card: Row[Any], values: dict[str, Any]) -> int:
    """Write ``values`` to the locked card if its row version is unchanged; the new version."""
    version = card.row_version + 1
    result = conn.execute(_UPDATE_CARD, {"w_psd_id": card.psd_id,
                                         "w_row_version": card.row_version,
                                         "row_version": version, **values})
    if result.rowcount != 1:
        raise Aborted("the record changed concurrently; retry the operation")
    return version


def add_event(conn: Connection, psd_id: str, at: datetime, event: str, detail: str,
              actor: str) -> None:
    conn.execute(_INSERT_EVENT, {"psd_id": psd_id, "at": at, "event": event,
                                 "detail": detail, "actor": actor})


def open_intent(conn: Connection, psd_id: str) -> Row[Any] | None:
    return conn.execute(_OPEN_INTENT, {"w_psd_id": psd_id}).one_or_none()


def pending_work(conn: Connection, card: Row[Any], *, lock: bool = True) -> CampaignItem | None:
    """The card's pending item in a running campaign it can act on now, if any.

    With ``lock`` (a write transaction), on PostgreSQL the campaign row is
    share-locked, so a pause or cancel waits for this transaction rather than
    slipping between the read and the journal entry made from it.
    """
    if card.state != PsdState.ACTIVE.value:
        return None
    found = conn.execute(_SHARE_WORK if lock else _READ_WORK,
                         {"w_psd_id": card.psd_id, "w_mk_version": card.mk_version}).first()
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


def journal_replacement(conn: Connection, card: Row[Any], *, from_version: int,
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
    intent_id = conn.execute(_INSERT_INTENT, {
        "psd_id": card.psd_id, "kind": IntentKind.REPLACE.value,
        "from_version": from_version, "to_version": to_version, "mkrk_version": None,
        "status": IntentStatus.OPEN.value, "campaign_id": campaign_id,
        "created": now, "updated": now,
    }).inserted_primary_key[0]
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
    campaign = conn.execute(_SHARE_CAMPAIGN, {"w_campaign_id": campaign_id}).one_or_none()
    if campaign is None:
        raise NotFound(f"campaign {campaign_id} not found")
    if campaign.state != CampaignState.RUNNING.value:
        raise FailedPrecondition(f"campaign {campaign_id} is {campaign.state}, not running")
    if (campaign.from_version, campaign.to_version) != (from_version, to_version):
        raise FailedPrecondition(
            f"campaign {campaign_id} replaces v{campaign.from_version} by "
            f"v{campaign.to_version}, not v{from_version} by v{to_version}")


def _count_attempt(conn: Connection, campaign_id: str, psd_id: str, now: datetime) -> None:
    where = {"w_campaign_id": campaign_id, "w_psd_id": psd_id}
    if conn.execute(_COUNT_ATTEMPT, {**where, "w_now": now}).rowcount == 1:
        return
    status = conn.execute(_ITEM_STATUS, where).scalar_one_or_none()
    if status is None:
        raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
    raise FailedPrecondition(
        f"PSD {psd_id} is {status} in campaign {campaign_id}, not pending")


def checked_open_intent(conn: Connection, psd_id: str, intent_id: int,
                        kind: IntentKind) -> Row[Any]:
    """The open intent ``intent_id`` of this card, of ``kind``, or why not."""
    intent = conn.execute(_INTENT, {"w_intent_id": intent_id}).one_or_none()
    return rows.check_open_intent(intent, psd_id, intent_id, kind)


def close_intent(conn: Connection, intent_id: int, status: IntentStatus,
                 now: datetime) -> None:
    conn.execute(_CLOSE_INTENT, {"w_intent_id": intent_id, "status": status.value,
                                 "updated": now})


def finish_campaign_item(conn: Connection, campaign_id: str, psd_id: str,
                         now: datetime) -> None:
    """The card's item is done (even if its campaign was cancelled meanwhile).

    The campaign row is locked first, so two cards finishing the last two
    items cannot both miss that the campaign has drained.
    """
    campaign = {"w_campaign_id": campaign_id}
    state = conn.execute(_LOCK_CAMPAIGN_STATE, campaign).scalar_one_or_none()
    if state is None:
        raise NotFound(f"campaign {campaign_id} not found")
    done = conn.execute(_UPDATE_ITEM, {**campaign, "w_psd_id": psd_id,
                                       "status": ItemStatus.DONE.value, "last_error": None,
                                       "updated": now})
    if done.rowcount != 1:
        raise NotFound(f"PSD {psd_id} is not part of campaign {campaign_id}")
    rows.complete_campaign_if_drained(conn, campaign_id, state, now)


def has_pending_items(conn: Connection, psd_id: str) -> bool:
    return conn.execute(_ANY_PENDING_OF_CARD, {"w_psd_id": psd_id}).first() is not None
