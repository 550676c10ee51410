"""Pages of the registry and of campaign items: their size, and opaque page tokens.

A token carries the last PSD id of the page it ends and the filter it was
made for, so the next page starts right after that id (stable while cards
are added) and a token is refused with another filter.
"""

from __future__ import annotations

import base64
import binascii
import json

from access_server.store import validate as v
from access_server.store.records import PsdState
from cms.runtime.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""Larger requested pages are clamped to this size."""


def page_size(requested: object) -> int:
    """The size of a page asked for as ``requested`` (0 for the default), clamped."""
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise InvalidArgument("page_size must be a non-negative integer")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(after: str, state: PsdState | None, mk_version: int | None,
                 needs_attention: bool = False) -> str:
    payload: dict[str, object] = {"after": after,
                                  "state": None if state is None else state.value,
                                  "mk": mk_version}
    if needs_attention:
        payload["attention"] = True
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, state: PsdState | None, mk_version: int | None,
                 needs_attention: bool = False) -> str | None:
    """The last id of the previous page; the token must belong to the same filter."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        after = payload["after"]
        same = payload["state"] == (None if state is None else state.value) and (
            payload["mk"] == mk_version
        ) and payload.get("attention", False) == needs_attention
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument("malformed page token") from None
    if not same:
        raise InvalidArgument("page token belongs to a different filter")
    if v.psd_id_problem(after) is not None:
        raise InvalidArgument("malformed page token")
    return str(after)
