"""The store's transactions: one per operation, on the engine of either backend.

``Transactions`` is the base of ``Store`` and of each part of it
(``registry``, ``contacts``, ``leases``, ``campaigns``): it opens the engine
and hands out the four kinds of transaction they run in. Write transactions
on SQLite start with BEGIN IMMEDIATE (one writer at a time), and the threads
of this process queue for that writer on a mutex; reads on PostgreSQL run at
REPEATABLE READ so a count and a page agree. Database errors leave as domain
errors (``dberrors``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from typing import NamedTuple

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from access_server.store import cards, driver
from access_server.store.dberrors import translate
from access_server.store.engine import is_memory_sqlite, make_engine, write_engine
from access_server.store.records import PsdRecord
from cms.runtime.errors import ServiceError


def utc_now() -> datetime:
    return datetime.now(UTC)


class CardChange(NamedTuple):
    """An operator's write transaction on one card: its row locked first, as ``card``."""

    session: Session
    conn: Connection
    card: PsdRecord
    now: datetime


class Transactions:
    """The engine and the transactions of a store. Thread safe.

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
        # The contact path's statements, rendered for this backend once.
        driver.prepare(self._engine.dialect)
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

    @property
    def engine(self) -> Engine:
        return self._engine

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
        """A write transaction with a unit of work, for the operator's changes."""
        writer = self._sqlite_writer if self._sqlite_writer is not None else nullcontext()
        with writer, self._guard(), Session(self._writer, expire_on_commit=False) as session:
            with session.begin():
                yield session

    @contextmanager
    def _change_card(self, psd_id: str) -> Iterator[CardChange]:
        """``_write`` that starts by locking the card's row (lock order: the card first)."""
        with self._write() as session:
            now = self._now()
            conn = session.connection()
            yield CardChange(session, conn, cards.lock_card(conn, psd_id), now)

    @contextmanager
    def _write_connection(self) -> Iterator[Connection]:
        """A write transaction without a unit of work, for the per-contact paths.

        They run driver statements only (``cards``); a Session around them
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
