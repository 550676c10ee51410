"""Domain errors that map to gRPC status codes, and the guard that applies them.

Cores raise ``ServiceError`` subclasses with messages fit for the caller; the
``guard`` decorator turns them into a status. Anything else becomes INTERNAL
with a generic message (the type is logged, never a traceback that could
carry values), so a bug cannot leak data through an error.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from cms.runtime.logs import fields

log = logging.getLogger("cms.errors")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

_STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def status_from_number(number: int) -> grpc.StatusCode | None:
    """The gRPC status with this wire number (as in ``ItemError.code``), or None."""
    return _STATUS_BY_NUMBER.get(number)


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


def enum_filter(value: int, table: dict[int, T], what: str) -> T | None:
    """A request's optional enum filter: None when unset (0, the proto's
    UNSPECIFIED), the value ``table`` maps it to, else InvalidArgument naming
    ``what`` and the number (a client built against a newer contract)."""
    if value == 0:
        return None
    if value not in table:
        raise InvalidArgument(f"{what} {value}")
    return table[value]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


def guard(fn: F) -> F:
    """Decorate a unary servicer method: ServiceError -> its status, else INTERNAL."""

    @functools.wraps(fn)
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except ServiceError as exc:
            context.abort(exc.code, exc.message)
        except Exception as exc:
            # context.abort() raises as well: a status already set means fn aborted on purpose.
            if context.code() not in (None, grpc.StatusCode.OK):
                raise
            log.error("internal error", extra=fields(method=fn.__name__, error=type(exc).__name__))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__})")

    return wrapper  # type: ignore[return-value]
