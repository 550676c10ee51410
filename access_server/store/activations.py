"""Online issuance's activations: the payload behind a one-time code (seed 004, user PC).

One row per card issued online, written with the issuance's other records
(``Issuance.complete_issuance``). A contact from the user's PC finds it by
the serial the card reports (``activation_for``), then, in order, one
transaction each:

- ``code_failed``: a wrong code counts against the activation; the last try
  it allows locks it for good;
- ``activation_sent``: the right code, just before the payload goes to the
  card: the code is used up from here, whatever the card answers;
- ``activation_done``: the card holds the payload (``9000``, or ``6A89`` on
  a retry after a lost answer): the card is personalized in the issuer's
  records and the stock; or the card refused it with its status word: the
  issuance failed, and the card goes to quarantine as a bureau's failed card
  does.

An activation that can no longer be used (locked by its last wrong code, or
expired unused: ``activation_expired``, and ``expire_activations`` when the
issuer issues the user anew) closes its issuance the same way, failed and
quarantined: the card is out with the user, unpersonalized, and the user is
no longer held as having a card in flight, so the issuer can issue anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from access_server.activation import MAX_TRIES
from access_server.store import records as r
from access_server.store.campaigns import chunks
from access_server.store.models import ActivationRow, IssuanceRow, StockCardRow
from access_server.store.transactions import Transactions
from cms.runtime.errors import Aborted, NotFound

S = r.ActivationState


def _row(session: Session, serial: str, states: tuple[S, ...]) -> ActivationRow:
    row = session.get(ActivationRow, serial, with_for_update=True)
    if row is None:
        raise NotFound(f"card {serial} has no activation")
    if S(row.state) not in states:
        raise Aborted(f"card {serial}'s activation is {row.state} now")
    return row


def close(session: Session, row: ActivationRow, state: S, reason: str,
          now: datetime) -> None:
    """End an activation, and its issuance with it: personalized, or failed and the card
    quarantined."""
    personalized = state is S.PERSONALIZED
    row.state = state.value
    row.reason = reason
    row.updated = now
    issuance = session.get(IssuanceRow, row.serial, with_for_update=True)
    assert issuance is not None  # the foreign key
    issuance.state = (r.IssuanceState.PERSONALIZED if personalized
                      else r.IssuanceState.FAILED).value
    issuance.reason = None if personalized else reason
    issuance.updated = now
    stock = r.StockState.PERSONALIZED if personalized else r.StockState.QUARANTINED
    session.execute(update(StockCardRow).where(StockCardRow.serial == row.serial)
                    .values(state=stock.value, updated=now))


def expire_activations(session: Session, user_ids: Sequence[int], now: datetime) -> None:
    """Close the unused activations of these users that expired (before their next
    issuance's in-flight check)."""
    for chunk in chunks(list(user_ids)):
        rows = session.scalars(
            select(ActivationRow).join(IssuanceRow, IssuanceRow.serial == ActivationRow.serial)
            .where(IssuanceRow.user_id.in_(chunk), ActivationRow.state == S.WAITING.value,
                   ActivationRow.expires <= now)
            .with_for_update(of=ActivationRow)).all()
        for row in rows:
            close(session, row, S.EXPIRED, "the activation code expired unused", now)


def online_issuance(session: Session, issuance_id: bytes) -> bool:
    """Whether the issuance was made online (its payloads wait behind activation codes)."""
    return session.scalar(select(ActivationRow.serial).where(
        ActivationRow.issuance_id == issuance_id.hex()).limit(1)) is not None


class Activations(Transactions):
    """The store's activation operations."""

    def activation_for(self, serial: str) -> r.ActivationRecord | None:
        with self._read() as session:
            found = session.execute(
                select(ActivationRow, ActivationRow.payload, StockCardRow.device_public_key)
                .join(StockCardRow, StockCardRow.serial == ActivationRow.serial)
                .where(ActivationRow.serial == serial)).one_or_none()
            if found is None:
                return None
            row, payload, device_key = found
            return r.ActivationRecord(row.serial, bytes.fromhex(row.issuance_id),
                                      row.code_salt, row.code_hash, payload, row.expires,
                                      row.failures, S(row.state), row.reason, device_key,
                                      self._now() >= row.expires)

    def code_failed(self, serial: str) -> int:
        """Count a wrong code against the waiting activation; the tries left (0: locked,
        and the issuance closed)."""
        with self._write() as session:
            row = _row(session, serial, (S.WAITING,))
            row.failures += 1
            row.updated = self._now()
            if row.failures >= MAX_TRIES:
                close(session, row, S.LOCKED, f"locked after {row.failures} wrong codes",
                      row.updated)
            return max(MAX_TRIES - row.failures, 0)

    def activation_expired(self, serial: str) -> None:
        """Close a waiting activation a contact found expired."""
        with self._write() as session:
            row = _row(session, serial, (S.WAITING,))
            close(session, row, S.EXPIRED, "the activation code expired unused", self._now())

    def activation_sent(self, serial: str) -> None:
        """The code is used up: its payload goes to the card now."""
        with self._write() as session:
            row = _row(session, serial, (S.WAITING, S.SENT))
            row.state = S.SENT.value
            row.updated = self._now()

    def activation_done(self, serial: str, personalized: bool, reason: str) -> None:
        """The card's answer to the payload: personalized, or failed (quarantined)."""
        with self._write() as session:
            row = _row(session, serial, (S.SENT,))
            close(session, row, S.PERSONALIZED if personalized else S.FAILED, reason,
                  self._now())
