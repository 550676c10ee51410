"""One card at the bureau: matched to its row, personalized, its PIN set, its answer checked.

The host's sequence is cardcore's (docs/issuance-applet.md, "the host's
sequences"): SELECT; GET DATA DF00 (the serial to match the file, the life
cycle, the device key); PERSONALIZE with the card's payload; when the
bureau makes PIN and PUK, GET CHALLENGE and SET PIN with the block its HSM
sealed; then the checks the bureau can make without the PIN: GET DATA DF01
says ``personalized``, and AUTHENTICATE answers a fresh challenge with a
signature that verifies with the card's issuer authentication certificate
(DF07). The user key is behind the PIN (SIGN), which the bureau never has.

Every step is journaled before the command it announces; a card pulled or
a reader gone midway raises ``CardGone`` and leaves the card at its step,
and the batch sends it the same commands again when it is presented next.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import NamedTuple, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bureau.journal import Journal, Step
from cardcore import gp
from cardcore import issuance as I
from cardcore.apdu import ApduError, parse_response
from cardcore.issuance_keys import rsa_spki
from cardcore.personalization import card_auth_statement
from cardcore.sw import SW
from cms.perso_format import PersoRow, PinMaker

Transmit = Callable[[bytes], bytes]
AUTH_CHALLENGE_LENGTH = 32


class CardGone(Exception):
    """The card, its reader or its agent went away; the card stays at its journaled step."""


class Result(StrEnum):
    PERSONALIZED = "personalized"
    DONE_BEFORE = "already personalized in this batch"
    FAILED = "failed"
    UNKNOWN = "not in the file"


class Outcome(NamedTuple):
    name: str
    result: Result
    serial: str = ""
    reason: str = ""


class CodeSealer(Protocol):
    """The bureau's HSM: one card's PIN and PUK as its SET PIN command and mailer data."""

    def seal(self, serial: str, device_spki: bytes, challenge: bytes) -> tuple[bytes, bytes]: ...


class BatchView(NamedTuple):
    """What a card needs of the batch: its rows by serial and who makes PIN and PUK."""

    rows: Mapping[str, PersoRow]
    pin_maker: PinMaker


class _Refused(Exception):
    """The card refused a step: it fails, with this reason."""


def _send(transmit: Transmit, apdu: bytes) -> tuple[bytes, int]:
    try:
        return parse_response(transmit(apdu))
    except ApduError as exc:
        raise _Refused(f"malformed answer ({exc})") from None


def _card_data(transmit: Transmit) -> I.CardData:
    if _send(transmit, gp.select_command(I.ISSUANCE_AID))[1] != SW.OK:
        raise _Refused("the issuance applet does not answer SELECT")
    data, sw = _send(transmit, I.get_data(I.Tag.ALL))
    if sw != SW.OK:
        raise _Refused(f"GET DATA DF00 answered {sw:04X}")
    try:
        return I.decode_card_data(data)
    except I.IssuanceError as exc:
        raise _Refused(str(exc)) from None


def _personalize(transmit: Transmit, card: I.CardData, row: PersoRow) -> None:
    sw = _send(transmit, I.personalize(row.payload))[1]
    answer = I.personalize_answer(sw)
    if answer.done:
        return
    if sw == SW.CONDITIONS_NOT_SATISFIED and card.life_cycle == I.LifeCycle.PERSONALIZED:
        raise _Refused("personalized by another payload")
    raise _Refused(f"PERSONALIZE refused ({sw:04X}): {answer.reason}")


def _set_pin(transmit: Transmit, card: I.CardData, row: PersoRow, sealer: CodeSealer,
             journal: Journal) -> None:
    assert card.device_public_key is not None  # an initialized card has it
    challenge, sw = _send(transmit, I.get_challenge())
    if sw != SW.OK:
        raise _Refused(f"GET CHALLENGE answered {sw:04X}")
    set_pin, mailer_data = sealer.seal(row.serial, rsa_spki(card.device_public_key), challenge)
    journal.record(row.serial, Step.CODES_SEALED, mailer_data=mailer_data)
    sw = _send(transmit, set_pin)[1]
    # 6985: the card holds a PIN already, set by an earlier run of this batch; the codes
    # are derived per file and card, so they are the ones in the mailer data.
    if sw not in (SW.OK, SW.CONDITIONS_NOT_SATISFIED):
        raise _Refused(f"SET PIN refused ({sw:04X})")


def _auth_key(card: I.CardData) -> ec.EllipticCurvePublicKey:
    try:
        key = x509.load_der_x509_certificate(card.issuer_auth_certificate or b"").public_key()
    except ValueError:
        raise _Refused("no readable issuer authentication certificate (DF07)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise _Refused("the issuer authentication certificate holds no EC key")
    return key


def check_answer(transmit: Transmit, card: I.CardData, serial: str) -> None:
    """What the bureau can check of a personalized card without its PIN."""
    data, sw = _send(transmit, I.get_data(I.Tag.LIFE_CYCLE))
    if sw != SW.OK or data[-1:] != bytes([I.LifeCycle.PERSONALIZED]):
        raise _Refused(f"life cycle after personalization is {data.hex() or sw}, not 07")
    challenge = os.urandom(AUTH_CHALLENGE_LENGTH)
    signature, sw = _send(transmit, I.authenticate(challenge))
    if sw != SW.OK:
        raise _Refused(f"AUTHENTICATE answered {sw:04X}")
    try:
        _auth_key(card).verify(signature, card_auth_statement(serial, challenge),
                               ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise _Refused("AUTHENTICATE's signature does not verify with the card's issuer "
                       "authentication certificate") from None


def _match(card: I.CardData, batch: BatchView) -> PersoRow | None:
    return batch.rows.get(card.serial) if card.serial else None


def personalize_card(name: str, transmit: Transmit, batch: BatchView, journal: Journal,
                     sealer: CodeSealer) -> Outcome:
    """One presented card through the bureau's sequence; CardGone when it went away."""
    try:
        card = _card_data(transmit)
    except _Refused as exc:
        return Outcome(name, Result.UNKNOWN, reason=str(exc))
    row = _match(card, batch)
    if row is None:
        return Outcome(name, Result.UNKNOWN, card.serial or "",
                       f"serial {card.serial or '(none)'} is not in the personalization file; "
                       "the card is left alone")
    entry = journal.card(row.serial)
    if entry is not None and entry.step == Step.DONE:
        return Outcome(name, Result.DONE_BEFORE, row.serial)
    if entry is not None and entry.step == Step.FAILED:
        return Outcome(name, Result.FAILED, row.serial, entry.reason)
    if entry is None:
        journal.record(row.serial, Step.STARTED)
    try:
        _personalize(transmit, card, row)
        journal.record(row.serial, Step.PERSONALIZED)
        if batch.pin_maker is PinMaker.BUREAU:
            _set_pin(transmit, card, row, sealer, journal)
            journal.record(row.serial, Step.PIN_SET)
        check_answer(transmit, card, row.serial)
    except _Refused as exc:
        journal.record(row.serial, Step.FAILED, reason=str(exc))
        return Outcome(name, Result.FAILED, row.serial, str(exc))
    journal.record(row.serial, Step.DONE)
    return Outcome(name, Result.PERSONALIZED, row.serial)
