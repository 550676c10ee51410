"""Store: the driver statements of the per-contact path (``access_server.store.driver``).

They bypass SQLAlchemy's statement layer, so what it did for them is checked
here on both backends: the parameter style and row locks of each, times
stored exactly as the ORM stores them, and driver errors turned into the
same safe domain errors.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.exc import IntegrityError

from access_server.store import Store, contact
from access_server.store.dberrors import translate
from access_server.store.driver import Sql, execute, sqlite_time
from access_server.store.models import PsdEventRow
from cms.runtime.errors import Aborted
from tests.access_server.test_store_fixtures import ACTOR, psd, register

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")


def test_each_backend_gets_its_parameter_style_and_locks() -> None:
    sql = Sql("SELECT state FROM campaign WHERE campaign_id = :campaign_id{for_update}")
    shared = Sql("SELECT 1 FROM campaign_item JOIN campaign ON campaign.campaign_id = "
                 "campaign_item.campaign_id WHERE campaign_item.psd_id = :psd_id"
                 "{for_share:campaign}")

    assert sql.text["sqlite"] == "SELECT state FROM campaign WHERE campaign_id = :campaign_id"
    assert sql.text["postgresql"] == ("SELECT state FROM campaign "
                                      "WHERE campaign_id = %(campaign_id)s FOR UPDATE")
    assert shared.text["postgresql"].endswith("= %(psd_id)s FOR SHARE OF campaign")
    assert "FOR" not in shared.text["sqlite"]


def test_only_plain_words_are_spliced() -> None:
    assert Sql("SELECT 1 FROM intent WHERE status = {open}",
               literals={"open": "open"}).text["sqlite"].endswith("status = 'open'")
    with pytest.raises(ValueError, match="not a plain word"):
        Sql("SELECT 1 FROM intent WHERE status = {s}", literals={"s": "open' OR '1'='1"})
    with pytest.raises(ValueError, match="nothing to splice"):
        Sql("SELECT 1 FROM intent WHERE status = {unknown}")
    with pytest.raises(ValueError, match="literal %"):
        Sql("SELECT 1 FROM psd WHERE psd_id LIKE '%1'")


@pytest.mark.parametrize("at", [datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC),
                                datetime(2031, 5, 6, 7, 8, 9, 123456,
                                         tzinfo=UTC).astimezone()])
def test_times_are_stored_as_the_orm_stores_them(store: Store, at: datetime) -> None:
    card = psd(1)
    register(store, card)
    with store.engine.begin() as conn:
        contact.add_event(conn, card, at, "probe", "driver time", ACTOR)
        contact.update_card(conn, contact.lock_card(conn, card),
                            {"last_contact": at, "lease_expires": at + timedelta(seconds=1)})
    with store.engine.connect() as conn:
        orm_at = conn.execute(select(PsdEventRow.at).where(
            PsdEventRow.psd_id == card, PsdEventRow.event == "probe")).scalar()
        # The driver reads back what the ORM wrote at registration, and this.
        row = contact.read_card(conn, card)

    assert orm_at == at and orm_at.tzinfo is not None
    assert [e.at for e in store.history(card) if e.event == "probe"] == [at]
    assert store.get_psd(card).last_contact == at
    assert (row.last_contact, row.lease_expires) == (at, at + timedelta(seconds=1))
    assert row.created == store.get_psd(card).created


def test_a_driver_error_is_the_safe_domain_error(store: Store) -> None:
    secret = "not-for-any-message-4f1c"
    with pytest.raises(IntegrityError) as raised, store.engine.begin() as conn:
        # No such card: the event breaks the foreign key.
        contact.add_event(conn, psd(9), datetime.now(UTC), "probe", secret, ACTOR)

    error = translate(raised.value)
    assert isinstance(error, Aborted)
    assert secret not in str(raised.value) and secret not in error.message


def test_an_update_of_a_changed_row_is_aborted(store: Store) -> None:
    card = psd(2)
    register(store, card)
    with store.engine.begin() as conn:
        stale = contact.lock_card(conn, card)
        contact.update_card(conn, stale, {"lease_holder": "first"})
        with pytest.raises(Aborted, match="changed concurrently"):
            contact.update_card(conn, stale, {"lease_holder": "second"})
        assert execute(conn, Sql("SELECT lease_holder FROM psd WHERE psd_id = :psd_id"),
                       {"psd_id": card}).scalar() == "first"


@pytest.mark.parametrize("at", [datetime(2031, 1, 2, 3, 4, 5, tzinfo=UTC),
                                datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                                datetime(2031, 1, 2, 3, 4, 5, 7).astimezone()])
def test_sqlite_text_is_sqlalchemys_storage_format(at: datetime) -> None:
    naive = at.astimezone(UTC).replace(tzinfo=None)
    sqlalchemy_text = sqlite_dialect.DATETIME().bind_processor(sqlite_dialect.dialect())
    assert sqlite_time(at) == sqlalchemy_text(naive)
    with pytest.raises(ValueError, match="naive"):
        sqlite_time(naive)
