"""Statements run on the driver's own connection: the per-contact hot path.

A campaign contact runs two short write transactions of about eighteen
statements, and a fleet runs them for every card. SQLAlchemy Core spends
about 0.15 ms of CPU on each statement before the driver sees it (cache key,
parameter and result processing), five times what SQLite then spends
running it, and together more than anything else a contact costs the access
server. So these statements are written once here in SQL with ``:name``
parameters and rendered for each backend when the module loads:

- sqlite3 takes ``:name``, psycopg ``%(name)s``;
- ``{for_update}``, ``{for_share}`` and ``{for_share_of:TABLE}`` become row
  locks on PostgreSQL and nothing on SQLite, which has a single writer (as
  SQLAlchemy renders ``with_for_update`` there).

The transaction stays SQLAlchemy's (pool, ``BEGIN IMMEDIATE``, rollback),
and a driver error is raised as the SQLAlchemy exception it would have been,
without the statement's parameters, so ``dberrors.translate`` and its safe
messages apply unchanged.

Times are aware UTC datetimes in and out, stored exactly as the models'
``UtcDateTime`` stores them: naive UTC text in SQLAlchemy's fixed-width
format on SQLite (text order is time order), ``timestamptz`` on PostgreSQL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple

from sqlalchemy import Connection
from sqlalchemy import exc as sa_exc

BACKENDS = ("sqlite", "postgresql")
_PARAMETER = re.compile(r"(?<![:\w]):(\w+)")
_LOCK = re.compile(r"\{for_(update|share)(?::(\w+))?\}")


def _lock_clause(found: re.Match[str]) -> str:
    mode, table = found.groups()
    return f" FOR {mode.upper()}" + (f" OF {table}" if table else "")


def _render(text: str, backend: str) -> str:
    if backend == "postgresql":
        text = _PARAMETER.sub(r"%(\1)s", _LOCK.sub(_lock_clause, text))
    else:
        text = _LOCK.sub("", text)
    return " ".join(text.split())


_LITERAL = re.compile(r"[a-z_]+")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class Sql:
    """One statement, rendered for SQLite and PostgreSQL; rows come back as ``row``.

    ``row`` is a NamedTuple whose fields are the selected columns in order,
    and ``times`` names those that hold times. The text may say ``{columns}``
    for the row's fields (those in ``nulls`` selected as NULL) and
    ``{name}`` for each of ``literals``: fixed words such as a state's name,
    spliced in as quoted SQL literals. They are checked to be plain words, so
    only bound ``:parameters`` ever carry values from outside.
    """

    def __init__(self, text: str, row: type[NamedTuple] | None = None, *,
                 times: tuple[str, ...] = (), nulls: tuple[str, ...] = (),
                 literals: Mapping[str, str] | None = None) -> None:
        if "%" in text:
            raise ValueError("a literal % would be a placeholder for psycopg")
        fields: tuple[str, ...] = row._fields if row is not None else ()
        if not set(times) | set(nulls) <= set(fields):
            raise ValueError(f"times {times} and nulls {nulls} must be fields of the row")
        words = dict(literals or {})
        for name, word in words.items():
            if not _LITERAL.fullmatch(word):
                raise ValueError(f"literal {name}={word!r} is not a plain word")
        spliced = {name: f"'{word}'" for name, word in words.items()}
        if fields:
            spliced["columns"] = ", ".join("NULL" if f in nulls else f for f in fields)

        def splice(found: re.Match[str]) -> str:
            name = found.group(1)
            if name in spliced:
                return spliced[name]
            if _LOCK.fullmatch(found.group(0)):
                return found.group(0)
            raise ValueError(f"nothing to splice for {{{name}}}")

        text = _PLACEHOLDER.sub(splice, text)
        self.text = {backend: _render(text, backend) for backend in BACKENDS}
        self.row = row
        self.time_indexes = tuple(i for i, name in enumerate(fields) if name in times)


@lru_cache(maxsize=256)
def sqlite_time(value: datetime) -> str:
    """``value`` as SQLAlchemy stores a SQLite DATETIME: naive UTC text,
    ``YYYY-MM-DD HH:MM:SS.ffffff`` with the microseconds always present.

    Cached: a transaction binds the same "now" to several statements, and
    formatting was a visible part of a contact's cost.
    """
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def _time_from_sqlite(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _time_from_postgres(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _bind(params: Mapping[str, Any], sqlite: bool) -> Mapping[str, Any]:
    out = None
    for name, x in params.items():
        if isinstance(x, datetime):
            if out is None:
                out = dict(params)
            if sqlite:
                out[name] = sqlite_time(x)
            elif x.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
    return params if out is None else out


class Result:
    """The cursor of one statement: ``rowcount``, and rows as the statement's NamedTuple."""

    def __init__(self, cursor: Any, sql: Sql, sqlite: bool) -> None:
        self._cursor = cursor
        self._sql = sql
        self._sqlite = sqlite

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def one_or_none(self) -> Any:
        """The first row, or None (as SQLAlchemy's ``first()``: any further rows are left)."""
        found = self._cursor.fetchone()
        if found is None:
            return None
        if self._sql.row is None:
            return tuple(found)
        values = list(found)
        convert = _time_from_sqlite if self._sqlite else _time_from_postgres
        for index in self._sql.time_indexes:
            values[index] = convert(values[index])
        return self._sql.row(*values)

    def scalar(self) -> Any:
        found = self._cursor.fetchone()
        return None if found is None else found[0]


def execute(conn: Connection, sql: Sql, params: Mapping[str, Any]) -> Result:
    """Run ``sql`` in ``conn``'s transaction, on its driver connection."""
    dialect = conn.dialect
    sqlite = dialect.name == "sqlite"
    driver = conn.connection.driver_connection
    assert driver is not None
    try:
        cursor = driver.execute(sql.text[dialect.name], _bind(params, sqlite))
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, driver, None)
        # No statement and no parameters in it: a parameter may be a cryptogram.
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
            connection_invalidated=lost, dialect=dialect) from None
    return Result(cursor, sql, sqlite)
