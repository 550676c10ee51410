"""Store: the Core statements of the per-contact path run on the driver (``driver``, ``cards``).

They bypass SQLAlchemy's execution layer, so what it did for them is checked
here on both backends: the parameter style and row locks of each, times
stored exactly as the ORM stores them, and driver errors turned into the
same safe domain errors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from access_server.store import Store, cards
from access_server.store.dberrors import translate
from access_server.store.driver import Statement, execute, fixed
from access_server.store.models import CampaignItemRow, CampaignRow, PsdEventRow, PsdRow
from cms.runtime.errors import Aborted
from tests.access_server.test_store_fixtures import ACTOR, psd, register

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

CAMPAIGN, ITEM, PSD = CampaignRow.__table__, CampaignItemRow.__table__, PsdRow.__table__
SQLITE, POSTGRES = sqlite_dialect.dialect(), postgresql.psycopg.dialect()


def test_each_backend_gets_its_parameter_style_and_locks() -> None:
    locked = Statement(select(CAMPAIGN.c.state)
                       .where(CAMPAIGN.c.campaign_id == bindparam("campaign_id"))
                       .with_for_update())
    shared = Statement(select(ITEM.c.psd_id)
                       .join_from(ITEM, CAMPAIGN, CAMPAIGN.c.campaign_id == ITEM.c.campaign_id)
                       .where(ITEM.c.psd_id == bindparam("psd_id"))
                       .with_for_update(read=True, of=CAMPAIGN))

    sqlite_text = " ".join(locked.compiled(SQLITE).text.split())
    postgres_text = " ".join(locked.compiled(POSTGRES).text.split())
    assert sqlite_text == ("SELECT campaign.state FROM campaign "
                           "WHERE campaign.campaign_id = ?")
    assert postgres_text == ("SELECT campaign.state FROM campaign "
                             "WHERE campaign.campaign_id = %(campaign_id)s::VARCHAR FOR UPDATE")
    assert shared.compiled(POSTGRES).text.endswith("FOR SHARE OF campaign")
    assert "FOR" not in shared.compiled(SQLITE).text
    assert locked.compiled(SQLITE).parameters({"campaign_id": "c1"}) == ("c1",)
    assert locked.compiled(POSTGRES).parameters({"campaign_id": "c1"}) == {"campaign_id": "c1"}


def test_fixed_state_names_are_written_into_the_statement() -> None:
    # A bound state name would have SQLite plan the statement again at every run.
    pending = Statement(select(ITEM.c.psd_id)
                        .where(ITEM.c.psd_id == bindparam("psd_id"),
                               ITEM.c.status == fixed(ITEM.c.status, "pending")))

    for dialect in (SQLITE, POSTGRES):
        assert pending.compiled(dialect).text.endswith("campaign_item.status = 'pending'")
    assert pending.compiled(SQLITE).parameters({"psd_id": "p1"}) == ("p1",)
    assert "o''clock" in str(fixed(ITEM.c.status, "o'clock"))


def test_a_statement_renders_completely_or_is_refused() -> None:
    pending = Statement(select(ITEM.c.psd_id).where(ITEM.c.status == "pending").limit(1))
    assert pending.compiled(SQLITE).parameters({}) == ("pending", 1, 0)
    with pytest.raises(ValueError, match="no value for the statement's parameter"):
        Statement(select(ITEM.c.psd_id).where(ITEM.c.psd_id == bindparam("psd_id"))
                  ).compiled(SQLITE).parameters({})
    with pytest.raises(ValueError, match="render completely"):
        # An IN list is rendered anew at each execution: not for the driver path.
        Statement(select(ITEM.c.psd_id).where(ITEM.c.status.in_(("pending", "failed"))))


@pytest.mark.parametrize("at", [datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),
                                datetime(2031, 5, 6, 7, 8, 9, 123456,
                                         tzinfo=UTC).astimezone()])
def test_times_are_stored_as_the_orm_stores_them(store: Store, at: datetime) -> None:
    card = psd(1)
    register(store, card)
    with store.engine.begin() as conn:
        cards.add_event(conn, card, at, "probe", "driver time", ACTOR)
        cards.update_card(conn, cards.lock_card(conn, card),
                          {"last_contact": at, "lease_expires": at + timedelta(seconds=1)})
    with store.engine.connect() as conn:
        orm_at = conn.execute(select(PsdEventRow.at).where(
            PsdEventRow.psd_id == card, PsdEventRow.event == "probe")).scalar()
        # The driver reads back what the ORM wrote at registration, and this.
        row = cards.read_card(conn, card)

    assert orm_at == at and orm_at.tzinfo is not None
    assert [e.at for e in store.history(card) if e.event == "probe"] == [at]
    assert store.get_psd(card).last_contact == at
    assert (row.last_contact, row.lease_expires) == (at, at + timedelta(seconds=1))
    assert row.created == store.get_psd(card).created


def test_a_driver_error_is_the_safe_domain_error(store: Store) -> None:
    secret = "not-for-any-message-4f1c"
    with pytest.raises(IntegrityError) as raised, store.engine.begin() as conn:
        # No such card: the event breaks the foreign key.
        cards.add_event(conn, psd(9), datetime.now(UTC), "probe", secret, ACTOR)

    error = translate(raised.value)
    assert isinstance(error, Aborted)
    assert secret not in str(raised.value) and secret not in error.message


def test_an_update_of_a_changed_row_is_aborted(store: Store) -> None:
    card = psd(2)
    register(store, card)
    with store.engine.begin() as conn:
        stale = cards.lock_card(conn, card)
        cards.update_card(conn, stale, {"lease_holder": "first"})
        with pytest.raises(Aborted, match="changed concurrently"):
            cards.update_card(conn, stale, {"lease_holder": "second"})
        holder = Statement(select(PSD.c.lease_holder)
                           .where(PSD.c.psd_id == bindparam("psd_id")))
        assert execute(conn, holder, {"psd_id": card}).scalar() == "first"


@pytest.mark.parametrize("at", [datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
                                datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                                datetime(2031, 1, 2, 3, 4, 5, 7).astimezone()])
def test_sqlite_text_is_sqlalchemys_storage_format(at: datetime) -> None:
    naive = at.astimezone(UTC).replace(tzinfo=None)
    sqlalchemy_text = sqlite_dialect.DATETIME().bind_processor(sqlite_dialect.dialect())
    at_type = PSD.c.last_contact.type
    touched = Statement(select(PSD.c.psd_id)
                        .where(PSD.c.last_contact == bindparam("at", type_=at_type)))
    compiled = touched.compiled(SQLITE)
    assert compiled.parameters({"at": at}) == (sqlalchemy_text(naive),)
    with pytest.raises(ValueError, match="naive"):
        compiled.parameters({"at": naive})
