"""Fixtures and helpers shared by the store's test modules (no tests here).

Test modules load this as a plugin, with the PostgreSQL fixtures:
``pytest_plugins = ("tests.support.postgres", "tests.access_server.test_store_fixtures")``.
Every ``store`` is parametrized over SQLite and PostgreSQL through
``database_url``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from access_server.store import Intent, PsdState, Store

START = datetime(2030, 1, 1, tzinfo=UTC)
TICK = timedelta(microseconds=1)
CRYPTOGRAM_LENGTH = 256
"""RSA-2048 ciphertext length."""
LABEL = "cryptogram/1"
ACTOR = "tester"


class FakeClock:
    """A clock that moves only when told (plus one microsecond per reading).

    The tick keeps timestamps strictly increasing, so "updated after created"
    holds without sleeping; ``advance`` makes leases expire.
    """

    def __init__(self, start: datetime = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            self._now += TICK
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[Store]:
    """A migrated store on an empty database of each backend."""
    with Store.from_url(database_url, clock=clock) as opened:
        yield opened


def psd(n: int, prefix: str = "") -> str:
    """The n-th test PSD id (20 uppercase hex characters), optionally with a prefix."""
    return prefix + f"{n:0{20 - len(prefix)}X}"


def cryptogram(marker: bytes = b"") -> bytes:
    """A stand-in RSA-OAEP ciphertext, with ``marker`` inside if given."""
    body = os.urandom(CRYPTOGRAM_LENGTH)
    return (body[:16] + marker + body[16:])[:CRYPTOGRAM_LENGTH]


def register(store: Store, *psd_ids: str) -> None:
    outcomes = store.register_psds(list(psd_ids), ACTOR)
    assert all(outcome.added for outcome in outcomes), outcomes


def begin_install(
    store: Store,
    psd_id: str,
    mk: int = 1,
    mkrk: int = 1,
    *,
    data: bytes | None = None,
    restart: bool = False,
) -> Intent:
    return store.begin_install(
        psd_id,
        cryptogram=data if data is not None else cryptogram(),
        cryptogram_key_label=LABEL,
        mkrk_version=mkrk,
        mk_version=mk,
        actor=ACTOR,
        card_holds_transport_keys=restart,
    )


def activate(store: Store, psd_id: str, mk: int = 1, mkrk: int = 1) -> None:
    """Register and install a card: active at MK ``mk``."""
    register(store, psd_id)
    intent = begin_install(store, psd_id, mk=mk, mkrk=mkrk)
    store.complete_install(psd_id, intent.intent_id, ACTOR)


def card_in(store: Store, psd_id: str, state: PsdState) -> Intent | None:
    """Bring a new card into ``state`` the way the flows would; returns its open intent."""
    register(store, psd_id)
    if state is PsdState.BLANK:
        return None
    if state is PsdState.INSTALLING:
        return begin_install(store, psd_id)
    intent = begin_install(store, psd_id)
    store.complete_install(psd_id, intent.intent_id, ACTOR)
    if state is PsdState.ACTIVE:
        return None
    if state is PsdState.REPLACEMENT_PENDING:
        return store.begin_replacement(psd_id, from_version=1, to_version=2, actor=ACTOR)
    store.revoke(psd_id, "lost", ACTOR)
    return None
