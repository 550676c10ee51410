"""The issuer's stock: trusted provider roots, imported packs, and their cards (seed 004, B2).

A pack is imported in one transaction: the checks that need the stock (pack
serial, card serials and device keys already there, shared primes with any
device key in stock) run inside it, after an import lock, so two imports at
once cannot both pass them; then the pack and all its cards are inserted in
batches. An error anywhere, or a crash, leaves no trace of the pack.

Cards leave the stock first in, first out: by pack import order, then by
their row in the pack (``reserve_cards``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.orm import Session, undefer

from access_server.packs import PackRefused, Refusal, Root, StockCard, VerifiedPack
from access_server.store import records as r
from access_server.store.campaigns import chunks
from access_server.store.models import ProviderRootRow, StockCardRow, StockPackRow
from access_server.store.transactions import Transactions
from cms.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument

IMPORT_LOCK_KEY = 0x434D5350
"""PostgreSQL advisory lock that serializes pack imports (SQLite has one writer anyway)."""
INSERT_BATCH = 1000
"""Cards per multi-row INSERT."""
MAX_RESERVE = 10_000

SharedPrimeCheck = Callable[[Sequence[StockCard], Sequence[tuple[str, bytes]]], None]
"""``packs.check_shared_primes``: the pack's cards, the stock's (serial, modulus) pairs."""


def _batches(values: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def provider_record(row: ProviderRootRow) -> r.ProviderRecord:
    return r.ProviderRecord(row.provider_id, row.fingerprint, row.certificate, row.subject,
                            row.not_after, row.trusted_at, row.trusted_by)


def pack_record(row: StockPackRow) -> r.PackRecord:
    return r.PackRecord(row.pack_id, row.pack_serial, row.file_sha256, row.file_name,
                        row.provider_id, row.root_fingerprint, row.card_count, row.created_at,
                        row.imported_at, row.imported_by)


def _first_in_stock(session: Session, column: Any, values: dict[str, int],
                    what: str) -> None:
    """Refuse the pack at the first row whose ``column`` value the stock already holds."""
    found: set[str] = set()
    for chunk in chunks(list(values)):
        found.update(session.scalars(select(column).where(column.in_(chunk))))
    if found:
        row = min(values[v] for v in found)
        raise PackRefused(Refusal.IN_STOCK, f"{what} is already in stock", row)


def _refuse_known(session: Session, pack: VerifiedPack) -> None:
    existing = session.scalars(select(StockPackRow).where(
        StockPackRow.pack_serial == pack.header.pack_serial)).one_or_none()
    if existing is not None:
        if existing.file_sha256 == pack.file_sha256:
            raise AlreadyExists(f"pack {existing.pack_serial} already imported "
                                f"({existing.imported_at:%Y-%m-%dT%H:%M:%SZ}, "
                                f"{existing.card_count} cards); nothing changed")
        raise PackRefused(Refusal.IN_STOCK, f"pack serial {existing.pack_serial} was already "
                          "imported with other contents", 0)
    _first_in_stock(session, StockCardRow.serial,
                    {c.serial: c.position for c in pack.cards}, "card serial")
    _first_in_stock(session, StockCardRow.device_key_sha256,
                    {c.device_key_sha256: c.position for c in pack.cards}, "device key")


def _card_values(card: StockCard, pack_id: int, now: datetime) -> dict[str, Any]:
    return {"serial": card.serial, "pack_id": pack_id, "position": card.position,
            "state": r.StockState.IN_STOCK.value, "device_key_sha256": card.device_key_sha256,
            "device_modulus": card.modulus, "device_public_key": card.device_public_key,
            "issuer_auth_public_key": card.issuer_auth_public_key,
            "device_certificate": card.device_certificate,
            "issuer_auth_certificate": card.issuer_auth_certificate,
            "signed_device_key": card.signed_device_key, "updated": now, "reserved_by": None}


class Stock(Transactions):
    """The store's stock operations."""

    def trust_root(self, root: Root, actor: str) -> tuple[r.ProviderRecord, bool]:
        """Record a provider root (checked by ``packs.check_root``); (record, newly added)."""
        with self._write() as session:
            existing = session.get(ProviderRootRow, root.fingerprint)
            if existing is not None:
                return provider_record(existing), False
            row = ProviderRootRow(fingerprint=root.fingerprint, provider_id=root.provider_id,
                                  certificate=root.certificate, subject=root.subject,
                                  not_after=root.not_after, trusted_at=self._now(),
                                  trusted_by=actor)
            session.add(row)
            session.flush()
            return provider_record(row), True

    def list_roots(self) -> list[r.ProviderRecord]:
        with self._read() as session:
            rows = session.scalars(select(ProviderRootRow).order_by(
                ProviderRootRow.provider_id, ProviderRootRow.trusted_at))
            return [provider_record(row) for row in rows]

    def import_pack(self, pack: VerifiedPack, *, file_name: str, actor: str,
                    check_shared_primes: SharedPrimeCheck) -> r.PackRecord:
        """Add a verified pack's cards to the stock, all or none.

        AlreadyExists for the very same pack again; ``packs.PackRefused`` (row
        and reason) for a pack serial, card serial or device key the stock
        holds, or a device key sharing a prime with one in stock.
        """
        with self._write() as session:
            if self._postgres:
                session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                {"key": IMPORT_LOCK_KEY})
            if session.get(ProviderRootRow, pack.root.fingerprint) is None:
                raise PackRefused(Refusal.UNKNOWN_ROOT, "the signing root is no longer trusted")
            _refuse_known(session, pack)
            stock = [(serial, bytes(modulus)) for serial, modulus in session.execute(
                select(StockCardRow.serial, StockCardRow.device_modulus))]
            check_shared_primes(pack.cards, stock)
            now = self._now()
            row = StockPackRow(pack_serial=pack.header.pack_serial,
                               file_sha256=pack.file_sha256, file_name=file_name[:255],
                               provider_id=pack.header.provider_id,
                               root_fingerprint=pack.root.fingerprint,
                               card_count=len(pack.cards), created_at=pack.header.created_at,
                               imported_at=now, imported_by=actor)
            session.add(row)
            session.flush()
            for batch in _batches(pack.cards, INSERT_BATCH):
                session.execute(insert(StockCardRow),
                                [_card_values(c, row.pack_id, now) for c in batch])
            return pack_record(row)

    def list_packs(self) -> list[r.PackRecord]:
        with self._read() as session:
            return [pack_record(row) for row in session.scalars(
                select(StockPackRow).order_by(StockPackRow.pack_id))]

    def stock_counts(self) -> list[r.PackStock]:
        """Cards per pack and state, packs in import order."""
        with self._read() as session:
            packs = session.execute(select(StockPackRow.pack_id, StockPackRow.pack_serial)
                                    .order_by(StockPackRow.pack_id)).all()
            counts: dict[int, dict[r.StockState, int]] = {
                pack_id: dict.fromkeys(r.StockState, 0) for pack_id, _ in packs}
            for pack_id, state, count in session.execute(
                    select(StockCardRow.pack_id, StockCardRow.state, func.count())
                    .group_by(StockCardRow.pack_id, StockCardRow.state)):
                counts[pack_id][r.StockState(state)] = count
            return [r.PackStock(serial, pack_id, counts[pack_id]) for pack_id, serial in packs]

    def reserve_cards(self, count: int, holder: str) -> list[r.StockCard]:
        """Take the next ``count`` cards in stock, first in, first out; all or none."""
        with self._write() as session:
            return take_cards(session, count, holder, self._now(), postgres=self._postgres)


