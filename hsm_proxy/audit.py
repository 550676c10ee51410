"""Hash-chained, append-only audit log of every proxy operation, and its verifier.

One JSON object per line, one line per RPC (a batch is one record with its item
count and the distinct key labels it used)::

    {"seq": 7, "time": "2026-11-22T08:30:12.345678Z", "identity": "access-server",
     "operation": "SignBatch", "token": "access", "keys": ["card/mk"], "items": 512,
     "outcome": "ok", "code": "OK", "prev": "<hash of record 6>", "hash": "<sha-256>"}

``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of
the record without ``hash`` but with ``prev``, so editing, deleting, inserting
or reordering a record breaks the chain. A chain alone cannot show that its
last records were cut off, so a head file beside the log (``FILE.head``: last
seq and hash, replaced atomically) records how far the log went; the verifier
reports a log shorter than its head as truncated.

Records carry identities, operation names, token and key labels, handles and
status codes, never key material, PINs, data or plaintext.

Durability: each record is written with one ``write`` to an O_APPEND file
descriptor (no user-space buffer to lose); the file is fsync'ed and the head
rewritten every ``sync_interval`` seconds when records were added, and at
close. The head may therefore trail the log by up to that interval after a
crash; the verifier accepts a log longer than its head (the extra records are
still chain-checked) but never a shorter one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cms.runtime.logs import fields

log = logging.getLogger("hsm_proxy.audit")

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
OUTCOMES = ("ok", "denied", "error")
REQUIRED_FIELDS = ("seq", "time", "identity", "operation", "outcome", "code", "prev", "hash")


class AuditError(Exception):
    """The audit log cannot be opened, read or continued."""


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the record without its ``hash`` field (``prev`` included)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_head(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(head_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read audit head {head_path(path)}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("seq"), int) \
            or not isinstance(data.get("hash"), str):
        raise AuditError(f"audit head {head_path(path)} is not a valid head record")
    return data


def _last_record(path: Path) -> dict[str, Any] | None:
    """The last complete record of an existing log, reading only its tail."""
    size = path.stat().st_size
    if size == 0:
        return None
    with path.open("rb") as fh:
        chunk = 4096
        while True:
            start = max(0, size - chunk)
            fh.seek(start)
            tail = fh.read()
            if not tail.endswith(b"\n"):
                raise AuditError(f"{path}: the last record is incomplete (crash or truncation); "
                                 f"run 'cms audit verify {path}' and move the file aside")
            lines = tail.rstrip(b"\n").split(b"\n")
            if len(lines) > 1 or start == 0:
                try:
                    return json.loads(lines[-1])
                except ValueError:
                    raise AuditError(f"{path}: the last record is not valid JSON; run "
                                     f"'cms audit verify {path}'") from None
            chunk *= 4


class AuditLog:
    """Appends chained records; thread-safe; syncs in the background."""

    def __init__(self, path: Path, *, sync_interval: float = 1.0):
        self.path = Path(path)
        self.sync_interval = sync_interval
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._prev = GENESIS
        self._dirty = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def seq(self) -> int:
        return self._seq

    def open(self) -> AuditLog:
        """Open for appending, continuing the existing chain.

        Refuses a log shorter than its head or ending in a partial record:
        continuing it would hide the damage from the verifier.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            last = _last_record(self.path)
            if last is not None:
                try:
                    self._seq, self._prev = int(last["seq"]), str(last["hash"])
                except (KeyError, TypeError, ValueError):
                    raise AuditError(f"{self.path}: the last record has no seq/hash; run "
                                     f"'cms audit verify {self.path}'") from None
        head = _read_head(self.path)
        if head is not None and head["seq"] > self._seq:
            raise AuditError(
                f"{self.path} ends at record {self._seq} but its head says {head['seq']}: "
                f"records were removed; run 'cms audit verify {self.path}' and move the "
                f"log and its head aside to start a new one")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._thread = threading.Thread(target=self._sync_loop, name="audit-sync", daemon=True)
        self._thread.start()
        log.info("audit log open", extra=fields(file=str(self.path), seq=self._seq))
        return self

    def record(self, *, identity: str | None, operation: str, outcome: str, code: str,
               token: str | list[str] | None = None, keys: Iterable[str] = (),
               handles: Iterable[str] = (), items: int | None = None,
               detail: str | None = None) -> int:
        """Append one record; returns its sequence number."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}")
        entry: dict[str, Any] = {
            "time": _utc_now(),
            "identity": identity,
            "operation": operation,
            "token": token,
            "keys": sorted(set(keys)),
            "outcome": outcome,
            "code": code,
        }
        handle_list = sorted(set(handles))
        if handle_list:
            entry["handles"] = handle_list
        if items is not None:
            entry["items"] = items
        if detail:
            entry["detail"] = detail
        with self._lock:
            if self._fd is None:
                raise AuditError("audit log is closed")
            entry["seq"] = self._seq + 1
            entry["prev"] = self._prev
            entry["hash"] = record_hash(entry)
            line = canonical(entry) + b"\n"
            written = os.write(self._fd, line)
            if written != len(line):
                raise AuditError(f"short write to {self.path}")
            self._seq = entry["seq"]
            self._prev = entry["hash"]
            self._dirty = True
            return self._seq

    def sync(self) -> None:
        """fsync the log, then replace the head with the last seq and hash."""
        with self._lock:
            if self._fd is None:
                return
            os.fsync(self._fd)
            seq, prev = self._seq, self._prev
            self._dirty = False
        self._write_head(seq, prev)

    def _write_head(self, seq: int, digest: str) -> None:
        path = head_path(self.path)
        tmp = path.with_name(path.name + ".tmp")
        data = json.dumps({"seq": seq, "hash": digest, "time": _utc_now()}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            if self._dirty:
                try:
                    self.sync()
                except OSError as exc:
                    log.error("audit sync failed", extra=fields(error=exc.strerror))

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sync()
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        log.info("audit log closed", extra=fields(file=str(self.path), seq=self._seq))


# ---------------------------------------------------------------------------
# Verification

@dataclass
class VerifyReport:
    path: Path
    records: int = 0
    head_seq: int | None = None
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


def _load_lines(path: Path) -> tuple[list[tuple[int, dict[str, Any] | None, str]], bool]:
    """(line number, record or None, raw) for each line, and whether the file ends cleanly."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except IsADirectoryError:
        raise AuditError(f"{path} is a directory, not an audit log") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None
    clean_end = data == b"" or data.endswith(b"\n")
    out: list[tuple[int, dict[str, Any] | None, str]] = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw == b"":
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        out.append((number, value if isinstance(value, dict) else None, text))
    return out, clean_end


