"""Payloads of the CardKeys worker operations (plain, picklable, no PKCS#11).

The frontend (``card_keys_service``) validates and authorizes a request and
sends these; ``card_keys_ops`` runs them in the worker that owns the channel.
"""

from __future__ import annotations

from typing import NamedTuple


class Diversified(NamedTuple):
    """A set diversified from an MK block or the factory transport master by an element
    (the PSD id)."""

    token: str
    key_length: int
    master_label: str
    element: bytes


class NewRandom(NamedTuple):
    """A set diversified from an MKRK block by a new R, returned encrypted to
    ``public_label`` (the cryptogram)."""

    token: str
    key_length: int
    master_label: str
    public_label: str


class FromCryptogram(NamedTuple):
    """A set diversified from an MKRK block by the R in a cryptogram, decrypted with
    ``private_label``."""

    token: str
    key_length: int
    master_label: str
    private_label: str
    cryptogram: bytes


class KeySetHandle(NamedTuple):
    """A set derived earlier, held in its worker under a card key set handle."""

    token: str
    handle: str


KeySetSource = Diversified | NewRandom | FromCryptogram | KeySetHandle
"""Where a card key set comes from: one record per KeySetSpec form."""


class Command(NamedTuple):
    """A command to wrap: a plain APDU, or a PUT KEY of a key set built in the HSM."""

    apdu: bytes = b""
    put: KeySetSource | None = None
    new_kvn: int = 0
    replace_kvn: int = 0


class DeriveSet(NamedTuple):
    handle: str
    source: KeySetSource


class OpenChannel(NamedTuple):
    handle: str
    source: KeySetSource
    kvn: int
    host_challenge: bytes
    initialize_update_response: bytes
    security_level: int
    commands: tuple[Command, ...]
    aid: bytes | None
    # Foresee every answer instead of keeping the channel: no state stays behind.
    predict: bool = False


class Wrap(NamedTuple):
    handle: str
    commands: tuple[Command, ...]


class Unwrap(NamedTuple):
    handle: str
    responses: tuple[tuple[bytes, int], ...]
    close: bool = False          # free the channel's state once the answers are checked


class Wrapped(NamedTuple):
    """One wrapped command; ``put`` = (new_kvn, kcv_enc, kcv_mac, kcv_dek) for a PUT KEY."""

    apdu: bytes
    expected_put_key_response: bytes = b""
    put: tuple[int, bytes, bytes, bytes] | None = None
    cryptogram: bytes = b""
    expected_response: bytes = b""   # with OpenChannel.predict: the card's exact answer
