"""Activation codes (``access_server.activation``) and their records in the store, on
SQLite and PostgreSQL: stored only as a salted hash, counted and locked after the last
wrong try, expired by the store's clock, used up before the payload goes, and the card's
answer moving the issuance and the stock card together."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from access_server import activation as A
from access_server.store import (
    ActivationState,
    IssuanceState,
    NewActivation,
    StockState,
    Store,
)
from cms.runtime.errors import Aborted, FailedPrecondition
from tests.access_server.test_issuance_store import add_users, counts, issued, stock_up
from tests.access_server.test_stock_store import device_keys, root
from tests.access_server.test_store_fixtures import FakeClock
from tests.support import stock as S

pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")

__all__ = ["device_keys", "root"]

PAYLOAD = b"\x01" + bytes(600)


def test_a_code_is_100_random_bits_and_only_its_hash_is_kept() -> None:
    code = A.new_code()
    assert len(code) == A.CODE_LENGTH and set(code) <= set(A.CODE_ALPHABET)
    assert A.new_code() != code
    stored = A.hash_code(code)
    assert code.encode() not in stored.digest + stored.salt
    assert A.hash_code(code) != stored                     # a fresh salt each time
    assert A.matches(A.shown(code).lower(), stored)        # groups and case as typed
    assert A.matches(" ".join(A.shown(code).split("-")), stored)
    assert not A.matches(A.new_code(), stored)
    for bad in ("", code[:-1], code + "A", code[:-1] + "1", "x" * 1000):
        assert A.normalize(bad) is None and not A.matches(bad, stored), bad


def _online(store: Store, root: S.Root, keys: S.DeviceKeys, clock: FakeClock,
            user: int | None = None) -> tuple[str, str]:
    stock_up(store, root, keys, f"PK-ON{user or ''}", 1)
    if user is None:
        (user,) = add_users(store, 1)
    issuance_id = os.urandom(16)
    (card,) = store.begin_issuance([user], batch="ONLINE", issuance_id=issuance_id,
                                   hsm_pins=True, actor="admin")
    code = A.new_code()
    salt, digest = A.hash_code(code)
    store.complete_issuance(issuance_id, issued([card]), [NewActivation(
        card.card.serial, salt, digest, PAYLOAD, clock() + timedelta(days=14))])
    return card.card.serial, code


def test_wrong_codes_lock_the_activation(store: Store, root: S.Root, device_keys: S.DeviceKeys,
                                         clock: FakeClock) -> None:
    serial, code = _online(store, root, device_keys, clock)
    found = store.activation_for(serial)
    assert found is not None and found.state is ActivationState.WAITING
    assert found.payload == PAYLOAD and not found.expired
    assert A.matches(code, A.CodeHash(found.code_salt, found.code_hash))
    assert [store.code_failed(serial) for _ in range(A.MAX_TRIES)] == \
        list(range(A.MAX_TRIES - 1, -1, -1))
    locked = store.activation_for(serial)
    assert locked is not None and locked.state is ActivationState.LOCKED
    assert store.issuance_records([serial])[serial].state is IssuanceState.FAILED
    assert counts(store)[StockState.QUARANTINED] == 1
    with pytest.raises(Aborted, match="locked"):
        store.code_failed(serial)
    with pytest.raises(Aborted, match="locked"):
        store.activation_sent(serial)
    assert store.activation_for("NO-SUCH-CARD") is None


def test_the_code_expires_by_the_stores_clock(store: Store, root: S.Root,
                                              device_keys: S.DeviceKeys,
                                              clock: FakeClock) -> None:
    serial, _ = _online(store, root, device_keys, clock)
    clock.advance(timedelta(days=14).total_seconds() - 60)
    assert not store.activation_for(serial).expired
    clock.advance(120)
    assert store.activation_for(serial).expired
    (user,) = {c.user_id for c in store.issuance_records([serial]).values()}
    # The user's next issuance closes the expired one: no card held in flight by it.
    again, _ = _online(store, root, device_keys, clock, user)
    assert store.activation_for(serial).state is ActivationState.EXPIRED
    assert store.issuance_records([serial])[serial].state is IssuanceState.FAILED
    assert store.activation_for(again).state is ActivationState.WAITING
    assert counts(store)[StockState.QUARANTINED] == 1
    with pytest.raises(FailedPrecondition, match="made online"):
        store.prepare_reissue(store.activation_for(again).issuance_id, os.urandom(16))


@pytest.mark.parametrize("personalized", [True, False])
def test_the_cards_answer_moves_issuance_and_stock(
        store: Store, root: S.Root, device_keys: S.DeviceKeys, clock: FakeClock,
        personalized: bool) -> None:
    serial, _ = _online(store, root, device_keys, clock)
    with pytest.raises(Aborted, match="waiting"):
        store.activation_done(serial, True, "too early")     # the code is not used yet
    store.activation_sent(serial)
    store.activation_sent(serial)                            # a retry after a lost answer
    store.activation_done(serial, personalized, "9000 personalized" if personalized
                          else "6984 payload for another device key")
    record = store.activation_for(serial)
    assert record.state is (ActivationState.PERSONALIZED if personalized
                            else ActivationState.FAILED)
    (card,) = store.issuance_records([serial]).values()
    assert card.state is (IssuanceState.PERSONALIZED if personalized else IssuanceState.FAILED)
    assert counts(store)[StockState.PERSONALIZED if personalized
                         else StockState.QUARANTINED] == 1
    with pytest.raises(Aborted):
        store.activation_sent(serial)                        # used up
