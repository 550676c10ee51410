"""Users, derivation elements, issuance records and bureau results in the store, on SQLite
and PostgreSQL: an element is never handed out twice, not even after its user is removed;
an issuance takes cards first in, first out for known users with no card in flight, all or
none; results move cards to personalized or quarantine, all rows or none; a dispatch
confirmation ships personalized cards, all rows or none."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from access_server.store import (
    CardDispatched,
    CardResult,
    IssuanceState,
    IssuedCard,
    StockState,
    Store,
)
from access_server.store.models import DerivationCounterRow, IssuanceRow, StockCardRow
from cms.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.access_server.test_stock_store import device_keys, do_import, root, verified_pack
from tests.access_server.test_store_fixtures import ACTOR
from tests.support import stock as S

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

__all__ = ["device_keys", "root"]  # the stock tests' fixtures, used here too


def stock_up(store: Store, root: S.Root, keys: S.DeviceKeys, serial: str, count: int) -> None:
    do_import(store, verified_pack(store, root, keys, serial, count))


def add_users(store: Store, count: int) -> list[int]:
    return [store.add_user(f"User {n}", f"{n} Main Street\n1000 Town", None, ACTOR).user_id
            for n in range(count)]


def counts(store: Store) -> dict[StockState, int]:
    total = dict.fromkeys(StockState, 0)
    for pack in store.stock_counts():
        for state, value in pack.counts.items():
            total[state] += value
    return total


def issued(prepared) -> list[IssuedCard]:
    return [IssuedCard(p.card.serial, b"\x04" + bytes(64), b"wrapped" + bytes(32), 1,
                       b"\x02" + bytes(32)) for p in prepared]


def test_derivation_elements_are_never_reused_after_removal(store: Store) -> None:
    a = store.add_user("Ada", "1 Lane", "ada@example.org", ACTOR)
    b = store.add_user("Bob", "2 Lane", None, ACTOR)
    assert (a.derivation_element, b.derivation_element) == (1, 2)

    removed = store.remove_user(b.user_id)
    assert removed.derivation_element == 2
    with pytest.raises(NotFound, match=f"no user {b.user_id}"):
        store.get_user(b.user_id)
    # Bob's row is gone, so MAX()+1 over the users would hand out 2 again; the counter does not.
    c = store.add_user("Cy", "3 Lane", None, ACTOR)
    assert c.derivation_element == 3
    assert c.user_id > b.user_id  # nor is Bob's id
    assert [u.name for u in store.list_users()] == ["Ada", "Cy"]
    with store.engine.connect() as connection:
        assert connection.scalar(select(DerivationCounterRow.next_element)) == 4


def test_concurrent_additions_get_distinct_elements(store: Store) -> None:
    elements: list[int] = []

    def add(n: int) -> None:
        for i in range(5):
            elements.append(store.add_user(f"U{n}-{i}", "street", None, ACTOR)
                            .derivation_element)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(elements) == list(range(1, 21))


def test_issuance_takes_cards_first_in_first_out(store: Store, root: S.Root,
                                                 device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 2)
    stock_up(store, root, device_keys, "PK-2", 2)
    users = add_users(store, 3)
    issuance_id = os.urandom(16)

    prepared = store.begin_issuance(users, batch="B1", issuance_id=issuance_id,
                                    hsm_pins=False, actor=ACTOR)

    assert [p.card.serial for p in prepared] == ["PK-1-001", "PK-1-002", "PK-2-001"]
    assert [p.user.user_id for p in prepared] == users
    assert all(p.sequence == 1 and p.issuance_id == issuance_id for p in prepared)
    assert counts(store)[StockState.RESERVED] == 3
    records = store.issuance_records([p.card.serial for p in prepared])
    assert {r.state for r in records.values()} == {IssuanceState.PREPARING}
    assert [records[p.card.serial].derivation_element for p in prepared] == \
        [p.user.derivation_element for p in prepared]

    store.complete_issuance(issuance_id, issued(prepared))
    records = store.issuance_records([p.card.serial for p in prepared])
    assert {r.state for r in records.values()} == {IssuanceState.ISSUED}
    assert all(r.user_public_key == b"\x02" + bytes(32) for r in records.values())


def test_issuance_refusals_change_nothing(store: Store, root: S.Root,
                                          device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 2)
    users = add_users(store, 3)

    def begin(user_ids: list[int]):
        return store.begin_issuance(user_ids, batch="B", issuance_id=os.urandom(16),
                                    hsm_pins=False, actor=ACTOR)

    with pytest.raises(NotFound, match="no user 999"):
        begin([users[0], 999])
    with pytest.raises(InvalidArgument, match=f"user {users[0]} is listed twice"):
        begin([users[0], users[0]])
    with pytest.raises(FailedPrecondition, match="3 cards asked for, 2 in stock"):
        begin(users)
    assert counts(store)[StockState.IN_STOCK] == 2
    assert store.issuance_records(["PK-1-001", "PK-1-002"]) == {}

    first = begin([users[0]])
    with pytest.raises(FailedPrecondition, match=f"user {users[0]} already has card "
                                                 f"{first[0].card.serial} in flight"):
        begin([users[1], users[0]])
    with pytest.raises(FailedPrecondition, match="in flight"):
        store.remove_user(users[0])
    assert counts(store)[StockState.IN_STOCK] == 1
    store.remove_user(users[2])
    with pytest.raises(NotFound, match=f"no user {users[2]}"):
        begin([users[2]])


def test_an_abandoned_issuance_returns_its_cards_to_stock(store: Store, root: S.Root,
                                                          device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 2)
    users = add_users(store, 2)
    issuance_id = os.urandom(16)
    store.begin_issuance(users, batch="B", issuance_id=issuance_id, hsm_pins=True,
                         actor=ACTOR)

    assert store.abandon_issuance(issuance_id) == 2

    assert counts(store)[StockState.IN_STOCK] == 2
    assert store.issuance_records(["PK-1-001", "PK-1-002"]) == {}
    # The same users can be issued again, the same cards first.
    again = store.begin_issuance(users, batch="B", issuance_id=os.urandom(16),
                                 hsm_pins=False, actor=ACTOR)
    assert [p.card.serial for p in again] == ["PK-1-001", "PK-1-002"]


def test_results_personalize_or_quarantine_all_rows_or_none(
        store: Store, root: S.Root, device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 4)
    users = add_users(store, 4)
    issuance_id, other_id = os.urandom(16), os.urandom(16)
    prepared = store.begin_issuance(users[:3], batch="B", issuance_id=issuance_id,
                                    hsm_pins=False, actor=ACTOR)
    store.complete_issuance(issuance_id, issued(prepared))
    other = store.begin_issuance(users[3:], batch="C", issuance_id=other_id, hsm_pins=False,
                                 actor=ACTOR)
    a, b, c = (p.card.serial for p in prepared)
    good = [CardResult(a, True, ""), CardResult(b, False, "chip does not answer")]

    for bad, message in (
            ([*good, CardResult("PK-9-001", True, "")], "row 3: card PK-9-001 was not issued"),
            ([*good, CardResult(other[0].card.serial, True, "")],
             "row 3: card PK-1-004 is not in this personalization file")):
        with pytest.raises(FailedPrecondition, match=message):
            store.apply_results(issuance_id, bad)
        assert counts(store)[StockState.RESERVED] == 4

    store.apply_results(issuance_id, good)

    records = store.issuance_records([a, b, c])
    assert records[a].state is IssuanceState.PERSONALIZED
    assert records[b].state is IssuanceState.FAILED
    assert records[b].reason == "chip does not answer"
    assert records[c].state is IssuanceState.ISSUED
    with store.engine.connect() as connection:
        states = {serial: state for serial, state in connection.execute(
            select(StockCardRow.serial, StockCardRow.state))}
    assert (states[a], states[b], states[c]) == ("personalized", "quarantined", "reserved")
    total = counts(store)
    assert (total[StockState.PERSONALIZED], total[StockState.QUARANTINED]) == (1, 1)
    with pytest.raises(FailedPrecondition, match=f"row 1: card {a} is already personalized"):
        store.apply_results(issuance_id, [CardResult(a, True, "")])
    # A user whose card came back may be issued again, or removed (kept for the records).
    assert store.remove_user(users[0]).user_id == users[0]
    with pytest.raises(NotFound):
        store.get_user(users[0])
    assert [r.serial for r in store.user_cards(users[0])] == [a]


def test_dispatch_ships_personalized_cards_all_rows_or_none(
        store: Store, root: S.Root, device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 4)
    issuance_id = os.urandom(16)
    prepared = store.begin_issuance(add_users(store, 3), batch="B", issuance_id=issuance_id,
                                    hsm_pins=False, actor=ACTOR)
    store.complete_issuance(issuance_id, issued(prepared))
    a, b, c = (p.card.serial for p in prepared)
    store.apply_results(issuance_id, [CardResult(a, True, ""), CardResult(b, False, "no ATR")])
    sent = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    before = counts(store)

    for bad, message in (
            ([CardDispatched(a, sent), CardDispatched(c, sent)],
             f"row 2: card {c} is issued, not personalized"),
            ([CardDispatched(a, sent), CardDispatched(b, sent)],
             f"row 2: card {b} is failed, not personalized"),
            ([CardDispatched("PK-1-004", sent)], "row 1: card PK-1-004 was not issued"),
            ([CardDispatched("PK-9-001", sent)], "row 1: card PK-9-001 was not issued")):
        with pytest.raises(FailedPrecondition, match=message):
            store.apply_dispatch(issuance_id, bad)
        assert counts(store) == before
    with pytest.raises(FailedPrecondition, match="not in this personalization file"):
        store.apply_dispatch(os.urandom(16), [CardDispatched(a, sent)])

    store.apply_dispatch(issuance_id, [CardDispatched(a, sent)])

    total = counts(store)
    assert (total[StockState.SHIPPED], total[StockState.PERSONALIZED]) == (1, 0)
    with store.engine.connect() as connection:
        dispatched = connection.execute(select(IssuanceRow.dispatched).where(
            IssuanceRow.serial == a)).scalar_one()
    assert dispatched == sent
    with pytest.raises(FailedPrecondition, match=f"card {a}'s letters were dispatched already"):
        store.apply_dispatch(issuance_id, [CardDispatched(a, sent)])


def test_two_issuances_at_once_give_a_user_one_card(store: Store, root: S.Root,
                                                    device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 4)
    user = add_users(store, 1)[0]
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def issue() -> None:
        start.wait()
        try:
            store.begin_issuance([user], batch="B", issuance_id=os.urandom(16), hsm_pins=False,
                                 actor=ACTOR)
            outcomes.append("issued")
        except FailedPrecondition as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=issue) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count("issued") == 1
    assert any("in flight" in outcome for outcome in outcomes), outcomes
    assert counts(store)[StockState.RESERVED] == 1


def test_card_auth_keys_follow_the_card_from_stock_to_personalized(
        store: Store, root: S.Root, device_keys: S.DeviceKeys) -> None:
    stock_up(store, root, device_keys, "PK-1", 2)
    users = add_users(store, 1)
    issuance_id = os.urandom(16)
    prepared = store.begin_issuance(users, batch="B", issuance_id=issuance_id,
                                    hsm_pins=False, actor=ACTOR)
    serial = prepared[0].card.serial
    assert store.card_auth_keys(serial).state is IssuanceState.PREPARING
    store.complete_issuance(issuance_id, issued(prepared))
    store.apply_results(issuance_id, [CardResult(serial, True, "")])

    keys = store.card_auth_keys(serial)
    assert keys.state is IssuanceState.PERSONALIZED
    assert keys.issuer_auth_public_key == prepared[0].card.issuer_auth_public_key
    assert (keys.device_auth_public_key, keys.device_auth_wrapped_key,
            keys.device_auth_kek_version) == (b"\x04" + bytes(64), b"wrapped" + bytes(32), 1)
    in_stock = store.card_auth_keys("PK-1-002")
    assert in_stock.state is None and in_stock.device_auth_wrapped_key is None
    assert in_stock.issuer_auth_public_key
    with pytest.raises(NotFound, match="no card PK-9-001 in the issuer's stock"):
        store.card_auth_keys("PK-9-001")
