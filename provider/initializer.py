"""One card's provider initialization (claims 1, 9, 10) through the HSM proxy.

The steps and their checks are :func:`cardcore.initialization.initialize`'s,
an I/O-free generator; this module is its driver on the provider's side.
The card is reached only through ``run``, a callable that sends a list of
APDUs to the card (in process, or through a card agent) and returns the
answers, so the same driver serves virtual cards and cards in readers. Card
keys never pass here: the proxy's CardKeys opens the level-33 channel with
the card's transport keys, diversified inside the HSM from the card
factory's transport master by the PSD id (as the access server does for
flow A1), wraps every secured command and unwraps every answer.

Before the generator runs, one plain script reads the PSD id (the ISD's
CPLC: the transport keys are diversified by it) and the applet's life
cycle: a card that is not factory-fresh is reported and left alone, and a
serial is allocated only for a card that will get it. After it, the
certificates the card holds are checked once more against the provider
root and the card's keys, and the card's public data becomes the pack row.

A card whose answer is wrong, or that loses power, fails with the reason and
is left out of the pack; the applet commits its initialization atomically, so
such a card is factory-fresh again and a later run initializes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from cardcore import gp
from cardcore import initialization as ini
from cardcore import issuance as iss
from cardcore.issuance_keys import ec_spki, rsa_spki
from cardcore.psd import ISD_AID, psd_id_bytes, psd_id_from_cplc
from cardcore.sw import SW
from cms.keynames import FACTORY_TRANSPORT_MASTER, HSM1_TOKEN
from cms.pack_format import PackRow
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import provider_pb2 as ppb

TRANSPORT_KEY_LENGTH = 16
"""Bytes of each transport key the card factory puts in (AES-128)."""
PROXY_TIMEOUT_S = 60.0

Answers = list[tuple[bytes, int]]
Run = Callable[[list[bytes]], Answers]
"""Send APDUs to the card; the answers, stopping after the first that is not 9000."""
IDENTIFY = ("SELECT ISD", "GET DATA CPLC", "SELECT issuance applet", "GET DATA DF00")


class CardFailed(Exception):
    """This card is left out of the pack, for this reason."""


class AlreadyInitialized(CardFailed):
    """The card is past ``factory``: it is reported and not touched."""


def transport_keys(psd_id: str) -> kpb.KeySetSpec:
    """The card's transport key set, diversified in the HSM from the factory's master."""
    return kpb.KeySetSpec(token=HSM1_TOKEN, key_length=TRANSPORT_KEY_LENGTH,
                          diversified=kpb.Diversified(master_label=FACTORY_TRANSPORT_MASTER,
                                                      element=psd_id_bytes(psd_id)))


def _command(apdu: bytes) -> kpb.ChannelCommand:
    return kpb.ChannelCommand(apdu=apdu, expect=[cpb.ExpectedStatus(value=SW.OK, mask=0xFFFF)])


def _proxy_failure(exc: grpc.RpcError, what: str) -> CardFailed:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return CardFailed(f"{what}: HSM proxy answered {code}: {details}")


def _all_ok(answers: Sequence[tuple[bytes, int]], count: int, what: str,
            names: Sequence[str] = ()) -> None:
    """``count`` answers, each 9000; else CardFailed naming the first command that failed."""
    for index, (_, sw) in enumerate(answers):
        if sw != SW.OK:
            name = names[index] if index < len(names) else f"command {index + 1}"
            raise CardFailed(f"{what}: {name} answered {SW.describe(sw)}")
    if len(answers) < count:
        raise CardFailed(f"{what}: the card gave {len(answers)} answers to {count} commands")


def public_keys(request: ini.CertificateRequest) -> ppb.CardPublicKeys:
    """What ProviderCa certifies for a card: its serial and its keys as SubjectPublicKeyInfo."""
    return ppb.CardPublicKeys(serial=request.serial,
                              device_public_key=rsa_spki(request.device_public_key),
                              issuer_auth_public_key=ec_spki(request.issuer_auth_public_key))


def _certificate_matches(der: bytes, root: x509.Certificate, spki: bytes, serial: str,
                         what: str) -> None:
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CardFailed(f"{what} is not issued by the provider root ({exc})") from None
    if cert.public_key().public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo) != spki:
        raise CardFailed(f"{what} does not carry the card's key")
    if serial not in cert.subject.rfc4514_string():
        raise CardFailed(f"{what} does not name card {serial}")


def pack_row(card: iss.CardData, root: x509.Certificate) -> PackRow:
    """The pack row of an initialized card whose certificates ``root`` issued for its keys."""
    if card.serial is None or card.device_public_key is None or \
            card.issuer_auth_public_key is None or card.device_certificate is None or \
            card.issuer_auth_certificate is None or card.signed_device_key is None:
        raise CardFailed("the card lacks a key, a certificate or its signed device key")
    device = rsa_spki(card.device_public_key)
    iak = ec_spki(card.issuer_auth_public_key)
    _certificate_matches(card.device_certificate, root, device, card.serial,
                         f"card {card.serial}: the device certificate")
    _certificate_matches(card.issuer_auth_certificate, root, iak, card.serial,
                         f"card {card.serial}: the issuer authentication certificate")
    return PackRow(card.serial, device, iak, card.device_certificate,
                   card.issuer_auth_certificate, card.signed_device_key)


class CardInitialization:
    """One card: :meth:`until_certificates`, then :meth:`finish` with its certificates.

    ``card_keys`` is the proxy's CardKeys stub (identity ``provider``);
    ``next_serial`` allocates the card's serial once the card is known to be
    factory-fresh, just before the serial goes to it.
    """

    def __init__(self, card_keys: Any, issuer_point: bytes,
                 next_serial: Callable[[], str]) -> None:
        self._stub = card_keys
        self._issuer_point = issuer_point
        self._next_serial = next_serial
        self._channel = ""
        self._flow: ini.Flow | None = None
        self.psd_id: str | None = None

    @property
    def what(self) -> str:
        return f"PSD {self.psd_id}" if self.psd_id else "card"

    def _identify(self, run: Run) -> None:
        answers = run([gp.select_command(ISD_AID), gp.get_data_command(gp.TAG_CPLC),
                       gp.select_command(iss.ISSUANCE_AID), iss.get_data(iss.Tag.ALL)])
        _all_ok(answers, len(IDENTIFY), "identify", IDENTIFY)
        try:
            self.psd_id = psd_id_from_cplc(gp.unwrap_get_data(gp.TAG_CPLC, answers[1][0]))
            state = iss.decode_card_data(answers[3][0])
        except (ValueError, gp.GpError) as exc:
            raise CardFailed(f"{self.what}: malformed answer ({exc})") from None
        if state.life_cycle is not iss.LifeCycle.FACTORY:
            raise AlreadyInitialized(f"{self.what} is already {state.life_cycle.name.lower()}"
                                     + (f" (serial {state.serial})" if state.serial else ""))

    def _unwrap(self, answers: Answers, close: bool) -> Answers:
        try:
            plain = self._stub.UnwrapResponses(kpb.UnwrapResponsesRequest(
                channel=self._channel, close=close,
                responses=[cpb.ApduResponse(data=d, sw=sw) for d, sw in answers]),
                timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._channel = ""
            raise _proxy_failure(exc, f"{self.what}: unwrapping the card's answers") from None
        if close:
            self._channel = ""
        return [(bytes(r.data), r.sw) for r in plain.responses]

    def _wrap(self, script: ini.Script) -> list[bytes]:
        commands = [_command(c) for c in script.commands]
        opening = script.opening
        assert self.psd_id is not None
        try:
            if opening is None:
                return [c.apdu for c in self._stub.WrapCommands(kpb.WrapCommandsRequest(
                    channel=self._channel, commands=commands),
                    timeout=PROXY_TIMEOUT_S).commands]
            opened = self._stub.OpenSecureChannel(kpb.OpenSecureChannelRequest(
                key_set=transport_keys(self.psd_id), kvn=opening.kvn,
                host_challenge=opening.host_challenge,
                initialize_update_response=opening.initialize_update_response,
                security_level=opening.security_level, aid=opening.aid, commands=commands),
                timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _proxy_failure(exc, f"{self.what}: {script.step}") from None
        self._channel = opened.channel
        return [c.apdu for c in opened.commands]

    def _run(self, script: ini.Script, run: Run) -> Answers:
        """The script's answers in clear; secured ones wrapped and unwrapped by the proxy."""
        if not script.secured:
            answers = run(list(script.commands))
            _all_ok(answers, len(script.commands), f"{self.what}: {script.step}")
            return answers
        wrapped = self._wrap(script)
        plain = self._unwrap(run(wrapped), close=False)
        _all_ok(plain, len(wrapped), f"{self.what}: {script.step}",
                ("EXTERNAL AUTHENTICATE",) if script.opening is not None else ())
        return plain[1:] if script.opening is not None else plain

    def _advance(self, reply: ini.Answers | ini.Certificates | None, run: Run
                 ) -> ini.CertificateRequest | ini.Initialized:
        assert self._flow is not None
        try:
            while True:
                step = self._flow.send(reply)  # type: ignore[arg-type]
                if isinstance(step, ini.CertificateRequest):
                    return step
                reply = self._run(step, run)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except ini.InitializationError as exc:
            raise CardFailed(f"{self.what}: {exc}") from None

    def until_certificates(self, run: Run) -> ppb.CardPublicKeys:
        """Identify the card, give it its serial and the issuer key, have it make its keys."""
        self._identify(run)
        serial = self._next_serial()
        self._flow = ini.initialize(serial, self._issuer_point)
        step = self._advance(None, run)
        if not isinstance(step, ini.CertificateRequest):
            raise AlreadyInitialized(f"{self.what} is already initialized")
        return public_keys(step)

    def finish(self, certificates: ppb.CardCertificates, run: Run,
               root: x509.Certificate) -> PackRow:
        """Store the certificates, have the card certify its device key and activate."""
        done = self._advance(ini.Certificates(certificates.device_certificate,
                                              certificates.issuer_auth_certificate), run)
        self.abandon()
        if not isinstance(done, ini.Initialized):
            raise CardFailed(f"{self.what}: asked for certificates twice")
        return pack_row(done.card, root)

    def abandon(self) -> None:
        """Release the channel in the proxy (a card done, or failed midway)."""
        if self._channel:
            try:
                self._unwrap([], close=True)
            except CardFailed:
                pass
