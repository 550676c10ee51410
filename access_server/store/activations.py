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
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from access_server.activation import MAX_TRIES
from access_server.store import records as r
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
        """Count a wrong code against the waiting activation; the tries left (0: locked)."""
        with self._write() as session:
            row = _row(session, serial, (S.WAITING,))
            row.failures += 1
            row.updated = self._now()
            if row.failures >= MAX_TRIES:
                row.state = S.LOCKED.value
                row.reason = f"{row.failures} wrong codes"
            return max(MAX_TRIES - row.failures, 0)

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
            now = self._now()
            row.state = (S.PERSONALIZED if personalized else S.FAILED).value
            row.reason = reason
            row.updated = now
            issuance = session.get(IssuanceRow, serial, with_for_update=True)
            assert issuance is not None  # the foreign key
            issuance.state = (r.IssuanceState.PERSONALIZED if personalized
                              else r.IssuanceState.FAILED).value
            issuance.reason = None if personalized else reason
            issuance.updated = now
            stock = r.StockState.PERSONALIZED if personalized else r.StockState.QUARANTINED
            session.execute(update(StockCardRow).where(StockCardRow.serial == serial)
                            .values(state=stock.value, updated=now))
