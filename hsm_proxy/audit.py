"""Hash-chained, append-only audit log of every proxy operation, its signed head, and
its verifier.

One JSON object per line, one line per RPC (a batch is one record with its item
count and the distinct key labels it used)::

    {"seq": 7, "time": "2026-11-22T08:30:12.345678Z", "identity": "access-server",
     "operation": "SignBatch", "token": "access", "keys": ["card/mk"], "items": 512,
     "outcome": "ok", "code": "OK", "prev": "<hash of record 6>", "hash": "<sha-256>"}

``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, UTF-8) of
the record without ``hash`` but with ``prev``, so editing, deleting, inserting
or reordering a record breaks the chain.

A chain alone cannot show that its last records were cut off, and anyone who
can write the file can recompute all of it. So the log has an identity and a
signed head:

- **Genesis**: record 1 of every log is ``{"operation": "AuditGenesis",
  "log_id": "<128 random bits, hex>"}``; every signed head names that log id,
  so a head taken from another log does not fit this one.
- **Checkpoints**: every ``checkpoint_interval`` seconds when records were
  added, when the proxy starts and when it stops cleanly, the proxy signs a
  *head* with the audit key (``audit/hsm-proxy``, an AUDIT_KEY in the proxy's
  HSM token, hsm_proxy.audit_ops)::

      {"format": "cms-audit-head/1", "log_id": "...", "seq": 41, "hash": "<hash of 41>",
       "time": "...", "reason": "interval", "token": "access", "key": "audit/hsm-proxy",
       "key_fingerprint": "sha256:<SHA-256 of the public key's DER SPKI>",
       "algorithm": "ECDSA-P256-SHA256", "signature": "<hex r||s>"}

  The signature covers the canonical JSON of every field but ``signature``.
  The head replaces ``FILE.head`` (atomically), then the same head is
  appended as the next record, ``{"operation": "AuditCheckpoint",
  "checkpoint": {head}}``, chained like any record. Written in that order, a
  crash can leave a head whose checkpoint record is missing (the verifier
  notes it: the records the head covers are all there), never a head older
  than the log's last checkpoint (the verifier refuses that as stale).
- The public key is written beside the log on first start (``FILE.pub.pem``);
  an operator pins a copy elsewhere and gives it to ``cms audit verify
  --public-key``.

Signing costs one HSM signature per checkpoint and nothing per record; the
key never signs anything but a head (the worker checks the statement) and no
RPC reaches it.

Records carry identities, operation names, token and key labels, handles and
status codes, never key material, PINs, data or plaintext; checkpoints carry
a signature and a key fingerprint.

Durability: each record is written with one ``write`` to an O_APPEND file
descriptor (no user-space buffer to lose); the file is fsync'ed every
``sync_interval`` seconds when records were added, before every checkpoint
and at close.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from cms.runtime.logs import fields

if TYPE_CHECKING:
    from hsm_proxy.pool import WorkerPool

log = logging.getLogger("hsm_proxy.audit")

GENESIS = "0" * 64
HEAD_SUFFIX = ".head"
PUBLIC_KEY_SUFFIX = ".pub.pem"
OUTCOMES = ("ok", "denied", "error")
REQUIRED_FIELDS = ("seq", "time", "identity", "operation", "outcome", "code", "prev", "hash")

GENESIS_OPERATION = "AuditGenesis"
CHECKPOINT_OPERATION = "AuditCheckpoint"
HEAD_FORMAT = "cms-audit-head/1"
SIGNATURE_ALGORITHM = "ECDSA-P256-SHA256"
REASONS = ("start", "interval", "shutdown")
HEAD_FIELDS = ("format", "log_id", "seq", "hash", "time", "reason", "token", "key",
               "key_fingerprint", "algorithm")
LOG_ID_BYTES = 16
SIGNATURE_BYTES = 64
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LOG_ID = re.compile(rf"^[0-9a-f]{{{2 * LOG_ID_BYTES}}}$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")
SNAPSHOT_TRIES = 3


class AuditError(Exception):
    """The audit log cannot be opened, read or continued."""


def canonical(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 of the record without its ``hash`` field (``prev`` included)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def head_path(path: Path) -> Path:
    return path.with_name(path.name + HEAD_SUFFIX)


def public_key_path(path: Path) -> Path:
    """Where the proxy leaves the audit public key: beside the log (``FILE.pub.pem``)."""
    return path.with_name(path.name + PUBLIC_KEY_SUFFIX)


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---------------------------------------------------------------------------
# Signed heads (shared by the frontend, the worker and the verifier)

def key_fingerprint(spki_der: bytes) -> str:
    return "sha256:" + hashlib.sha256(spki_der).hexdigest()


def signed_bytes(head: Mapping[str, Any]) -> bytes:
    """What the audit key signs: the canonical JSON of the head without its signature."""
    return canonical({k: head[k] for k in HEAD_FIELDS})


def head_problem(head: Any, *, signed: bool) -> str:
    """Empty when ``head`` is a well-formed head statement (with a signature when
    ``signed``, without one otherwise); else what is wrong with it.

    The worker refuses to sign anything this rejects, so the audit key signs
    audit heads and nothing else.
    """
    if not isinstance(head, dict):
        return "not a JSON object"
    allowed = {*HEAD_FIELDS, "signature"} if signed else set(HEAD_FIELDS)
    missing = [f for f in HEAD_FIELDS if f not in head]
    if signed and "signature" not in head:
        missing.append("signature")
    if missing:
        return f"it lacks {', '.join(missing)}"
    extra = sorted(set(head) - allowed)
    if extra:
        return f"it has unknown field(s) {', '.join(extra)}"
    checks = (
        (head["format"] == HEAD_FORMAT, f"format is not {HEAD_FORMAT}"),
        (isinstance(head["log_id"], str) and bool(_LOG_ID.match(head["log_id"])),
         "log_id is not 32 hex digits"),
        (isinstance(head["seq"], int) and not isinstance(head["seq"], bool)
         and head["seq"] >= 1, "seq is not a positive integer"),
        (isinstance(head["hash"], str) and bool(_HEX64.match(head["hash"])),
         "hash is not a SHA-256 in hex"),
        (isinstance(head["time"], str), "time is not a string"),
        (head["reason"] in REASONS, f"reason is not one of {', '.join(REASONS)}"),
        (isinstance(head["token"], str) and isinstance(head["key"], str),
         "token or key is not a string"),
        (isinstance(head["key_fingerprint"], str)
         and bool(_FINGERPRINT.match(head["key_fingerprint"])),
         "key_fingerprint is not sha256:<hex>"),
        (head["algorithm"] == SIGNATURE_ALGORITHM, f"algorithm is not {SIGNATURE_ALGORITHM}"),
        (not signed or isinstance(head["signature"], str), "signature is not a string"),
    )
    return next((why for ok, why in checks if not ok), "")


def signature_valid(public: ec.EllipticCurvePublicKey, head: Mapping[str, Any]) -> bool:
    """Whether ``head["signature"]`` (hex r||s) is ECDSA-SHA256 over ``signed_bytes``."""
    try:
        raw = bytes.fromhex(head["signature"])
    except (ValueError, TypeError):
        return False
    if len(raw) != SIGNATURE_BYTES:
        return False
    half = SIGNATURE_BYTES // 2
    der = encode_dss_signature(int.from_bytes(raw[:half], "big"),
                               int.from_bytes(raw[half:], "big"))
    try:
        public.verify(der, signed_bytes(head), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class AuditKeyRequest(NamedTuple):
    """Worker payload of ``audit.ensure_key``: where the audit key is (or is to be made)."""

    token: str
    label: str


class SignHeadRequest(NamedTuple):
    """Worker payload of ``audit.sign``: a head statement, without its signature."""

    token: str
    label: str
    head: dict[str, Any]


class HeadSigner(Protocol):
    """What the log needs of the audit key: its name, fingerprint and signatures."""

    token: str
    label: str
    fingerprint: str | None    # None until ``prepare`` succeeded

    def prepare(self) -> None: ...

    def sign(self, head: dict[str, Any]) -> bytes: ...


class HsmHeadSigner:
    """The audit key as the frontend knows it: a name, a public key, and signatures that
    a general worker makes through the pool (this process never loads PKCS#11)."""

    def __init__(self, pool: WorkerPool, *, token: str, label: str, public_key_file: Path,
                 timeout: float):
        self.token = token
        self.label = label
        self.public_key_file = Path(public_key_file)
        self.fingerprint: str | None = None
        self._pool = pool
        self._timeout = timeout

    def prepare(self) -> None:
        """Make the key on first start (or find it), and keep its public key beside the log.

        A public key file there that names another key means this log was
        signed by a key the token no longer holds: continuing would mix keys,
        so the proxy refuses (AuditError).
        """
        der = self._pool.call("audit.ensure_key", AuditKeyRequest(self.token, self.label),
                              idempotent=False, timeout=self._timeout).value
        self._keep_public_key(der)
        self.fingerprint = key_fingerprint(der)

    def sign(self, head: dict[str, Any]) -> bytes:
        return self._pool.call("audit.sign", SignHeadRequest(self.token, self.label, head),
                               idempotent=True, timeout=self._timeout).value

    def _keep_public_key(self, der: bytes) -> None:
        path = self.public_key_file
        if path.exists():
            there = load_public_key(path)
            if public_der(there) != der:
                raise AuditError(
                    f"{path} holds another public key than the audit key {self.label!r} on "
                    f"token {self.token!r}: the log beside it was signed by another key; "
                    f"restore that token, or move the log, its head and {path.name} aside "
                    f"to start a new log")
            return
        pem = serialization.load_der_public_key(der).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        _write_atomically(path, pem, 0o644)
        log.info("audit public key written", extra=fields(file=str(path),
                                                          fingerprint=key_fingerprint(der)))


def public_der(public: ec.EllipticCurvePublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An EC P-256 public key from a PEM file; AuditError naming the file otherwise."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no public key file at {path}") from None
    except OSError as exc:
        raise AuditError(f"cannot read public key {path}: {exc.strerror}") from None
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        raise AuditError(f"{path} is not a PEM public key") from None
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise AuditError(f"{path} is not an EC P-256 public key (the audit key is one)")
    return public


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Reading an existing log at start-up

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


def _log_id_of(path: Path) -> str:
    """The log id of an existing log's genesis record (its first line)."""
    with path.open("rb") as fh:
        first = fh.readline()
    try:
        genesis = json.loads(first)
    except ValueError:
        genesis = None
    if not isinstance(genesis, dict) or genesis.get("operation") != GENESIS_OPERATION \
            or genesis.get("seq") != 1 or not _LOG_ID.match(str(genesis.get("log_id", ""))):
        raise AuditError(f"{path} does not begin with a genesis record (a log id): it was "
                         f"written by an older proxy or its beginning was cut; run 'cms audit "
                         f"verify {path}' and move the log and its head aside to start a new one")
    return str(genesis["log_id"])


# ---------------------------------------------------------------------------
# Writing

class AuditLog:
    """Appends chained records; thread-safe; syncs and checkpoints in the background.

    ``signer`` (set by the proxy once its worker pool runs) signs the heads;
    without one the log is chained but never checkpointed.
    """

    def __init__(self, path: Path, *, sync_interval: float = 1.0,
                 checkpoint_interval: float = 60.0):
        self.path = Path(path)
        self.sync_interval = sync_interval
        self.checkpoint_interval = checkpoint_interval
        self.signer: HeadSigner | None = None
        self.log_id = ""
        self._lock = threading.Lock()
        self._checkpoint_lock = threading.Lock()
        self._fd: int | None = None
        self._seq = 0
        self._prev = GENESIS
        self._checkpointed = 0     # seq of the last checkpoint record
        self._signed_this_run = False
        self._dirty = False
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def seq(self) -> int:
        return self._seq

    def open(self) -> AuditLog:
        """Open for appending, continuing the existing chain (a new log starts with its
        genesis record).

        Refuses a log shorter than its head, one ending in a partial record,
        one without a genesis record, and a head of another log: continuing
        any of them would hide the damage from the verifier.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        last = _last_record(self.path) if self.path.exists() else None
        if last is not None:
            try:
                self._seq, self._prev = int(last["seq"]), str(last["hash"])
            except (KeyError, TypeError, ValueError):
                raise AuditError(f"{self.path}: the last record has no seq/hash; run "
                                 f"'cms audit verify {self.path}'") from None
            self.log_id = _log_id_of(self.path)
            if last.get("operation") == CHECKPOINT_OPERATION:
                self._checkpointed = self._seq
        self._check_head(_read_head(self.path))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        if self._seq == 0:
            self.log_id = secrets.token_hex(LOG_ID_BYTES)
            self._append(self._entry(GENESIS_OPERATION, log_id=self.log_id))
        self._start_thread(self._sync_loop, "audit-sync")
        log.info("audit log open", extra=fields(file=str(self.path), seq=self._seq,
                                                log_id=self.log_id))
        return self

    def start_checkpoints(self) -> None:
        """Checkpoint every ``checkpoint_interval`` from now on (once ``signer`` is set
        and the start checkpoint was tried: before that there is no key to sign with)."""
        self._start_thread(self._checkpoint_loop, "audit-checkpoint")

    def _start_thread(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _check_head(self, head: dict[str, Any] | None) -> None:
        if head is None:
            return
        if head["seq"] > self._seq:
            raise AuditError(
                f"{self.path} ends at record {self._seq} but its head says {head['seq']}: "
                f"records were removed; run 'cms audit verify {self.path}' and move the "
                f"log and its head aside to start a new one")
        if self._seq and head.get("log_id") != self.log_id:
            raise AuditError(
                f"the head {head_path(self.path)} belongs to another log (log id "
                f"{head.get('log_id')}, this log is {self.log_id}); run 'cms audit verify "
                f"{self.path}'")

    @staticmethod
    def _entry(operation: str, *, token: str | None = None, keys: Iterable[str] = (),
               **extra: Any) -> dict[str, Any]:
        """A record of the proxy's own (genesis, checkpoint): no caller, always ok."""
        return {"time": _utc_now(), "identity": None, "operation": operation, "token": token,
                "keys": sorted(set(keys)), "outcome": "ok", "code": "OK", **extra}

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
        return self._append(entry)

    def _append(self, entry: dict[str, Any]) -> int:
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
        """fsync the log (the head moves only with a checkpoint)."""
        with self._lock:
            if self._fd is None:
                return
            os.fsync(self._fd)
            self._dirty = False

    def checkpoint(self, reason: str) -> dict[str, Any] | None:
        """Sign the head (last seq and hash, under the log id), write it to the head file,
        then append it as a checkpoint record. Returns the head, or None when skipped:
        no signer, an ``interval`` with no record since the last checkpoint, or a
        ``shutdown`` before the key was ever reached.

        Raises what the signer raises (the HSM down, the key refused); the
        records themselves are unaffected. The signature is made outside the
        record lock: calls go on being recorded while a worker signs.
        """
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}")
        signer = self.signer
        if signer is None:
            return None
        with self._checkpoint_lock:
            if signer.fingerprint is None:
                if reason == "shutdown":
                    return None
                signer.prepare()
            if not self._signed_this_run and reason == "interval":
                reason = "start"  # the start checkpoint failed (HSM down): this is it
            with self._lock:
                if self._fd is None or (reason == "interval"
                                        and self._seq <= self._checkpointed):
                    return None
                os.fsync(self._fd)  # what the head covers is on disk before the head
                seq, digest = self._seq, self._prev
            head: dict[str, Any] = {
                "format": HEAD_FORMAT, "log_id": self.log_id, "seq": seq, "hash": digest,
                "time": _utc_now(), "reason": reason, "token": signer.token,
                "key": signer.label, "key_fingerprint": signer.fingerprint,
                "algorithm": SIGNATURE_ALGORITHM,
            }
            head["signature"] = signer.sign(dict(head)).hex()
            _write_atomically(head_path(self.path), json.dumps(head).encode(), 0o600)
            self._checkpointed = self._append(self._entry(
                CHECKPOINT_OPERATION, token=signer.token, keys=[signer.label],
                checkpoint=head))
            self._signed_this_run = True
        log.info("audit checkpoint", extra=fields(seq=seq, reason=reason,
                                                  record=self._checkpointed))
        return head

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_interval):
            if self._dirty:
                try:
                    self.sync()
                except OSError as exc:
                    log.error("audit sync failed", extra=fields(error=exc.strerror))

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.checkpoint_interval):
            try:
                self.checkpoint("interval")
            except Exception as exc:  # the loop outlives an HSM outage; records go on
                log.error("audit checkpoint failed; retrying at the next interval",
                          extra=fields(error=getattr(exc, "message", None)
                                       or type(exc).__name__))

    def close(self) -> None:
        """Stop the background work, write the final (shutdown) checkpoint, sync, close."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        try:
            if self.checkpoint("shutdown") is None and self.signer is not None:
                log.warning("no final audit checkpoint: the audit key was never reached")
        except Exception as exc:
            log.error("final audit checkpoint failed", extra=fields(
                error=getattr(exc, "message", None) or type(exc).__name__))
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
    checkpoints: int = 0
    head_seq: int | None = None
    chain_intact: bool = False      # every record checked; a problem is past the chain
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None


Line = tuple[int, dict[str, Any] | None, str]


def _read_log_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AuditError(f"no audit log at {path}") from None
    except IsADirectoryError:
        raise AuditError(f"{path} is a directory, not an audit log") from None
    except OSError as exc:
        raise AuditError(f"cannot read audit log {path}: {exc.strerror}") from None


def _read_head_bytes(path: Path) -> bytes | None:
    try:
        return head_path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuditError(f"cannot read audit head {head_path(path)}: {exc.strerror}") from None


def _snapshot(path: Path) -> tuple[bytes | None, bytes]:
    """The head and the log as of one moment, for a log a running proxy writes to.

    The head is read first (the log only grows past it), then the log, then
    the head again: a checkpoint that landed in between would otherwise look
    like a stale head.
    """
    head = _read_head_bytes(path)
    data = _read_log_bytes(path)
    for _ in range(SNAPSHOT_TRIES):
        again = _read_head_bytes(path)
        if again == head:
            break
        head, data = again, _read_log_bytes(path)
    return head, data


def _split_lines(data: bytes) -> tuple[list[Line], bool]:
    """(line number, record or None, raw) for each line, and whether the data ends cleanly."""
    clean_end = data == b"" or data.endswith(b"\n")
    out: list[Line] = []
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


def _check_chain(lines: list[Line], clean_end: bool, report: VerifyReport
                 ) -> list[dict[str, Any]] | None:
    """The records in seq order when the chain holds; None (and ``report.problem``)
    at the first bad record.

    Kinds of damage, told apart where the evidence allows: edited (content
    does not match its hash, or does not link to its predecessor), deleted (a
    gap in seq), inserted (a seq that appears twice, or a record with no seq
    after a valid one), reordered (every seq present but out of order),
    truncated (a partial last line).
    """
    seqs_present: dict[int, int] = {}
    for number, rec, _raw in lines:
        if rec is not None and isinstance(rec.get("seq"), int):
            seqs_present.setdefault(rec["seq"], number)

    expected, prev = 1, GENESIS
    line_of: dict[int, int] = {}
    records: list[dict[str, Any]] = []
    for index, (number, rec, _raw) in enumerate(lines):
        is_last = index == len(lines) - 1
        if rec is None:
            if is_last and not clean_end:
                report.problem = (f"truncated: line {number} is an incomplete record "
                                  f"(the log was cut off after record {expected - 1})")
            else:
                report.problem = (f"edited or inserted: line {number} is not a JSON record "
                                  f"(expected record seq {expected})")
            return None
        missing = [f for f in REQUIRED_FIELDS if f not in rec]
        if missing:
            report.problem = (f"edited or inserted: line {number} lacks {', '.join(missing)} "
                              f"(expected record seq {expected})")
            return None
        seq = rec["seq"]
        if not isinstance(seq, int):
            report.problem = f"edited: line {number} has a non-integer seq"
            return None
        if record_hash(rec) != rec["hash"]:
            report.problem = (f"edited: record seq {seq} (line {number}) does not match its "
                              f"hash")
            return None
        if seq in line_of:
            report.problem = (f"inserted: record seq {seq} appears twice (lines "
                              f"{line_of[seq]} and {number})")
            return None
        if seq != expected:
            report.problem = _out_of_sequence(seq, expected, number, seqs_present)
            return None
        if rec["prev"] != prev:
            report.problem = (f"edited: the chain breaks between record seq {seq - 1} and seq "
                              f"{seq} (line {number}): one of them was changed")
            return None
        line_of[seq] = number
        records.append(rec)
        prev = rec["hash"]
        expected += 1
        report.records += 1
    if not clean_end and lines:
        report.problem = (f"truncated: the log does not end with a complete line after seq "
                          f"{expected - 1}")
        return None
    return records


def _out_of_sequence(seq: int, expected: int, number: int, seqs_present: dict[int, int]) -> str:
    if seq < expected:
        return (f"reordered: record seq {seq} (line {number}) comes after record seq "
                f"{expected - 1}")
    if expected in seqs_present:
        return (f"reordered: record seq {seq} (line {number}) comes before record seq "
                f"{expected} (line {seqs_present[expected]})")
    gap = f"seq {expected}" if seq == expected + 1 else f"seq {expected} to {seq - 1}"
    return f"deleted: record(s) {gap} missing before line {number}"


def _genesis_log_id(records: list[dict[str, Any]]) -> tuple[str, str]:
    """(log id, "") from the genesis record, or ("", problem)."""
    if not records:
        return "", "truncated: the log is empty (every log begins with its genesis record)"
    first = records[0]
    if first.get("operation") != GENESIS_OPERATION or not _LOG_ID.match(
            str(first.get("log_id", ""))):
        return "", ("no genesis record: record seq 1 does not carry the log id (written by an "
                    "older proxy, or the chain was rebuilt from its second record)")
    return str(first["log_id"]), ""


@dataclass(frozen=True)
class _Key:
    public: ec.EllipticCurvePublicKey
    fingerprint: str


def _verifying_key(path: Path, given: Path | None, report: VerifyReport) -> _Key | None:
    """The pinned public key, else the one beside the log (with a note saying what that
    is worth); None (and a problem) when there is neither."""
    if given is not None:
        public = load_public_key(given)
    else:
        beside = public_key_path(path)
        if not beside.exists():
            report.problem = (f"no public key to check the signatures: give the pinned copy "
                              f"with --public-key (none beside the log at {beside})")
            return None
        public = load_public_key(beside)
        report.notes.append(
            f"signatures checked with {beside.name} beside the log: that copy proves nothing "
            f"against someone who can rewrite the directory; pin a copy elsewhere and pass it "
            f"with --public-key")
    return _Key(public, key_fingerprint(public_der(public)))


def _signed_head_problem(head: Any, what: str, log_id: str, key: _Key) -> str:
    """Empty when ``head`` is a head of this log validly signed by ``key``."""
    if isinstance(head, dict) and "signature" not in head:
        return f"{what} is unsigned: it carries no signature"
    problem = head_problem(head, signed=True)
    if problem:
        return f"{what} is not a signed head: {problem}"
    if head["log_id"] != log_id:
        return (f"{what} belongs to another log (log id {head['log_id']}; this log's genesis "
                f"says {log_id})")
    if head["key_fingerprint"] != key.fingerprint:
        return (f"{what} is signed by another key (fingerprint {head['key_fingerprint']}; "
                f"the public key's is {key.fingerprint})")
    if not signature_valid(key.public, head):
        return f"{what}: the signature does not verify with the public key"
    return ""


def _check_checkpoints(records: list[dict[str, Any]], log_id: str, key: _Key,
                       report: VerifyReport) -> tuple[dict[str, Any], int] | None:
    """Check every checkpoint record's signed head; returns the last one and its record's
    seq (None when there is none or ``report.problem`` is set)."""
    last: tuple[dict[str, Any], int] | None = None
    for rec in records:
        if rec.get("operation") != CHECKPOINT_OPERATION:
            continue
        seq, head = rec["seq"], rec.get("checkpoint")
        what = f"checkpoint record seq {seq}"
        problem = _signed_head_problem(head, what, log_id, key)
        if not problem and head["seq"] >= seq:
            problem = f"{what} covers record seq {head['seq']}, which comes after it"
        if not problem and records[head["seq"] - 1]["hash"] != head["hash"]:
            problem = (f"edited: {what} covers record seq {head['seq']}, whose hash is not "
                       f"the one it signed")
        if not problem and last is not None and head["seq"] <= last[0]["seq"]:
            problem = f"{what} covers an earlier record than the checkpoint before it"
        if problem:
            report.problem = problem
            return None
        last = (head, seq)
        report.checkpoints += 1
    return last


def _check_head(head: Any, records: list[dict[str, Any]], last_checkpoint:
                tuple[dict[str, Any], int] | None, log_id: str, key: _Key,
                report: VerifyReport) -> None:
    problem = _signed_head_problem(head, "the head", log_id, key)
    if problem:
        report.problem = problem
        return
    seq, end = head["seq"], len(records)
    report.head_seq = seq
    if seq > end:
        report.problem = f"truncated: the head records seq {seq} but the log ends at seq {end}"
        return
    if records[seq - 1]["hash"] != head["hash"]:
        report.problem = (f"the head does not match the log: record seq {seq} has another hash "
                          f"than the one the head signed")
        return
    covered = last_checkpoint[0]["seq"] if last_checkpoint else 0
    if covered > seq:
        report.problem = (f"stale head: the log's checkpoint at record seq "
                          f"{last_checkpoint[1]} covers seq {covered}, past the head's seq "
                          f"{seq} (the head was replaced by an older one)")
        return
    if covered == seq and last_checkpoint is not None and last_checkpoint[0] != head:
        report.problem = (f"the head does not match the log's last checkpoint (record seq "
                          f"{last_checkpoint[1]}), which covers the same record")
        return
    _head_notes(head, records, covered, report)


def _head_notes(head: dict[str, Any], records: list[dict[str, Any]], covered: int,
                report: VerifyReport) -> None:
    seq = head["seq"]
    if covered < seq:
        report.notes.append(f"the checkpoint record of the head (seq {seq}) is not in the log "
                            f"yet: the proxy stopped, or is, between writing the head and "
                            f"appending it; every record the head covers is there")
    after = sum(1 for r in records[seq:] if r.get("operation") != CHECKPOINT_OPERATION)
    if after:
        report.notes.append(f"{after} record(s) after the head's seq {seq}: chain-checked, "
                            f"covered by no signature yet (written since the last checkpoint)")
    if head["reason"] != "shutdown":
        report.notes.append(
            f"the head is a {head['reason']} checkpoint of {head['time']}, not a shutdown "
            f"one: the proxy is running or did not stop cleanly, or the log was cut back to "
            f"this checkpoint (only a head kept elsewhere shows that: --anchor)")


def _check_anchor(anchor_path: Path, records: list[dict[str, Any]], log_id: str, key: _Key,
                  report: VerifyReport) -> None:
    """A head kept elsewhere (write-once storage): the log must still reach it."""
    try:
        anchor = json.loads(anchor_path.read_text())
    except FileNotFoundError:
        raise AuditError(f"no anchor head at {anchor_path}") from None
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot read anchor head {anchor_path}: {exc}") from None
    problem = _signed_head_problem(anchor, "the anchor head", log_id, key)
    if problem:
        report.problem = problem
        return
    seq, end = anchor["seq"], len(records)
    if seq > end:
        report.problem = (f"truncated: the log ends at seq {end}, before the anchored head at "
                          f"seq {seq} ({anchor['time']})")
    elif records[seq - 1]["hash"] != anchor["hash"]:
        report.problem = f"the log does not match the anchored head at seq {seq}"
    elif report.head_seq is not None and seq > report.head_seq:
        report.problem = (f"stale head: the anchored head (seq {seq}) is past the head "
                          f"(seq {report.head_seq})")


def verify_log(path: Path, *, public_key: Path | None = None,
               anchor: Path | None = None) -> VerifyReport:
    """Check the chain, the genesis, every checkpoint's signature and the signed head;
    the report names the first problem.

    ``public_key``: the pinned audit public key (PEM); without it the copy
    beside the log is used, with a note. ``anchor``: a head kept elsewhere
    that the log must still reach. AuditError for files that cannot be read.
    """
    path = Path(path)
    report = VerifyReport(path)
    head_raw, data = _snapshot(path)
    lines, clean_end = _split_lines(data)
    records = _check_chain(lines, clean_end, report)
    if records is None:
        return report
    report.chain_intact = True
    log_id, problem = _genesis_log_id(records)
    if problem:
        report.problem = problem
        return report
    key = _verifying_key(path, public_key, report)
    if key is None:
        return report
    last_checkpoint = _check_checkpoints(records, log_id, key, report)
    if report.problem:
        return report
    if head_raw is None:
        report.problem = (f"no head file {head_path(path)}: the end of the log cannot be "
                          f"checked (deleting the head is how a cut tail would hide)")
        return report
    try:
        head = json.loads(head_raw)
    except ValueError:
        report.problem = f"the head {head_path(path)} is not JSON"
        return report
    _check_head(head, records, last_checkpoint, log_id, key, report)
    if report.ok and anchor is not None:
        _check_anchor(Path(anchor), records, log_id, key, report)
    return report