def take_cards(session: Session, count: int, holder: str, now: datetime, *,
               postgres: bool) -> list[r.StockCard]:
    """``reserve_cards`` inside a caller's write transaction (issuance records the users
    it assigns in the same one)."""
    if not 0 < count <= MAX_RESERVE:
        raise InvalidArgument(f"cards to reserve: 1 to {MAX_RESERVE}, not {count}")
    query = (select(StockCardRow, StockPackRow.pack_serial)
             .join(StockPackRow, StockPackRow.pack_id == StockCardRow.pack_id)
             .where(StockCardRow.state == r.StockState.IN_STOCK.value)
             .order_by(StockCardRow.pack_id, StockCardRow.position).limit(count)
             .options(undefer("*")))
    if postgres:
        query = query.with_for_update(of=StockCardRow, skip_locked=True)
    taken = session.execute(query).all()
    if len(taken) < count:
        raise FailedPrecondition(f"{count} cards asked for, {len(taken)} in stock")
    serials = [card.serial for card, _ in taken]
    for chunk in chunks(serials):
        session.execute(update(StockCardRow).where(StockCardRow.serial.in_(chunk))
                        .values(state=r.StockState.RESERVED.value, reserved_by=holder,
                                updated=now))
    return [stock_card(card, pack_serial, r.StockState.RESERVED) for card, pack_serial in taken]


def stock_card(card: StockCardRow, pack_serial: str,
               state: r.StockState | None = None) -> r.StockCard:
    return r.StockCard(card.serial, pack_serial, card.position,
                       state or r.StockState(card.state), card.device_public_key,
                       card.issuer_auth_public_key, card.device_certificate,
                       card.issuer_auth_certificate, card.signed_device_key)
