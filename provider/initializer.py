"""One card's provider initialization (claims 1, 9, 10), as APDU scripts and proxy calls.

The card is reached only through scripts: the caller runs each list of
commands on the card (in process, or through a card agent) and hands back
the answers, so the same steps serve virtual cards and cards in readers.
Card keys never pass here: the proxy's CardKeys opens the level-33 channel
with the card's transport keys, diversified inside the HSM from the card
factory's transport master by the PSD id (as the access server does for
flow A1), wraps every command and unwraps every answer.

Steps, one script each:

1. ``probe``: SELECT the ISD, its CPLC (the PSD id), SELECT the issuance
   applet, GET DATA DF00 (its life cycle: a card that is not factory-fresh
   is reported and left alone), INITIALIZE UPDATE on the transport keys.
2. ``generate``: EXTERNAL AUTHENTICATE, GENERATE KEYS, PUT the serial, PUT
   the public issuer key; the card's public keys come back unwrapped.
3. ``certify``: with the certificates from ProviderCa (for many cards in one
   call), PUT both certificates, CERTIFY DEVICE KEY, ACTIVATE.
4. ``check``: SELECT and GET DATA DF00 in clear, as the issuer will read the
   card: it must be ``initialized`` with the serial, the keys and the
   certificates it was given, and its signature over
   :func:`cardcore.issuance.device_key_statement` must verify.

A card whose answer is wrong, or that loses power, fails with the reason and
is left out of the pack; the applet commits its initialization atomically, so
such a card is factory-fresh again and a later run initializes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cardcore import gp
from cardcore import issuance as iss
from cardcore.issuance_keys import check_device_key_shape, ec_spki, rsa_spki
from cardcore.psd import ISD_AID, Kvn, psd_id_bytes, psd_id_from_cplc
from cardcore.sw import SW
from cms.keynames import FACTORY_TRANSPORT_MASTER, HSM1_TOKEN
from cms.pack_format import PackRow
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import provider_pb2 as ppb

TRANSPORT_KEY_LENGTH = 16
"""Bytes of each transport key the card factory puts in (AES-128)."""
HOST_CHALLENGE_BYTES = 8
PROXY_TIMEOUT_S = 60.0

Answer = tuple[bytes, int]
"""A card's answer to one command: data and status word."""
Script = list[bytes]


class CardFailed(Exception):
    """This card is left out of the pack, for this reason."""


class AlreadyInitialized(CardFailed):
    """The card is past ``factory``: it is reported and not touched."""


def transport_keys(psd_id: str) -> kpb.KeySetSpec:
    """The card's transport key set, diversified in the HSM from the factory's master."""
    return kpb.KeySetSpec(token=HSM1_TOKEN, key_length=TRANSPORT_KEY_LENGTH,
                          diversified=kpb.Diversified(master_label=FACTORY_TRANSPORT_MASTER,
                                                      element=psd_id_bytes(psd_id)))


def _ok() -> list[cpb.ExpectedStatus]:
    return [cpb.ExpectedStatus(value=SW.OK, mask=0xFFFF)]


def _command(apdu: bytes) -> kpb.ChannelCommand:
    return kpb.ChannelCommand(apdu=apdu, expect=_ok())


def _proxy_failure(exc: grpc.RpcError, what: str) -> CardFailed:
    code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return CardFailed(f"{what}: HSM proxy answered {code}: {details}")


def _all_ok(answers: Sequence[Answer], names: Sequence[str], what: str) -> None:
    """Every command answered 9000; else CardFailed naming the first that did not."""
    for name, answer in zip(names, answers, strict=False):
        if answer[1] != SW.OK:
            raise CardFailed(f"{what}: {name} answered {SW.describe(answer[1])}")
    if len(answers) < len(names):
        raise CardFailed(f"{what}: the card stopped answering at {names[len(answers)]}")


PROBE = ("SELECT ISD", "GET DATA CPLC", "SELECT issuance applet", "GET DATA DF00",
         "INITIALIZE UPDATE")
