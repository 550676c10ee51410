"""Activation codes: what lets a user personalize their own card online (seed 004, FIG. 5's
other embodiment, the user system).

The issuer assigns a stock card to the user (``cms issue user ID --online``), posts it
initialized, and gives the user a one-time code separately. The code unlocks that card's
payload only: the access server finds the activation by the serial the card itself
reports, then checks the code against it. So the code is a password of one card's
issuance, not a bearer token that names a card.

20 characters of the RFC 4648 base32 alphabet, 5 bits each: 100 bits from the operating
system's random source, shown once in groups of five. The store keeps only a salted scrypt
hash (RFC 7914; n = 2^14, r = 8, p = 1: 16 MiB and tens of milliseconds a guess), compared
in constant time; with the tries limited per code and the code's expiry, the hash guards a
stolen database dump, the limits guard the stream. Everything here is pure.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from typing import Final, NamedTuple

CODE_LENGTH: Final = 20
CODE_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
GROUP: Final = 5
SALT_LENGTH: Final = 16
HASH_LENGTH: Final = 32
SCRYPT_N: Final = 2**14
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
DEFAULT_VALID_DAYS: Final = 14
MAX_VALID_DAYS: Final = 365
MAX_TRIES: Final = 5
"""Wrong codes in a row before the activation is locked for good (the issuer issues anew)."""
MAX_CODE_INPUT: Final = 64
"""Characters of a code as typed (groups, spaces) the server reads at most."""


class CodeHash(NamedTuple):
    salt: bytes
    digest: bytes


def new_code() -> str:
    """A fresh code: 100 random bits as 20 base32 characters."""
    return base64.b32encode(os.urandom(15)).decode("ascii")[:CODE_LENGTH]


def shown(code: str) -> str:
    """The code as the issuer prints it: groups of five joined by '-'."""
    return "-".join(code[i:i + GROUP] for i in range(0, len(code), GROUP))


def normalize(typed: str) -> str | None:
    """The code a user typed (any case, groups, spaces), or None when it cannot be one."""
    if len(typed) > MAX_CODE_INPUT:
        return None
    code = "".join(c for c in typed.upper() if c not in "- ")
    if len(code) != CODE_LENGTH or any(c not in CODE_ALPHABET for c in code):
        return None
    return code


def _scrypt(code: str, salt: bytes) -> bytes:
    return hashlib.scrypt(code.encode("ascii"), salt=salt, n=SCRYPT_N, r=SCRYPT_R,
                          p=SCRYPT_P, dklen=HASH_LENGTH)


def hash_code(code: str) -> CodeHash:
    salt = os.urandom(SALT_LENGTH)
    return CodeHash(salt, _scrypt(code, salt))


def matches(typed: str, stored: CodeHash) -> bool:
    """Whether ``typed`` is the code ``stored`` was made from (constant-time compare)."""
    code = normalize(typed)
    # A malformed code still costs one hash, so its refusal takes as long as a wrong one.
    digest = _scrypt(code or "", stored.salt)
    return code is not None and hmac.compare_digest(digest, stored.digest)