def verify_log(path: Path) -> VerifyReport:
    """Check the chain and the head; the report names the first bad record.

    Kinds of damage, told apart where the evidence allows:
    edited (content does not match its hash, or does not link to its
    predecessor), deleted (a gap in seq), inserted (a seq that appears twice, or a
    record with no seq after a valid one), reordered (every seq present but out of
    order), truncated (a partial last line, or fewer records than the head says).
    """
    path = Path(path)
    report = VerifyReport(path)
    lines, clean_end = _load_lines(path)
    head = _read_head(path)
    report.head_seq = head["seq"] if head else None

    seqs_present: dict[int, int] = {}
    for number, rec, _raw in lines:
        if rec is not None and isinstance(rec.get("seq"), int):
            seqs_present.setdefault(rec["seq"], number)

    expected, prev = 1, GENESIS
    by_seq: dict[int, tuple[int, str]] = {}
    for index, (number, rec, _raw) in enumerate(lines):
        is_last = index == len(lines) - 1
        if rec is None:
            if is_last and not clean_end:
                report.problem = (f"truncated: line {number} is an incomplete record "
                                  f"(the log was cut off after record {expected - 1})")
            else:
                report.problem = (f"edited or inserted: line {number} is not a JSON record "
                                  f"(expected record seq {expected})")
            return report
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            report.problem = (f"edited or inserted: line {number} lacks {', '.join(missing)} "
                              f"(expected record seq {expected})")
            return report
        seq = rec["seq"]
        if not isinstance(seq, int):
            report.problem = f"edited: line {number} has a non-integer seq"
            return report
        if record_hash(rec) != rec["hash"]:
            report.problem = (f"edited: record seq {seq} (line {number}) does not match its "
                              f"hash")
            return report
        if seq in by_seq:
            first_line = by_seq[seq][0]
            report.problem = (f"inserted: record seq {seq} appears twice (lines {first_line} "
                              f"and {number})")
            return report
        if seq != expected:
            if seq > expected:
                if expected in seqs_present:
                    report.problem = (f"reordered: record seq {seq} (line {number}) comes "
                                      f"before record seq {expected} (line "
                                      f"{seqs_present[expected]})")
                else:
                    gap = (f"seq {expected}" if seq == expected + 1
                           else f"seq {expected} to {seq - 1}")
                    report.problem = (f"deleted: record(s) {gap} missing before line {number}")
            else:
                report.problem = (f"reordered: record seq {seq} (line {number}) comes after "
                                  f"record seq {expected - 1}")
            return report
        if rec["prev"] != prev:
            report.problem = (f"edited: the chain breaks between record seq {seq - 1} and seq "
                              f"{seq} (line {number}): one of them was changed")
            return report
        by_seq[seq] = (number, rec["hash"])
        prev = rec["hash"]
        expected += 1
        report.records += 1

    last_seq = expected - 1
    if not clean_end and lines:
        report.problem = (f"truncated: the log does not end with a complete line after seq "
                          f"{last_seq}")
        return report
    if head is None:
        report.notes.append(f"no head file {head_path(path)}: a cut-off tail cannot be detected")
    elif head["seq"] > last_seq:
        report.problem = (f"truncated: the head records seq {head['seq']} but the log ends at "
                          f"seq {last_seq}")
    elif head["seq"] > 0:
        at = by_seq.get(head["seq"])
        if at is None or at[1] != head["hash"]:
            report.problem = (f"edited: record seq {head['seq']} does not match the hash in "
                              f"the head")
        elif head["seq"] < last_seq:
            report.notes.append(f"{last_seq - head['seq']} record(s) after the head "
                                f"(written since the last sync); chain-checked")
    return report
