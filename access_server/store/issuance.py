"""Users, their derivation elements, issuance records and bureau results (seed 004, B3-B4).

A user's derivation element is the BIP32 index the issuer HSM derives the
user private key from; two users with one element would hold one key. So it
comes from a counter row (``derivation_counter``), locked, read and bumped
in the transaction that adds the user: never MAX()+1 over the users, which
would hand out a removed user's element again.

An issuance runs in three transactions around the HSM calls:

1. ``begin_issuance``: the users are checked (known, not removed, no card in
   flight), cards are taken from stock first in, first out and a record per
   card is written (``preparing``), all or none.
2. ``complete_issuance``: what the HSMs returned (the device authentication
   key, its private half only wrapped under the issuer system KEK, and the
   user's public key) is stored and the records become ``issued``.
3. ``abandon_issuance`` instead, when an HSM call or a file signature
   failed: the records go and the cards return to stock.

Results from the bureau (``apply_results``) move each card to personalized,
or to quarantine when it failed, all rows or none. The mailing house's
dispatch confirmation (``apply_dispatch``) then records when each
personalized card's PIN letters went out, and its stock card is shipped: the
bureau sends only the cards its results call personalized, so the letters
and the card are on their way once both are in (docs/flows.md, claim 12).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, undefer

from access_server.store import records as r
from access_server.store.activations import expire_activations, online_issuance
from access_server.store.campaigns import chunks
from access_server.store.models import (
    ActivationRow,
    BureauRow,
    DerivationCounterRow,
    IssuanceRow,
    MailerRow,
    PartnerColumns,
    StockCardRow,
    StockPackRow,
    UserRow,
)
from access_server.store.stock import stock_card, take_cards
from access_server.store.transactions import Transactions
from cardcore.personalization import MAX_SEQUENCE
from cms.runtime.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound

USER_COUNTER = "user"
MAX_ELEMENT = 2**31 - 1
"""Hardened BIP32 indices are 0..2^31-1 (the HSM adds 2^31)."""
FIRST_SEQUENCE = 1
IN_FLIGHT = [s.value for s in r.IN_FLIGHT]


def user_record(row: UserRow) -> r.UserRecord:
    return r.UserRecord(row.user_id, row.name, row.address, row.email, row.derivation_element,
                        row.created, row.created_by, row.removed)


def issuance_record(row: IssuanceRow) -> r.IssuanceRecord:
    return r.IssuanceRecord(row.serial, row.user_id, row.derivation_element,
                            bytes.fromhex(row.issuance_id), row.batch, row.sequence,
                            r.IssuanceState(row.state), row.hsm_pins,
                            row.device_auth_public_key, row.user_public_key, row.reason,
                            row.updated)


def bureau_record(row: PartnerColumns) -> r.BureauRecord:
    return r.BureauRecord(row.fingerprint, row.name, row.certificate, row.subject,
                          row.not_after, row.trusted_at, row.trusted_by)


def next_element(session: Session) -> int:
    """Take the next derivation element from the counter row (locked until commit)."""
    counter = session.scalars(select(DerivationCounterRow)
                              .where(DerivationCounterRow.name == USER_COUNTER)
                              .with_for_update()).one()
    element = counter.next_element
    if element > MAX_ELEMENT:
        raise FailedPrecondition("every derivation element has been handed out")
    counter.next_element = element + 1
    return element


def _in_flight(session: Session, user_ids: Sequence[int]) -> dict[int, str]:
    """Users among ``user_ids`` with a card in flight: user id -> that card's serial."""
    found: dict[int, str] = {}
    for chunk in chunks(list(user_ids)):
        found.update((user_id, serial) for user_id, serial in session.execute(
            select(IssuanceRow.user_id, IssuanceRow.serial).where(
                IssuanceRow.user_id.in_(chunk), IssuanceRow.state.in_(IN_FLIGHT))))
    return found


