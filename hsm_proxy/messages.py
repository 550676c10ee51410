"""Payloads the frontend sends to worker operations (plain, picklable, no PKCS#11).

The frontend validates a request, authorizes it, resolves handles to their
worker, and sends one of these; the worker operation of the same purpose in
``hsm_ops`` executes it. Enum fields hold the ``cms.v1`` enum numbers.
"""

from __future__ import annotations

from typing import NamedTuple


class LabelRef(NamedTuple):
    """A persistent key: token and object label."""

    token: str
    label: str


class HandleRef(NamedTuple):
    """A session key (or other state) held by the worker the message goes to."""

    handle: str


KeyRef = LabelRef | HandleRef


class Template(NamedTuple):
    """A new key's attributes; ``handle`` is the frontend-chosen handle of a session key."""

    label: str
    usages: frozenset[int]
    extractable: bool
    session: bool
    key_id: bytes
    handle: str | None = None


class SignItem(NamedTuple):
    key: KeyRef
    mechanism: int
    data: bytes


class VerifyItem(NamedTuple):
    key: KeyRef
    mechanism: int
    data: bytes
    signature: bytes


class CipherItem(NamedTuple):
    key: KeyRef
    mechanism: int
    iv: bytes
    data: bytes
    decrypt: bool


class GenerateSecret(NamedTuple):
    token: str
    algorithm: int
    length_bytes: int
    template: Template


class GeneratePair(NamedTuple):
    token: str
    algorithm: int
    template: Template


class DeriveItem(NamedTuple):
    base: KeyRef
    mechanism: int
    data: bytes
    iv: bytes
    algorithm: int
    length_bytes: int
    template: Template


class Wrap(NamedTuple):
    wrapping: KeyRef
    key: KeyRef
    mechanism: int


class Unwrap(NamedTuple):
    unwrapping: KeyRef
    wrapped: bytes
    mechanism: int
    key_class: int
    algorithm: int
    length_bytes: int
    template: Template
    expected_kcv: bytes


class ImportPublic(NamedTuple):
    token: str
    der: bytes
    template: Template


class Describe(NamedTuple):
    key: KeyRef
    key_class: int


class Destroy(NamedTuple):
    key: KeyRef


class ListKeys(NamedTuple):
    token: str
    pattern: str
    key_class: int


class Random(NamedTuple):
    token: str
    length: int


class ComponentBegin(NamedTuple):
    handle: str
    tokens: tuple[str, ...]
    algorithm: int
    components: int
    template: Template


class ComponentAdd(NamedTuple):
    handle: str
    component: bytes
    kcv: bytes
