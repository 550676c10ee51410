"""Engines for the two supported backends, configured for the durability promise.

SQLite (the embedded default): the database file created 0600 (its -wal
and -shm files take its mode; ``cms.runtime.files``), WAL so readers never
block the writer, ``synchronous=FULL`` so a commit is on disk when it returns (the cryptogram
must survive a power cut once ``begin_install`` returns), foreign keys on,
and a busy timeout so threads queue for the write lock instead of failing.
Python's sqlite3 module would otherwise open transactions lazily and with a
plain ``BEGIN``; we take control of ``BEGIN`` so write transactions take the
write lock up front (``BEGIN IMMEDIATE``): two writers can then never both
read a row and later fail to upgrade their locks.

PostgreSQL: write transactions lock the rows they change (``SELECT ... FOR
UPDATE``); reads run at REPEATABLE READ so a count and a page agree.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.pool import StaticPool

from access_server.store.driver import Statement, execute
from cms.runtime.errors import InvalidArgument
from cms.runtime.files import sqlite_file

SQLITE_BUSY_TIMEOUT_S = 30.0
"""How long a writer waits for another writer before giving up (Aborted)."""

SQLITE_WAL_RETRY_S = 0.01
"""Pause between attempts to switch a busy new database to WAL."""

WRITE_OPTION = "cms_write"
"""Execution option that marks an engine whose transactions will write."""

POSTGRES_LOCK_TIMEOUT = "30s"
"""How long a transaction waits for a row lock before PostgreSQL aborts it."""

SUPPORTED_DRIVERS = ("sqlite", "sqlite+pysqlite", "postgresql+psycopg")


def is_memory_sqlite(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and parsed.database in (None, "", ":memory:")


def make_engine(url: str) -> Engine:
    """Build the engine for ``url`` (one of SUPPORTED_DRIVERS) with our settings."""
    parsed = make_url(url)
    if parsed.drivername not in SUPPORTED_DRIVERS:
        supported = ", ".join(SUPPORTED_DRIVERS)
        raise InvalidArgument(
            f"unsupported database URL scheme {parsed.drivername!r} (use one of: {supported})"
        )
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return _postgres_engine(url)


def write_engine(engine: Engine) -> Engine:
    """The same engine (same pool), marked so its transactions start as writers."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _sqlite_engine(url: str) -> Engine:
    connect_args: dict[str, Any] = {
        "timeout": SQLITE_BUSY_TIMEOUT_S,
        "check_same_thread": False,
    }
    if is_memory_sqlite(url):
        # One shared connection, or every thread would see its own empty
        # database; the Store serializes transactions on it.
        engine = create_engine(url, connect_args=connect_args, poolclass=StaticPool)
    else:
        database = make_url(url).database
        assert database is not None
        # The registry holds cryptograms: the file (and SQLite's -wal and -shm
        # files, which take its mode) is the owner's only.
        sqlite_file(database)
        engine = create_engine(url, connect_args=connect_args)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # None: the driver issues no BEGIN of its own; _sqlite_on_begin does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        _sqlite_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()


def _sqlite_wal(cursor: Any) -> None:
    """Switch the database file to WAL (a persistent setting) unless it already is.

    The switch needs the database to itself, and SQLite reports "locked" at
    once instead of waiting for the busy timeout; so while other connections
    (e.g. several processes opening a new database) hold it, retry.
    """
    if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() in ("wal", "memory"):
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(SQLITE_WAL_RETRY_S)


_BEGIN_WRITE = Statement(text("BEGIN IMMEDIATE"))
_BEGIN_READ = Statement(text("BEGIN"))


def _sqlite_on_begin(connection: Connection) -> None:
    # On the driver connection (``driver``): every contact opens two write
    # transactions, and SQLAlchemy's statement path cost more than the BEGIN.
    if connection.get_execution_options().get(WRITE_OPTION):
        execute(connection, _BEGIN_WRITE, {})
    else:
        execute(connection, _BEGIN_READ, {})


def _postgres_engine(url: str) -> Engine:
    engine = create_engine(url, pool_pre_ping=True)
    event.listen(engine, "connect", _postgres_on_connect)
    return engine


def _postgres_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Timestamps are stored as timestamptz; a UTC session keeps any textual
    # rendering (psql, dumps) in UTC as well.
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET TIME ZONE 'UTC'")
            cursor.execute(f"SET lock_timeout = '{POSTGRES_LOCK_TIMEOUT}'")
    finally:
        dbapi_connection.autocommit = autocommit
