"""Provider initialization of one card (seed 004, claims 1, 9, 10 and 11), card side.

:func:`initialize` is an I/O-free generator of what the provider system
sends the issuance applet and what it needs in between; it checks every
answer. Its driver (the provider system through the HSM proxy's CardKeys
channel, or a software host in tests: :func:`drive`) sends each
:class:`Script` and answers each :class:`CertificateRequest`:

1. probe, plain: SELECT the applet, GET DATA DF00 (an already initialized
   card is left as it is), INITIALIZE UPDATE with the transport keys (KVN FF);
2. the driver opens the channel at level 33 from that answer
   (:class:`ChannelOpening`: EXTERNAL AUTHENTICATE), then, secured: GENERATE
   KEYS, PUT DATA serial, PUT DATA public issuer key (unless the card already
   holds that key: a run cut short may have written it, and it is written once);
3. the driver has the provider root certify the two public keys;
4. secured: PUT DATA of both certificates, CERTIFY DEVICE KEY, ACTIVATE,
   GET DATA DF00;
5. the card's signature over :func:`~cardcore.issuance.device_key_statement`
   is verified with its public issuer authentication key.

A run cut anywhere leaves the card in ``factory`` (each command is atomic and
only ACTIVATE leaves it), so the provider runs it again from the start.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Generator, Sequence
from typing import Final, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import gp
from cardcore.issuance import (
    ISSUANCE_AID,
    PROVIDER_SECURITY_LEVEL,
    CardData,
    IssuanceError,
    LifeCycle,
    RsaPublic,
    Tag,
    activate,
    certify_device_key,
    check_serial,
    decode_card_data,
    decode_ec_public,
    decode_generated_keys,
    device_key_statement,
    encode_ec_public,
    generate_keys,
    get_data,
    put_data,
)
from cardcore.issuance_keys import check_device_key_shape
from cardcore.psd import ISD_AID, Kvn
from cardcore.sw import SW

HOST_CHALLENGE_LENGTH: Final = 8

Answers = Sequence[tuple[bytes, int]]
"""The (data, status word) of each command of a script, in clear."""


class InitializationError(Exception):
    """The card refused a step or answered something that does not check."""

    def __init__(self, step: str, reason: str, sw: int | None = None) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.sw = step, sw


class ChannelOpening(NamedTuple):
    """Open the channel from the card's INITIALIZE UPDATE answer (EXTERNAL AUTHENTICATE)."""

    kvn: int
    security_level: int
    host_challenge: bytes
    initialize_update_response: bytes
    aid: bytes
    """The domain whose AID the card's pseudo-random challenge comes from: the ISD."""


class Script(NamedTuple):
    """Commands for the card, in clear; ``secured`` ones go through the open channel."""

    step: str
    commands: tuple[bytes, ...]
    secured: bool = False
    opening: ChannelOpening | None = None


class CertificateRequest(NamedTuple):
    """The provider root certifies the card's two public keys (claims 9, 11)."""

    serial: str
    device_public_key: RsaPublic
    issuer_auth_public_key: bytes


class Certificates(NamedTuple):
    device: bytes
    issuer_auth: bytes


class Initialized(NamedTuple):
    """The card's public data after the run; ``already`` when it was initialized before."""

    card: CardData
    already: bool


Flow = Generator[Script | CertificateRequest, Answers | Certificates, Initialized]


def _checked(step: str, answers: Answers | Certificates, count: int) -> Answers:
    if isinstance(answers, Certificates) or len(answers) != count:
        raise InitializationError(step, f"expected {count} answers")
    for _data, sw in answers:
        if sw != SW.OK:
            raise InitializationError(step, SW.describe(sw), sw)
    return answers


def verify_signed_device_key(card: CardData) -> None:
    """The card's ECDSA-SHA256 signature over its statement, by its issuer authentication key."""
    if card.serial is None or card.device_public_key is None or \
            card.issuer_auth_public_key is None or card.signed_device_key is None:
        raise InitializationError("signed device key", "the card lacks part of the statement")
    try:
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                              card.issuer_auth_public_key)
        public.verify(card.signed_device_key,
                      device_key_statement(card.serial, card.device_public_key),
                      ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature) as exc:
        raise InitializationError("signed device key", "signature does not verify") from exc


def initialize(serial: str, issuer_public_key: bytes, *,
               host_challenge: bytes | None = None) -> Flow:
    """Initialize the card in front of the driver with ``serial`` and the public issuer key."""
    check_serial(serial)
    issuer_key = decode_ec_public(encode_ec_public(issuer_public_key))
    challenge = host_challenge or secrets.token_bytes(HOST_CHALLENGE_LENGTH)
    probe = _checked("probe", (yield Script("probe", (
        gp.select_command(ISSUANCE_AID), get_data(Tag.ALL),
        gp.initialize_update_command(Kvn.TRANSPORT, challenge)))), 3)
    try:
        before = decode_card_data(probe[1][0])
    except IssuanceError as exc:
        raise InitializationError("probe", str(exc)) from exc
    if before.life_cycle is not LifeCycle.FACTORY:
        return Initialized(before, already=True)
    if before.issuer_public_key not in (None, issuer_key):
        raise InitializationError("probe", "the card holds another public issuer key")
    opening = ChannelOpening(Kvn.TRANSPORT, PROVIDER_SECURITY_LEVEL, challenge, probe[2][0],
                             ISD_AID)
    commands = [generate_keys(), put_data(Tag.SERIAL, serial.encode("ascii"))]
    if before.issuer_public_key is None:
        commands.append(put_data(Tag.ISSUER_PUBLIC_KEY, encode_ec_public(issuer_key)))
    keys_answers = _checked("generate keys", (yield Script(
        "generate keys", tuple(commands), secured=True, opening=opening)), len(commands))
    try:
        keys = decode_generated_keys(keys_answers[0][0])
        check_device_key_shape(keys.device_public_key)
    except IssuanceError as exc:
        raise InitializationError("generate keys", str(exc)) from exc
    certificates = yield CertificateRequest(serial, keys.device_public_key,
                                            keys.issuer_auth_public_key)
    if not isinstance(certificates, Certificates):
        raise InitializationError("certificates", "no certificates")
    final = _checked("activate", (yield Script("activate", (
        put_data(Tag.DEVICE_CERTIFICATE, certificates.device),
        put_data(Tag.ISSUER_AUTH_CERTIFICATE, certificates.issuer_auth),
        certify_device_key(), activate(), get_data(Tag.ALL)), secured=True)), 5)
    try:
        card = decode_card_data(final[4][0])
    except IssuanceError as exc:
        raise InitializationError("activate", str(exc)) from exc
    expected = CardData(LifeCycle.INITIALIZED, serial, keys.device_public_key,
                        keys.issuer_auth_public_key, issuer_key, certificates.device,
                        certificates.issuer_auth, final[2][0])
    if card != expected:
        raise InitializationError("activate", "the card's data differ from what was put")
    verify_signed_device_key(card)
    return Initialized(card, already=False)


def drive(flow: Flow, run: Callable[[Script], Answers],
          certify: Callable[[CertificateRequest], Certificates]) -> Initialized:
    """Run ``flow`` to its end: each script through ``run``, each request through ``certify``."""
    answer: Answers | Certificates | None = None
    try:
        while True:
            request = flow.send(answer)  # type: ignore[arg-type]
            answer = certify(request) if isinstance(request, CertificateRequest) \
                else run(request)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
