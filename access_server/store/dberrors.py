"""Turn database exceptions into domain errors with safe messages.

SQLAlchemy's exception text includes the statement and its parameters, and
a parameter may be a cryptogram; so a message here names only the exception
class (or PostgreSQL's SQLSTATE), never ``str(exc)``.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

from cms.runtime.errors import Aborted, ServiceError, Unavailable

RETRYABLE_SQLSTATES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected",
    "55P03": "lock not available",
}
"""PostgreSQL conditions a caller can fix by retrying the whole operation."""

CONNECTION_SQLSTATE_CLASSES = ("08", "57", "53")
"""Connection exceptions, operator intervention (shutdown), insufficient resources."""


def translate(exc: Exception) -> ServiceError:
    """The domain error a caller sees for a database exception."""
    if isinstance(exc, orm_exc.StaleDataError):
        return Aborted("the record changed concurrently; retry the operation")
    if isinstance(exc, sa_exc.IntegrityError):
        return Aborted("a concurrent change conflicts with this one; retry the operation")
    if isinstance(exc, sa_exc.DBAPIError):
        return _from_driver(exc)
    return ServiceError(f"database error ({type(exc).__name__})")


def _from_driver(exc: sa_exc.DBAPIError) -> ServiceError:
    original = exc.orig
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str):
        if sqlstate in RETRYABLE_SQLSTATES:
            return Aborted(f"database {RETRYABLE_SQLSTATES[sqlstate]}; retry the operation")
        if sqlstate[:2] in CONNECTION_SQLSTATE_CLASSES:
            return Unavailable(f"database unavailable (SQLSTATE {sqlstate})")
        return ServiceError(f"database error (SQLSTATE {sqlstate})")
    name = type(original).__name__
    if name == "OperationalError" and "locked" in str(original).lower():
        # sqlite3's own message ("database is locked") carries no parameters.
        return Aborted("database busy (another writer held the lock too long); retry")
    connection_lost = isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    if connection_lost or exc.connection_invalidated:
        return Unavailable(f"database unavailable ({name})")
    return ServiceError(f"database error ({name})")
