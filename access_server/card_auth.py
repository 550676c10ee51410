"""Mutual authentication of the issuer and a personalized card (claims 13 and 14).

AUTHENTICATE (the card to the issuer) takes two calls: the issuer hands out a
fresh challenge, the card signs ``card_auth_statement(serial, challenge)``
with its private issuer authentication key and the issuer checks it with the
public key of the card's stock record, which the provider certified. A
challenge is kept here, in the access server's memory, for one check of one
card until it expires: a replayed answer, or an answer to another card's
challenge, finds none. Behind several access servers a contact must keep to
one (as the card channel does); a restart forgets the open challenges, which
costs only a new one.

VERIFY ISSUER (the issuer to the card) needs no state here: the card made the
challenge, and the issuer system HSM signs the statement over it with the
card's device authentication key, whose private half the access server holds
only wrapped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from access_server.store import CardAuthKeys, IssuanceState
from cardcore import personalization as perso
from cms.runtime.errors import FailedPrecondition, PermissionDenied, ResourceExhausted

CHALLENGE_LENGTH: Final = 32
CHALLENGE_TTL: Final = timedelta(minutes=2)
"""Long enough for a card agent to relay AUTHENTICATE over a slow link."""
MAX_OPEN: Final = 10_000
"""Open challenges at once; beyond it new ones are refused, not old ones dropped."""
MAX_SIGNATURE: Final = 80
"""A DER ECDSA P-256 signature is at most 72 bytes."""


class Challenge(NamedTuple):
    serial: str
    challenge: bytes
    expires: datetime


class Challenges:
    """Open AUTHENTICATE challenges by id: each taken once, for its card, before it
    expires."""

    def __init__(self, clock: Callable[[], datetime], ttl: timedelta = CHALLENGE_TTL,
                 limit: int = MAX_OPEN) -> None:
        self._clock = clock
        self._ttl = ttl
        self._limit = limit
        self._open: dict[str, Challenge] = {}
        self._lock = threading.Lock()

    def issue(self, serial: str) -> tuple[str, Challenge]:
        now = self._clock()
        made = Challenge(serial, os.urandom(CHALLENGE_LENGTH), now + self._ttl)
        challenge_id = os.urandom(16).hex()
        with self._lock:
            if len(self._open) >= self._limit:
                self._open = {k: c for k, c in self._open.items() if c.expires > now}
            if len(self._open) >= self._limit:
                raise ResourceExhausted("too many card authentications open: try again "
                                        "later")
            self._open[challenge_id] = made
        return challenge_id, made

    def take(self, challenge_id: str, serial: str) -> bytes:
        """The challenge, removed: whatever the answer, it serves no second check."""
        with self._lock:
            found = self._open.pop(challenge_id, None)
        if found is None or found.serial != serial or found.expires <= self._clock():
            raise FailedPrecondition(f"challenge {challenge_id!r} for card {serial}: unknown, "
                                     "used or expired; begin a new authentication")
        return found.challenge


def personalized(keys: CardAuthKeys) -> CardAuthKeys:
    """Only a card this issuer issued and the bureau personalized authenticates."""
    if keys.state is not IssuanceState.PERSONALIZED:
        where = "was never issued by this issuer" if keys.state is None else \
            f"is {keys.state.value}"
        raise FailedPrecondition(f"card {keys.serial} is not personalized: it {where}")
    return keys


def verify_card(keys: CardAuthKeys, challenge: bytes, signature: bytes) -> None:
    """The card's AUTHENTICATE answer against its issuer authentication public key."""
    public = serialization.load_der_public_key(keys.issuer_auth_public_key)
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise FailedPrecondition(f"card {keys.serial}: no EC issuer authentication key")
    try:
        public.verify(signature, perso.card_auth_statement(keys.serial, challenge),
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PermissionDenied(f"card {keys.serial}: the signature does not verify with "
                               "the card's issuer authentication key") from None