def _users_for_issuance(session: Session, user_ids: Sequence[int]) -> list[UserRow]:
    """The users in the order given; FailedPrecondition/NotFound naming the first in the way."""
    seen: set[int] = set()
    for user_id in user_ids:
        if user_id in seen:
            raise InvalidArgument(f"user {user_id} is listed twice")
        seen.add(user_id)
    rows: dict[int, UserRow] = {}
    for chunk in chunks(list(user_ids)):
        rows.update((u.user_id, u) for u in session.scalars(
            select(UserRow).where(UserRow.user_id.in_(chunk)).with_for_update()))
    for user_id in user_ids:
        row = rows.get(user_id)
        if row is None or row.removed is not None:
            raise NotFound(f"no user {user_id}")
    flying = _in_flight(session, user_ids)
    if flying:
        user_id = next(u for u in user_ids if u in flying)
        raise FailedPrecondition(f"user {user_id} already has card {flying[user_id]} in "
                                 "flight (issued, no result from the bureau yet)")
    return [rows[u] for u in user_ids]


def _locked_rows(session: Session, issuance_id: bytes, serials: Sequence[str]
                 ) -> dict[str, IssuanceRow]:
    """The issuance records of ``serials``, locked for update, each of issuance
    ``issuance_id``: FailedPrecondition naming the first row that is not."""
    rows: dict[str, IssuanceRow] = {}
    for chunk in chunks(list(serials)):
        rows.update((i.serial, i) for i in session.scalars(
            select(IssuanceRow).where(IssuanceRow.serial.in_(chunk)).with_for_update()))
    for number, serial in enumerate(serials, start=1):
        row = rows.get(serial)
        if row is None:
            raise FailedPrecondition(f"row {number}: card {serial} was not issued")
        if row.issuance_id != issuance_id.hex():
            raise FailedPrecondition(f"row {number}: card {serial} is not in this "
                                     "personalization file")
    return rows


