"""Argument checks shared by the store's operations.

Every value is checked before a transaction starts, so a bad call never takes
the write lock and the caller gets InvalidArgument naming the field.
"""

from __future__ import annotations

import re

from cms.runtime.errors import InvalidArgument

PSD_ID_LENGTH = 20
"""A PSD id is the card's 10-byte unique identification number in hex."""

_PSD_ID = re.compile(r"[0-9A-F]{20}")
_PREFIX = re.compile(r"[0-9A-F]{1,20}")

MAX_KEY_VERSION = 2**31 - 1
"""Key block versions are positive and fit a signed 32-bit column.

The store does not map versions to card key version numbers (KVN); that is
the flows' business, so it only insists on a positive number.
"""

RSA_CIPHERTEXT_LENGTHS = (256, 384, 512)
"""RSA-OAEP output is exactly the modulus length: 2048, 3072 or 4096 bits.

Anything else cannot be a cryptogram from the cryptogram key pair; in
particular a 16/24/32-byte value would be a raw random R, which must never
reach the database.
"""

MAX_ID = 2**63 - 1
"""Intent ids are 64-bit."""
MAX_LABEL = 64
MAX_ACTOR = 200
MAX_EVENT = 64
MAX_DETAIL = 2000
MAX_NAME = 200


def psd_id_problem(psd_id: object) -> str | None:
    """Why ``psd_id`` is not a valid PSD id, or None when it is."""
    if not isinstance(psd_id, str):
        return f"malformed PSD id: expected a string, got {type(psd_id).__name__}"
    if _PSD_ID.fullmatch(psd_id) is None:
        shown = psd_id if len(psd_id) <= 40 else psd_id[:40] + "..."
        return (
            f"malformed PSD id {shown!r}: expected {PSD_ID_LENGTH} uppercase "
            "hexadecimal characters"
        )
    return None


def psd_id(value: object) -> str:
    problem = psd_id_problem(value)
    if problem is not None:
        raise InvalidArgument(problem)
    assert isinstance(value, str)
    return value


def psd_id_prefix(value: str) -> str:
    if _PREFIX.fullmatch(value) is None:
        raise InvalidArgument(
            f"malformed PSD id prefix {value[:40]!r}: expected 1 to {PSD_ID_LENGTH} "
            "uppercase hexadecimal characters"
        )
    return value


def key_version(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    if not 1 <= value <= MAX_KEY_VERSION:
        raise InvalidArgument(f"{name} must be between 1 and {MAX_KEY_VERSION}, got {value}")
    return value


def optional_key_version(name: str, value: object) -> int | None:
    return None if value is None else key_version(name, value)


def text(name: str, value: object, limit: int, *, required: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidArgument(f"{name} must not be empty")
    if len(value) > limit:
        raise InvalidArgument(f"{name} is longer than {limit} characters")
    return value


def actor(value: object) -> str:
    return text("actor", value, MAX_ACTOR)


def cryptogram(value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument(f"cryptogram must be bytes, got {type(value).__name__}")
    data = bytes(value)
    if len(data) not in RSA_CIPHERTEXT_LENGTHS:
        allowed = ", ".join(str(n) for n in RSA_CIPHERTEXT_LENGTHS)
        raise InvalidArgument(
            f"cryptogram must be an RSA-OAEP ciphertext of {allowed} bytes, got {len(data)}"
        )
    return data


def positive(name: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {type(value).__name__}")
    if not 1 <= value <= limit:
        raise InvalidArgument(f"{name} must be between 1 and {limit}, got {value}")
    return value



def intent_id(value: object) -> int:
    return positive("intent_id", value, MAX_ID)
