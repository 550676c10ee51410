"""Errors of the proxy and how they cross the frontend/worker process boundary.

Workers raise the ``cms.runtime.errors`` classes with messages fit for the
caller; across the pipe an error travels as ``(status code name, message)``
and becomes the same class again in the frontend. Nothing else crosses: a
PKCS#11 exception is turned into one of these inside the worker.
"""

from __future__ import annotations

import grpc

from cms.runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from cms.v1 import hsm_pb2

HANDLE_EXPIRED_RESTART = "handle expired (backend restarted)"


class HandleExpired(FailedPrecondition):
    """A handle whose per-worker state was lost when its backend or worker restarted."""

    def __init__(self, handle: str | None = None):
        where = f"{handle}: " if handle else ""
        super().__init__(f"{where}{HANDLE_EXPIRED_RESTART}")


class BackendUnavailable(Unavailable):
    """The PKCS#11 backend is down; the proxy keeps reconnecting with backoff."""


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code.name: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated,
                FailedPrecondition, Aborted, ResourceExhausted, Unavailable, Unimplemented,
                DeadlineExceeded, DataLoss, Internal)
}

WireError = tuple[str, str]


def to_wire(exc: ServiceError) -> WireError:
    return exc.code.name, exc.message


def from_wire(error: WireError) -> ServiceError:
    code, message = error
    return _BY_CODE.get(code, Internal)(message)


def status_code(name: str) -> grpc.StatusCode:
    return _BY_CODE.get(name, Internal).code


def item_error(exc: ServiceError) -> hsm_pb2.ItemError:
    """A per-item failure of a batch, with the status code the item would have had alone."""
    return hsm_pb2.ItemError(code=exc.code.value[0], message=exc.message)


def failure_item_error(failure: tuple[str, str]) -> hsm_pb2.ItemError:
    """``item_error`` of an item failure reported by a worker (``worker.Failure``)."""
    return item_error(from_wire(failure))