class Issuance(Transactions):
    """The store's users, issuance and bureau operations."""

    def add_user(self, name: str, address: str, email: str | None,
                 actor: str) -> r.UserRecord:
        with self._write() as session:
            row = UserRow(name=name, address=address, email=email,
                          derivation_element=next_element(session), created=self._now(),
                          created_by=actor, removed=None)
            session.add(row)
            session.flush()
            return user_record(row)

    def get_user(self, user_id: int) -> r.UserRecord:
        with self._read() as session:
            row = session.get(UserRow, user_id)
            if row is None or row.removed is not None:
                raise NotFound(f"no user {user_id}")
            return user_record(row)

    def list_users(self) -> list[r.UserRecord]:
        with self._read() as session:
            return [user_record(u) for u in session.scalars(
                select(UserRow).where(UserRow.removed.is_(None)).order_by(UserRow.user_id))]

    def remove_user(self, user_id: int) -> r.UserRecord:
        """Remove a user with no card in flight; one with past cards stays, marked removed,
        for their records. Their derivation element is never handed out again."""
        with self._write() as session:
            row = session.get(UserRow, user_id, with_for_update=True)
            if row is None or row.removed is not None:
                raise NotFound(f"no user {user_id}")
            flying = _in_flight(session, [user_id])
            if flying:
                raise FailedPrecondition(f"user {user_id} has card {flying[user_id]} in "
                                         "flight; remove them once the bureau has answered")
            record = user_record(row)
            has_cards = session.scalar(select(func.count()).select_from(IssuanceRow)
                                       .where(IssuanceRow.user_id == user_id))
            if has_cards:
                row.removed = self._now()
            else:
                session.delete(row)
            return record

    def user_cards(self, user_id: int) -> list[r.IssuanceRecord]:
        with self._read() as session:
            return [issuance_record(i) for i in session.scalars(
                select(IssuanceRow).where(IssuanceRow.user_id == user_id)
                .order_by(IssuanceRow.created))]

    def begin_issuance(self, user_ids: Sequence[int], *, batch: str, issuance_id: bytes,
                       hsm_pins: bool, actor: str) -> list[r.PreparedCard]:
        """Take one card per user from stock (FIFO) and record who gets it; all or none."""
        with self._write() as session:
            now = self._now()
            expire_activations(session, user_ids, now)   # an expired code holds no card
            users = _users_for_issuance(session, user_ids)
            cards = take_cards(session, len(users), f"issuance {issuance_id.hex()}", now,
                               postgres=self._postgres)
            session.add_all(IssuanceRow(
                serial=card.serial, user_id=user.user_id,
                derivation_element=user.derivation_element, issuance_id=issuance_id.hex(),
                batch=batch, sequence=FIRST_SEQUENCE, state=r.IssuanceState.PREPARING.value,
                hsm_pins=hsm_pins, created=now, updated=now, created_by=actor)
                for card, user in zip(cards, users, strict=True))
            return [r.PreparedCard(card, user_record(user), issuance_id, FIRST_SEQUENCE)
                    for card, user in zip(cards, users, strict=True)]

    def complete_issuance(self, issuance_id: bytes, issued: Sequence[r.IssuedCard],
                          activations: Sequence[r.NewActivation] = ()) -> None:
        """Store what the HSMs returned; every preparing card of the issuance, exactly.

        An online issuance's ``activations`` (its code's hash and its payload) go in the
        same transaction: a code is never shown for a card whose issuance is not recorded.
        """
        with self._write() as session:
            rows = {i.serial: i for i in session.scalars(select(IssuanceRow).where(
                IssuanceRow.issuance_id == issuance_id.hex(),
                IssuanceRow.state == r.IssuanceState.PREPARING.value))}
            if set(rows) != {c.serial for c in issued} or len(issued) != len(rows):
                raise FailedPrecondition("the issued cards are not the issuance's")
            now = self._now()
            for card in issued:
                row = rows[card.serial]
                row.device_auth_public_key = card.device_auth_public_key
                row.device_auth_wrapped_key = card.device_auth_wrapped_key
                row.device_auth_kek_version = card.device_auth_kek_version
                row.user_public_key = card.user_public_key
                row.state = r.IssuanceState.ISSUED.value
                row.updated = now
            session.flush()
            session.add_all(ActivationRow(
                serial=a.serial, issuance_id=issuance_id.hex(), code_salt=a.code_salt,
                code_hash=a.code_hash, payload=a.payload, expires=a.expires, failures=0,
                state=r.ActivationState.WAITING.value, created=now, updated=now,
                created_by=rows[a.serial].created_by) for a in activations)

    def abandon_issuance(self, issuance_id: bytes) -> int:
        """Drop a preparing issuance: its records go, its cards return to stock."""
        with self._write() as session:
            serials = list(session.scalars(select(IssuanceRow.serial).where(
                IssuanceRow.issuance_id == issuance_id.hex(),
                IssuanceRow.state == r.IssuanceState.PREPARING.value)))
            for chunk in chunks(serials):
                session.execute(delete(IssuanceRow).where(IssuanceRow.serial.in_(chunk)))
                session.execute(update(StockCardRow).where(StockCardRow.serial.in_(chunk))
                                .values(state=r.StockState.IN_STOCK.value, reserved_by=None,
                                        updated=self._now()))
            return len(serials)

    def prepare_reissue(self, issuance_id: bytes, new_id: bytes
                        ) -> tuple[list[r.PreparedCard], list[bytes], bool]:
        """The cards of an issuance still at the bureau, each with its next sequence and
        the new issuance id, in stock order; their device authentication public keys; and
        whether the HSM made their PIN and PUK. Nothing changes until
        ``complete_reissue``."""
        with self._read() as session:
            rows = session.execute(
                select(IssuanceRow, StockCardRow, StockPackRow.pack_serial, UserRow)
                .join(StockCardRow, StockCardRow.serial == IssuanceRow.serial)
                .join(StockPackRow, StockPackRow.pack_id == StockCardRow.pack_id)
                .join(UserRow, UserRow.user_id == IssuanceRow.user_id)
                .where(IssuanceRow.issuance_id == issuance_id.hex(),
                       IssuanceRow.state == r.IssuanceState.ISSUED.value)
                .order_by(StockCardRow.pack_id, StockCardRow.position)
                .options(undefer("*"))).all()
            if not rows:
                raise FailedPrecondition(f"no card of issuance {issuance_id.hex()} is at the "
                                         "bureau")
            if online_issuance(session, issuance_id):
                raise FailedPrecondition(f"issuance {issuance_id.hex()} was made online: its "
                                         "payload waits behind the user's activation code, "
                                         "not at a bureau")
            if max(i.sequence for i, *_ in rows) >= MAX_SEQUENCE:
                raise FailedPrecondition("a card of this issuance has no sequence left")
            cards = [r.PreparedCard(stock_card(card, pack_serial), user_record(user), new_id,
                                    issuance.sequence + 1)
                     for issuance, card, pack_serial, user in rows]
            keys = [issuance.device_auth_public_key for issuance, *_ in rows]
            return cards, keys, any(issuance.hsm_pins for issuance, *_ in rows)

    def complete_reissue(self, issuance_id: bytes, batch: str,
                         cards: Sequence[r.PreparedCard], hsm_pins: bool) -> None:
        """Record the new payloads' issuance id and sequences; Aborted if any card moved
        on meanwhile (a result came, or another reissue)."""
        with self._write() as session:
            wanted = {c.card.serial: c for c in cards}
            rows: list[IssuanceRow] = []
            for chunk in chunks(list(wanted)):
                rows.extend(session.scalars(select(IssuanceRow).where(
                    IssuanceRow.serial.in_(chunk), IssuanceRow.issuance_id == issuance_id.hex(),
                    IssuanceRow.state == r.IssuanceState.ISSUED.value).with_for_update()))
            if len(rows) != len(wanted) or any(
                    row.sequence + 1 != wanted[row.serial].sequence for row in rows):
                raise Aborted("a card of this issuance changed meanwhile; nothing was "
                              "recorded: run it again")
            now = self._now()
            for row in rows:
                row.issuance_id = wanted[row.serial].issuance_id.hex()
                row.sequence = wanted[row.serial].sequence
                row.batch = batch
                row.hsm_pins = hsm_pins
                row.updated = now

    def issuance_counts(self) -> dict[r.IssuanceState, int]:
        """Cards per issuance state: preparing, issued (at the bureau), personalized, failed."""
        with self._read() as session:
            counts = dict.fromkeys(r.IssuanceState, 0)
            for state, count in session.execute(select(IssuanceRow.state, func.count())
                                                .group_by(IssuanceRow.state)):
                counts[r.IssuanceState(state)] = count
            return counts

    def issuance_records(self, serials: Sequence[str]) -> dict[str, r.IssuanceRecord]:
        with self._read() as session:
            found: dict[str, r.IssuanceRecord] = {}
            for chunk in chunks(list(serials)):
                found.update((i.serial, issuance_record(i)) for i in session.scalars(
                    select(IssuanceRow).where(IssuanceRow.serial.in_(chunk))))
            return found

    def card_auth_keys(self, serial: str) -> r.CardAuthKeys:
        """The card's keys for mutual authentication; NotFound for a serial not in stock."""
        with self._read() as session:
            found = session.execute(
                select(StockCardRow.issuer_auth_public_key, IssuanceRow)
                .outerjoin(IssuanceRow, IssuanceRow.serial == StockCardRow.serial)
                .where(StockCardRow.serial == serial)
                .options(undefer(IssuanceRow.device_auth_wrapped_key))).one_or_none()
            if found is None:
                raise NotFound(f"no card {serial} in the issuer's stock")
            public, issuance = found
            if issuance is None:
                return r.CardAuthKeys(serial, None, public, None, None, None)
            return r.CardAuthKeys(serial, r.IssuanceState(issuance.state), public,
                                  issuance.device_auth_public_key,
                                  issuance.device_auth_wrapped_key,
                                  issuance.device_auth_kek_version)

    def apply_results(self, issuance_id: bytes, results: Sequence[r.CardResult]) -> None:
        """A bureau's results for the cards of one issuance, all rows or none.

        Each card must be one of that issuance's and still issued (in flight at the
        bureau): FailedPrecondition naming the first row that is not.
        """
        with self._write() as session:
            rows = _locked_rows(session, issuance_id, [c.serial for c in results])
            for number, result in enumerate(results, start=1):
                row = rows[result.serial]
                if row.state != r.IssuanceState.ISSUED.value:
                    raise FailedPrecondition(f"row {number}: card {result.serial} is already "
                                             f"{row.state}")
            now = self._now()
            for result in results:
                row = rows[result.serial]
                row.state = (r.IssuanceState.PERSONALIZED if result.personalized
                             else r.IssuanceState.FAILED).value
                row.reason = result.reason or None
                row.updated = now
            for personalized in (True, False):
                state = r.StockState.PERSONALIZED if personalized else r.StockState.QUARANTINED
                done = [c.serial for c in results if c.personalized is personalized]
                for chunk in chunks(done):
                    session.execute(update(StockCardRow).where(StockCardRow.serial.in_(chunk))
                                    .values(state=state.value, updated=now))

    def apply_dispatch(self, issuance_id: bytes, cards: Sequence[r.CardDispatched]) -> None:
        """A mailing house's dispatch confirmation for cards of one issuance, all rows or none.

        Each card must be one of that issuance's, personalized (the bureau's result is
        in) and not dispatched before: FailedPrecondition naming the first row that is not.
        Its stock card becomes shipped.
        """
        with self._write() as session:
            rows = _locked_rows(session, issuance_id, [c.serial for c in cards])
            for number, card in enumerate(cards, start=1):
                row = rows[card.serial]
                if row.dispatched is not None:
                    raise FailedPrecondition(f"row {number}: card {card.serial}'s letters "
                                             "were dispatched already")
                if row.state != r.IssuanceState.PERSONALIZED.value:
                    raise FailedPrecondition(
                        f"row {number}: card {card.serial} is {row.state}, not personalized: "
                        "import the bureau's results first (cms issue results)")
            now = self._now()
            for card in cards:
                rows[card.serial].dispatched = card.dispatched_at
                rows[card.serial].updated = now
            for chunk in chunks([c.serial for c in cards]):
                session.execute(update(StockCardRow).where(StockCardRow.serial.in_(chunk))
                                .values(state=r.StockState.SHIPPED.value, updated=now))

    def trust_bureau(self, record: r.BureauRecord) -> tuple[r.BureauRecord, bool]:
        """Record a bureau's certificate; (record, newly added)."""
        return self._trust(BureauRow, record)

    def trust_mailer(self, record: r.BureauRecord) -> tuple[r.BureauRecord, bool]:
        """Record a mailing house's certificate; (record, newly added)."""
        return self._trust(MailerRow, record)

    def _trust(self, table: type[BureauRow] | type[MailerRow], record: r.BureauRecord
               ) -> tuple[r.BureauRecord, bool]:
        with self._write() as session:
            existing = session.get(table, record.fingerprint)
            if existing is not None:
                return bureau_record(existing), False
            row = table(fingerprint=record.fingerprint, name=record.name,
                        certificate=record.certificate, subject=record.subject,
                        not_after=record.not_after, trusted_at=self._now(),
                        trusted_by=record.trusted_by)
            session.add(row)
            session.flush()
            return bureau_record(row), True

    def list_bureaus(self) -> list[r.BureauRecord]:
        return self._partners(BureauRow)

    def list_mailers(self) -> list[r.BureauRecord]:
        return self._partners(MailerRow)

    def _partners(self, table: type[BureauRow] | type[MailerRow]) -> list[r.BureauRecord]:
        with self._read() as session:
            return [bureau_record(b) for b in session.scalars(
                select(table).order_by(table.name, table.trusted_at))]
