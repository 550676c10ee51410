"""Key management's records: what was made, by whom, and where it went.

The keys themselves live in the HSMs; this store keeps only their names,
versions, check values and history, so an operator can answer "which MK
versions exist, which reached HSM1, who entered the components of the
transport key" without touching an HSM. No column holds key material: check
values (3 bytes) identify keys without revealing them.

SQLite by default (key management is a low-traffic service next to HSM2);
any SQLAlchemy URL that names SQLite or PostgreSQL works. Writes are
serialized in the process: the service has one instance per HSM2.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url

from cms.runtime.errors import InvalidArgument, NotFound
from cms.runtime.files import sqlite_file

metadata = MetaData()

key_blocks = Table(
    "key_blocks", metadata,
    Column("label", String(128), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("algorithm", String(32), nullable=False),
    Column("kcv", LargeBinary(8), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("transferred", DateTime(timezone=True)),
    Column("transferred_under", String(128)),
    UniqueConstraint("kind", "version"),
)

ceremonies = Table(
    "ceremonies", metadata,
    Column("ceremony_id", String(64), primary_key=True),
    Column("label", String(128), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("algorithm", String(32), nullable=False),
    Column("tokens", Text, nullable=False),            # JSON list
    Column("needed", Integer, nullable=False),
    Column("custodians", Text, nullable=False),        # JSON list, in order of entry
    Column("state", String(16), nullable=False),
    Column("proxy_handle", String(128), nullable=False),
    Column("kcvs", Text, nullable=False),              # JSON {token: kcv hex}
    Column("started_by", String(128), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
    Column("updated", DateTime(timezone=True), nullable=False),
)

transport_keys = Table(
    "transport_keys", metadata,
    Column("label", String(128), primary_key=True),
    Column("method", String(32), nullable=False),
    Column("kcv_hsm2", LargeBinary(8), nullable=False),
    Column("kcv_hsm1", LargeBinary(8), nullable=False),
    Column("created", DateTime(timezone=True), nullable=False),
)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(128), nullable=False),
    Column("detail", Text, nullable=False),
)

CEREMONY_AWAITING = "awaiting"
CEREMONY_COMPLETED = "completed"
CEREMONY_CANCELLED = "cancelled"
CEREMONY_EXPIRED = "expired"
CEREMONY_FAILED = "failed"


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything we store is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass(frozen=True)
class BlockRecord:
    label: str
    kind: str
    version: int
    algorithm: str
    kcv: bytes
    created: datetime
    transferred: datetime | None


@dataclass(frozen=True)
class CeremonyRecord:
    ceremony_id: str
    label: str
    purpose: str
    algorithm: str
    tokens: list[str]
    needed: int
    custodians: list[str]
    state: str
    proxy_handle: str          # the proxy's ceremony id (the same as ceremony_id)
    kcvs: dict[str, bytes]


@dataclass(frozen=True)
class TransportRecord:
    label: str
    method: str
    kcv_hsm2: bytes
    kcv_hsm1: bytes


class KeyStore:
    """Records of key blocks, ceremonies, transport keys and events."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise InvalidArgument(f"unsupported database URL {parsed.drivername!r} "
                                  f"(sqlite:///PATH or postgresql+psycopg://...)")
        if backend == "sqlite" and parsed.database not in (None, "", ":memory:"):
            sqlite_file(parsed.database)          # 0600, -wal/-shm alike (cms.runtime.files)
        self.engine = create_engine(url, connect_args={"check_same_thread": False}
                                    if backend == "sqlite" else {})
        metadata.create_all(self.engine)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # -- key blocks ---------------------------------------------------------------
    def add_block(self, *, label: str, kind: str, version: int, algorithm: str, kcv: bytes,
                  actor: str) -> BlockRecord:
        now = _now()
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(key_blocks).values(
                label=label, kind=kind, version=version, algorithm=algorithm, kcv=kcv,
                created=now, created_by=actor))
            self._event(conn, actor, "create-block", label, {"kcv": kcv.hex()})
        return BlockRecord(label, kind, version, algorithm, kcv, now, None)

    def blocks(self, kind: str | None = None) -> list[BlockRecord]:
        query = select(key_blocks).order_by(key_blocks.c.kind, key_blocks.c.version)
        if kind:
            query = query.where(key_blocks.c.kind == kind)
        with self.engine.connect() as conn:
            return [BlockRecord(r.label, r.kind, r.version, r.algorithm, r.kcv,
                                _aware(r.created), _aware(r.transferred))  # type: ignore[arg-type]
                    for r in conn.execute(query)]

    def block(self, label: str) -> BlockRecord:
        for record in self.blocks():
            if record.label == label:
                return record
        raise NotFound(f"no key block {label!r} (see 'cms keys list')")

    def next_version(self, kind: str, at_least: int = 1) -> int:
        with self.engine.connect() as conn:
            versions = [r.version for r in conn.execute(
                select(key_blocks.c.version).where(key_blocks.c.kind == kind))]
        return max([at_least - 1, *versions]) + 1

    def mark_transferred(self, label: str, transport: str, actor: str, kcv: bytes) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(key_blocks).where(key_blocks.c.label == label).values(
                transferred=_now(), transferred_under=transport))
            self._event(conn, actor, "transfer", label,
                        {"transport": transport, "kcv_hsm1": kcv.hex()})

    # -- ceremonies ---------------------------------------------------------------
    def add_ceremony(self, record: CeremonyRecord, actor: str) -> None:
        now = _now()
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(ceremonies).values(
                ceremony_id=record.ceremony_id, label=record.label, purpose=record.purpose,
                algorithm=record.algorithm, tokens=json.dumps(record.tokens),
                needed=record.needed, custodians=json.dumps(record.custodians),
                state=record.state, proxy_handle=record.proxy_handle, kcvs="{}",
                started_by=actor, created=now, updated=now))
            self._event(conn, actor, "start-ceremony", record.label,
                        {"ceremony": record.ceremony_id, "components": record.needed,
                         "tokens": record.tokens})

    def ceremony(self, ceremony_id: str) -> CeremonyRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(ceremonies).where(
                ceremonies.c.ceremony_id == ceremony_id)).first()
        if row is None:
            raise NotFound(f"no ceremony {ceremony_id!r}")
        return CeremonyRecord(
            row.ceremony_id, row.label, row.purpose, row.algorithm, json.loads(row.tokens),
            row.needed, json.loads(row.custodians), row.state, row.proxy_handle,
            {t: bytes.fromhex(v) for t, v in json.loads(row.kcvs).items()})

    def update_ceremony(self, ceremony_id: str, *, actor: str, action: str,
                        custodians: list[str] | None = None, state: str | None = None,
                        kcvs: dict[str, bytes] | None = None, detail: dict | None = None) -> None:
        values: dict = {"updated": _now()}
        if custodians is not None:
            values["custodians"] = json.dumps(custodians)
        if state is not None:
            values["state"] = state
        if kcvs is not None:
            values["kcvs"] = json.dumps({t: v.hex() for t, v in kcvs.items()})
        with self._lock, self.engine.begin() as conn:
            conn.execute(update(ceremonies).where(
                ceremonies.c.ceremony_id == ceremony_id).values(**values))
            self._event(conn, actor, action, ceremony_id, detail or {})

    # -- transport keys -------------------------------------------------------------
    def add_transport(self, record: TransportRecord, actor: str) -> None:
        with self._lock, self.engine.begin() as conn:
            conn.execute(insert(transport_keys).values(
                label=record.label, method=record.method, kcv_hsm2=record.kcv_hsm2,
                kcv_hsm1=record.kcv_hsm1, created=_now()))
            self._event(conn, actor, "transport-key", record.label,
                        {"method": record.method, "kcv": record.kcv_hsm2.hex()})

    def transports(self) -> list[TransportRecord]:
        with self.engine.connect() as conn:
            return [TransportRecord(r.label, r.method, r.kcv_hsm2, r.kcv_hsm1)
                    for r in conn.execute(select(transport_keys).order_by(transport_keys.c.label))]

    # -- history --------------------------------------------------------------------
    def history(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [{"at": _aware(r.at), "actor": r.actor, "action": r.action,
                     "subject": r.subject, "detail": json.loads(r.detail)}
                    for r in conn.execute(select(events).order_by(events.c.id))]

    @staticmethod
    def _event(conn, actor: str, action: str, subject: str, detail: dict) -> None:
        conn.execute(insert(events).values(at=_now(), actor=actor, action=action,
                                           subject=subject, detail=json.dumps(detail)))
