"""The provider's own state directory: its id, and the serials it has handed out.

Card serials and pack serials are allocated here and never reused: a counter
is written (and flushed to disk) before the serial it yields goes anywhere,
so a crash can lose a serial but never hand one out twice. Every pack serial,
allocated or given by the operator, is claimed by creating a marker file
exclusively, so two runs cannot write packs of the same serial. The
directory holds no key, no PIN and no card secret.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from cardcore.issuance import check_serial
from cms.pack_format import check_name
from cms.runtime.files import PRIVATE_FILE, private_dir

COUNTERS: Final = "counters.json"
PROVIDER: Final = "provider.json"
PACKS: Final = "packs"
LOCK: Final = ".lock"
CARD_DIGITS: Final = 10
PACK_DIGITS: Final = 6
_NOT_SERIAL = re.compile(r"[^0-9A-Z-]+")


class StateError(Exception):
    """The state directory cannot be used as asked (reported as one line)."""


def card_serial_prefix(provider_id: str) -> str:
    """The provider id as card serials start: upper case, other characters as '-'."""
    prefix = _NOT_SERIAL.sub("-", provider_id.upper()).strip("-") or "CARD"
    return prefix[: 31 - CARD_DIGITS]


def card_serial(provider_id: str, number: int) -> str:
    return check_serial(f"{card_serial_prefix(provider_id)}-{number:0{CARD_DIGITS}d}")


def pack_serial(provider_id: str, number: int) -> str:
    serial = f"{provider_id[: 63 - PACK_DIGITS - 4]}-PK-{number:0{PACK_DIGITS}d}"
    check_name("pack serial", serial)
    return serial


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class ProviderState:
    """One provider's state directory (created 0700 on first use)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _ready(self) -> Path:
        try:
            private_dir(self.directory)
            private_dir(self.directory / PACKS)
        except OSError as exc:
            raise StateError(f"state directory {self.directory}: {exc.strerror or exc}") from None
        return self.directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._ready() / LOCK, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _counters(self) -> dict[str, int]:
        path = self.directory / COUNTERS
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise StateError(f"{path}: unreadable counters ({exc})") from None
        if not isinstance(data, dict) or not all(
                isinstance(v, int) and v >= 0 for v in data.values()):
            raise StateError(f"{path}: counters are not non-negative integers")
        return data

    def _next(self, name: str) -> int:
        """The next number of counter ``name``, on disk before it is returned."""
        with self._locked():
            return self._next_unlocked(name)

    def _next_unlocked(self, name: str) -> int:
        counters = self._counters()
        number = counters.get(name, 0) + 1
        counters[name] = number
        _write_durably(self.directory / COUNTERS, json.dumps(counters, sort_keys=True).encode())
        return number

    def next_card_serial(self, provider_id: str) -> str:
        return card_serial(provider_id, self._next("card"))

    def claim_pack_serial(self, provider_id: str, serial: str | None = None) -> str:
        """A pack serial of this provider's own, claimed for good: the next one of the
        counter, or ``serial`` if no pack of that serial was ever claimed here."""
        with self._locked():
            if serial is None:
                serial = pack_serial(provider_id, self._next_unlocked("pack"))
            else:
                check_name("pack serial", serial)
            marker = self.directory / PACKS / serial
            try:
                fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
            except FileExistsError:
                raise StateError(f"pack serial {serial} was used before; pack serials are "
                                 "never reused") from None
            os.close(fd)
            return serial

    def provider_id(self) -> str | None:
        """The provider id ``root create`` recorded here, if any."""
        try:
            data = json.loads((self.directory / PROVIDER).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.directory / PROVIDER}: {exc}") from None
        value = data.get("provider_id") if isinstance(data, dict) else None
        return value if isinstance(value, str) else None

    def record_provider_id(self, provider_id: str) -> None:
        check_name("provider id", provider_id)
        with self._locked():
            _write_durably(self.directory / PROVIDER,
                           json.dumps({"provider_id": provider_id}).encode())