GENERATE = ("EXTERNAL AUTHENTICATE", "GENERATE KEYS", "PUT DATA serial",
            "PUT DATA issuer key")
CERTIFY = ("PUT DATA device certificate", "PUT DATA issuer authentication certificate",
           "CERTIFY DEVICE KEY", "ACTIVATE")
CHECK = ("SELECT issuance applet", "GET DATA DF00")


def check_script() -> Script:
    return [gp.select_command(iss.ISSUANCE_AID), iss.get_data(iss.Tag.ALL)]


def read_card_data(answers: Sequence[Answer], what: str) -> iss.CardData:
    _all_ok(answers, CHECK, what)
    try:
        return iss.decode_card_data(answers[1][0])
    except iss.IssuanceError as exc:
        raise CardFailed(f"{what}: {exc}") from None


def _public_key(der: bytes) -> bytes:
    return serialization.load_der_public_key(der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


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


def pack_row(data: iss.CardData, root: x509.Certificate, serial: str,
             keys: ppb.CardPublicKeys) -> PackRow:
    """The pack row of a card whose public data (GET DATA DF00) is checked: initialized,
    with the serial and keys it generated, certificates from ``root`` for those keys, and
    its own signature over its device key. CardFailed otherwise."""
    if data.life_cycle != iss.LifeCycle.INITIALIZED:
        raise CardFailed(f"card {serial} is {data.life_cycle.name.lower()} after ACTIVATE")
    if data.serial != serial:
        raise CardFailed(f"card {serial} reads back serial {data.serial!r}")
    if data.device_public_key is None or data.issuer_auth_public_key is None or \
            data.device_certificate is None or data.issuer_auth_certificate is None or \
            data.signed_device_key is None:
        raise CardFailed(f"card {serial} lacks a key, a certificate or its signed device key")
    device = rsa_spki(data.device_public_key)
    iak = ec_spki(data.issuer_auth_public_key)
    if device != keys.device_public_key or iak != keys.issuer_auth_public_key:
        raise CardFailed(f"card {serial} reads back other public keys than it generated")
    _certificate_matches(data.device_certificate, root, device, serial,
                         f"card {serial}: the device certificate")
    _certificate_matches(data.issuer_auth_certificate, root, iak, serial,
                         f"card {serial}: the issuer authentication certificate")
    public = serialization.load_der_public_key(iak)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    try:
        public.verify(data.signed_device_key,
                      iss.device_key_statement(serial, data.device_public_key),
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise CardFailed(f"card {serial}: its signature over its device key does not "
                         "verify") from None
    return PackRow(serial, device, iak, data.device_certificate,
                   data.issuer_auth_certificate, data.signed_device_key)


class CardInitialization:
    """The steps of one card; call them in order, each with the previous script's answers.

    ``card_keys`` is the proxy's CardKeys stub (identity ``provider``);
    ``next_serial`` allocates the card's serial when the card is known to be
    factory-fresh and authenticated, just before the serial goes to it.
    """

    def __init__(self, card_keys: Any, issuer_point: bytes,
                 next_serial: Callable[[], str]) -> None:
        self._stub = card_keys
        self._issuer_point = issuer_point
        self._next_serial = next_serial
        self._challenge = os.urandom(HOST_CHALLENGE_BYTES)
        self._channel = ""
        self.psd_id: str | None = None
        self.serial: str | None = None
        self.keys: ppb.CardPublicKeys | None = None

    @property
    def what(self) -> str:
        return f"PSD {self.psd_id}" if self.psd_id else "card"

    def probe(self) -> Script:
        return [gp.select_command(ISD_AID), gp.get_data_command(gp.TAG_CPLC),
                gp.select_command(iss.ISSUANCE_AID), iss.get_data(iss.Tag.ALL),
                gp.initialize_update_command(Kvn.TRANSPORT, self._challenge)]

    def generate(self, answers: Sequence[Answer]) -> Script:
        """From the probe's answers: the channel's first script (GENERATE KEYS and the PUTs)."""
        _all_ok(answers[:4], PROBE[:4], "probe")
        try:
            self.psd_id = psd_id_from_cplc(gp.unwrap_get_data(gp.TAG_CPLC, answers[1][0]))
            state = iss.decode_card_data(answers[3][0])
        except (ValueError, gp.GpError) as exc:
            raise CardFailed(f"{self.what}: malformed probe answer ({exc})") from None
        if state.life_cycle != iss.LifeCycle.FACTORY:
            raise AlreadyInitialized(f"{self.what} is already {state.life_cycle.name.lower()}"
                                     + (f" (serial {state.serial})" if state.serial else ""))
        _all_ok(answers, PROBE, self.what)
        self.serial = self._next_serial()
        try:
            opened = self._stub.OpenSecureChannel(kpb.OpenSecureChannelRequest(
                key_set=transport_keys(self.psd_id), kvn=Kvn.TRANSPORT,
                host_challenge=self._challenge, initialize_update_response=answers[4][0],
                security_level=iss.PROVIDER_SECURITY_LEVEL, aid=iss.ISSUANCE_AID,
                commands=[_command(iss.generate_keys()),
                          _command(iss.put_data(iss.Tag.SERIAL, self.serial.encode("ascii"))),
                          _command(iss.put_data(iss.Tag.ISSUER_PUBLIC_KEY,
                                                iss.encode_ec_public(self._issuer_point)))]),
                timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _proxy_failure(exc, f"{self.what}: opening the transport channel") from None
        self._channel = opened.channel
        return [c.apdu for c in opened.commands]

    def _unwrap(self, answers: Sequence[Answer], close: bool) -> list[Answer]:
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

    def public_keys(self, answers: Sequence[Answer]) -> ppb.CardPublicKeys:
        """The card's new public keys, from the generate script's answers (unwrapped)."""
        plain = self._unwrap(answers, close=False)
        _all_ok(plain, GENERATE, self.what)
        try:
            generated = iss.decode_generated_keys(plain[1][0])
            check_device_key_shape(generated.device_public_key)
            keys = ppb.CardPublicKeys(
                serial=self.serial, device_public_key=rsa_spki(generated.device_public_key),
                issuer_auth_public_key=ec_spki(generated.issuer_auth_public_key))
        except iss.IssuanceError as exc:
            raise CardFailed(f"{self.what}: GENERATE KEYS answer: {exc}") from None
        self.keys = keys
        return keys

    def certify(self, certificates: ppb.CardCertificates) -> Script:
        """The channel's second script: the certificates in, CERTIFY DEVICE KEY, ACTIVATE."""
        try:
            wrapped = self._stub.WrapCommands(kpb.WrapCommandsRequest(
                channel=self._channel, commands=[
                    _command(iss.put_data(iss.Tag.DEVICE_CERTIFICATE,
                                          certificates.device_certificate)),
                    _command(iss.put_data(iss.Tag.ISSUER_AUTH_CERTIFICATE,
                                          certificates.issuer_auth_certificate)),
                    _command(iss.certify_device_key()), _command(iss.activate())]),
                timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _proxy_failure(exc, f"{self.what}: wrapping the certificates") from None
        return [c.apdu for c in wrapped.commands]

    def activated(self, answers: Sequence[Answer]) -> Script:
        """From the certify script's answers: the plain read that checks the card."""
        _all_ok(self._unwrap(answers, close=True), CERTIFY, self.what)
        return check_script()

    def row(self, answers: Sequence[Answer], root: x509.Certificate) -> PackRow:
        assert self.serial is not None and self.keys is not None
        return pack_row(read_card_data(answers, self.what), root, self.serial, self.keys)

    def abandon(self) -> None:
        """Release the channel of a card that failed midway (best effort)."""
        if self._channel:
            try:
                self._unwrap([], close=True)
            except CardFailed:
                pass
