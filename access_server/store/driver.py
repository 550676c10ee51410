"""SQLAlchemy Core statements run on the driver's own connection: the per-contact hot path.

A campaign contact runs two short write transactions of about eighteen
statements, and a fleet runs them for every card. Executing a Core statement
costs about 0.15 ms of CPU before the driver sees it (cache key, parameter
and result processing), five times what SQLite then spends running it, and
together more than anything else a contact costs the access server.

So the hot path's statements are ordinary Core expressions over the model
tables (row locks as ``with_for_update``), and a ``Statement`` compiles each
one once per dialect, when the store opens (``prepare``): SQLAlchemy renders
the SQL, the parameter style and the row locks of the backend (none on
SQLite, which has a single writer), and the column types give the bind and
result processors (so times are stored and read exactly as the ORM stores
and reads them). Running it then costs a dictionary or tuple of processed
parameters and one driver call.

The transaction stays SQLAlchemy's (pool, ``BEGIN IMMEDIATE``, rollback),
and a driver error is raised as the SQLAlchemy exception it would have been,
without the statement's parameters, so ``dberrors.translate`` and its safe
messages apply unchanged.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, literal, literal_column
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import ClauseElement, ColumnElement
from sqlalchemy.types import DateTime, TypeEngine

_Processor = Callable[[Any], Any] | None
_TIME_PROCESSORS: dict[tuple[str, str, str], _Processor] = {}
_PREPARED: list[Statement] = []
"""Every statement made, so that ``prepare`` compiles them all for a store's dialect."""


class _Compiled:
    """One statement as one dialect runs it: text, parameters in order, row shape."""

    __slots__ = ("binds", "fixed", "positional", "results", "row", "text")

    def __init__(self, statement: ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        _refuse_incomplete(compiled.string)
        self.text = compiled.string
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        self.positional = bool(dialect.positional)
        order = compiled.positiontup if self.positional else list(by_name)
        assert order is not None
        # Values the statement itself carries (a state's name, a LIMIT).
        self.fixed = {name: bind.effective_value for name, bind in by_name.items()
                      if not bind.required}
        self.binds: tuple[tuple[str, _Processor], ...] = tuple(
            (name, _processor(by_name[name].type, dialect, "bind")) for name in order)
        columns = list(getattr(statement, "exported_columns", ()))
        self.results: tuple[tuple[int, _Processor], ...] = tuple(
            (index, process) for index, column in enumerate(columns)
            if (process := _processor(column.type, dialect, "result")) is not None)
        # Rows are named by the selected columns of the model tables.
        self.row = namedtuple("Row", [column.key for column in columns]) if columns else None

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = {**self.fixed, **params} if self.fixed else params
        try:
            processed = [(name, values[name] if process is None else process(values[name]))
                         for name, process in self.binds]
        except KeyError as missing:
            raise ValueError(f"no value for the statement's parameter {missing}") from None
        if self.positional:
            return tuple(value for _, value in processed)
        return dict(processed)

    def convert(self, found: Any) -> Any:
        if self.row is None:
            return tuple(found)
        values = list(found)
        for index, process in self.results:
            values[index] = process(values[index])
        return self.row(*values)


def _processor(type_: TypeEngine[Any], dialect: Dialect, way: str) -> _Processor:
    """What ``type_`` does to a value going to (``bind``) or coming from the driver.

    A time's conversion is shared by every statement and remembers its
    recent values: a transaction binds one "now" to several statements, and
    a card's row brings back times it brought back before; converting them
    each time was a visible part of a contact's cost.
    """
    impl = type_.dialect_impl(dialect)
    process = (impl.bind_processor(dialect) if way == "bind"
               else impl.result_processor(dialect, None))
    if process is None or not _is_time(type_):
        return process
    key = (dialect.name, repr(type_), way)
    if key not in _TIME_PROCESSORS:
        _TIME_PROCESSORS[key] = lru_cache(maxsize=512)(process)
    return _TIME_PROCESSORS[key]


def _is_time(type_: TypeEngine[Any]) -> bool:
    # A TypeDecorator (the models' UtcDateTime) says what it is through its impl.
    return isinstance(type_, DateTime) or isinstance(getattr(type_, "impl_instance", None),
                                                      DateTime)


class Statement:
    """A Core statement for the driver path, compiled once for each dialect it meets."""

    def __init__(self, statement: ClauseElement) -> None:
        _refuse_incomplete(str(statement))
        self.statement = statement
        self._by_dialect: dict[str, _Compiled] = {}
        _PREPARED.append(self)

    def compiled(self, dialect: Dialect) -> _Compiled:
        found = self._by_dialect.get(dialect.name)
        if found is None:
            # Only a statement made after its store opened comes here.
            found = self._by_dialect[dialect.name] = _Compiled(self.statement, dialect)
        return found


def fixed(column: ColumnElement[Any], value: str) -> ColumnElement[Any]:
    """``value`` for ``column`` written into the statement (SQLAlchemy quotes it), not bound.

    For the fixed names of states in a WHERE clause: SQLite plans a statement
    that may use a partial index (``status = 'pending'``) when it is
    prepared, but prepares it again at every execution when that value is a
    parameter, which cost a contact's campaign lookup five times its run.
    """
    rendered = literal(value, column.type).compile(compile_kwargs={"literal_binds": True})
    return literal_column(str(rendered), column.type)


def _refuse_incomplete(text: str) -> None:
    if "POSTCOMPILE" in text:
        # An IN list or a literal_execute parameter: rendered anew at each execution.
        raise ValueError("a driver statement must render completely when it is compiled")


def prepare(dialect: Dialect) -> None:
    """Compile every driver statement for ``dialect`` (the store does so as it opens)."""
    for statement in _PREPARED:
        statement.compiled(dialect)


class Result:
    """The cursor of one statement: ``rowcount``, and rows named by their columns."""

    __slots__ = ("_compiled", "_cursor")

    def __init__(self, cursor: Any, compiled: _Compiled) -> None:
        self._cursor = cursor
        self._compiled = compiled

    @property
    def rowcount(self) -> int:
        return int(self._cursor.rowcount)

    def one_or_none(self) -> Any:
        """The first row, or None (as SQLAlchemy's ``first()``: any further rows are left)."""
        found = self._cursor.fetchone()
        return None if found is None else self._compiled.convert(found)

    def scalar(self) -> Any:
        found = self.one_or_none()
        return None if found is None else found[0]


def execute(conn: Connection, statement: Statement, params: Mapping[str, Any]) -> Result:
    """Run ``statement`` in ``conn``'s transaction, on its driver connection."""
    dialect = conn.dialect
    compiled = statement.compiled(dialect)
    driver = conn.connection.driver_connection
    assert driver is not None
    try:
        cursor = driver.execute(compiled.text, compiled.parameters(params))
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, driver, None)
        # No statement and no parameters in it: a parameter may be a cryptogram.
        raise sa_exc.DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, hide_parameters=True,
            connection_invalidated=lost, dialect=dialect) from None
    return Result(cursor, compiled)
