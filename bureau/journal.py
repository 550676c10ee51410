"""The bureau's journal: each card's step in a batch, so an interrupted batch resumes.

One SQLite file in the bureau's state directory, written in FULL
synchronous mode: a step is on disk before the APDU it announces goes to
the card. What it holds is what the results, shipping and mailing files are
made of, and nothing secret: a card's step, why it failed, and the mailer
data of the PIN and PUK the bureau's HSM made for it (sealed to the mailing
house's key; the bureau never has them in clear).

A card's steps, in order (``Step``): it was presented and matched
(``STARTED``), it holds this payload (``PERSONALIZED``: PERSONALIZE answered
9000 or 6A89), its codes are sealed (``CODES_SEALED``, with the mailer
data), its SET PIN was accepted (``PIN_SET``), its answer was checked
(``DONE``); or ``FAILED`` with the reason. A resumed batch starts each card
that is not ``DONE`` from the beginning: every command the bureau sends is
safe to send again (the card recognizes its payload, the codes are the same,
a PIN already set is told apart), so the journal need not know which APDU
an interruption hit.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

from cms.runtime.files import private_dir, private_file

JOURNAL_NAME = "journal.sqlite"


class Step(IntEnum):
    STARTED = 1
    PERSONALIZED = 2
    CODES_SEALED = 3
    PIN_SET = 4
    DONE = 5
    FAILED = 9


class CardEntry(NamedTuple):
    serial: str
    step: Step
    reason: str
    mailer_data: bytes


class JournalError(Exception):
    """The journal cannot be opened, or a batch is not the one it recorded."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    file_serial TEXT PRIMARY KEY,
    file_sha256 TEXT NOT NULL,
    started_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cards (
    file_serial TEXT NOT NULL REFERENCES batches(file_serial),
    serial TEXT NOT NULL,
    step INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    mailer_data BLOB NOT NULL DEFAULT x'',
    updated_at TEXT NOT NULL,
    PRIMARY KEY (file_serial, serial)
);
"""


class Journal:
    """The journal of one personalization file (by its serial and its bytes' SHA-256)."""

    def __init__(self, state_dir: Path, file_serial: bytes, file_sha256: bytes, *,
                 resume: bool) -> None:
        try:
            path = private_file(private_dir(state_dir) / JOURNAL_NAME)
            # One connection for the run, its use serialized: cards through card agents are
            # driven in threads of their own.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._lock = threading.Lock()
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the journal in {state_dir}: {exc}") from None
        self.file_serial = file_serial.hex()
        found = self._db.execute("SELECT file_sha256 FROM batches WHERE file_serial = ?",
                                 (self.file_serial,)).fetchone()
        if found is None:
            self._db.execute("INSERT INTO batches VALUES (?, ?, ?)",
                             (self.file_serial, file_sha256.hex(), _now()))
        elif found[0] != file_sha256.hex():
            raise JournalError(f"the journal holds another file of serial {self.file_serial}: "
                               "a personalization file is never changed once begun")
        elif not resume:
            raise JournalError(f"batch {self.file_serial} was begun before: continue it with "
                               "--resume")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def unfinished(self, serials: set[str]) -> set[str]:
        """The serials of ``serials`` whose outcome is not final yet."""
        final = {e.serial for e in self.cards() if e.step in (Step.DONE, Step.FAILED)}
        return serials - final

    def card(self, serial: str) -> CardEntry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT serial, step, reason, mailer_data FROM cards WHERE file_serial = ? AND "
                "serial = ?", (self.file_serial, serial)).fetchone()
        return None if row is None else CardEntry(row[0], Step(row[1]), row[2], bytes(row[3]))

    def cards(self) -> list[CardEntry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT serial, step, reason, mailer_data FROM cards WHERE file_serial = ? "
                "ORDER BY serial", (self.file_serial,)).fetchall()
        return [CardEntry(r[0], Step(r[1]), r[2], bytes(r[3])) for r in rows]

    def record(self, serial: str, step: Step, *, reason: str = "",
               mailer_data: bytes | None = None) -> None:
        """``serial`` reached ``step`` (on disk when this returns); mailer data once
        recorded is kept."""
        with self._lock:
            self._record(serial, step, reason, mailer_data or b"")

    def _record(self, serial: str, step: Step, reason: str, mailer_data: bytes) -> None:
        self._db.execute(
            "INSERT INTO cards (file_serial, serial, step, reason, mailer_data, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (file_serial, serial) DO UPDATE SET "
            "step = excluded.step, reason = excluded.reason, updated_at = excluded.updated_at, "
            "mailer_data = CASE WHEN length(excluded.mailer_data) > 0 "
            "THEN excluded.mailer_data ELSE cards.mailer_data END",
            (self.file_serial, serial, int(step), reason, mailer_data, _now()))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
