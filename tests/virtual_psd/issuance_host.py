"""A software provider for the issuance applet's tests.

It drives :func:`cardcore.initialization.initialize` over a card's transmit
function with the card's software transport keys (the GlobalPlatform test
keys of tests/virtual_psd/conftest.py), and certifies the card's keys with
a P-256 test root held in memory. The provider system does the same through
the HSM proxy; these tests prove the card's side. For personalization it
also builds payloads as the issuer HSM does, with software keys.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cardcore import gp
from cardcore import issuance as I
from cardcore.apdu import parse_command, parse_response
from cardcore.diversify import StaticKeySet
from cardcore.host import SecureSession
from cardcore.initialization import (
    Answers,
    CertificateRequest,
    Certificates,
    Initialized,
    Script,
    drive,
    initialize,
)
from cardcore.issuance import CardData, issuer_key_id
from cardcore.issuance_keys import ec_spki, rsa_spki
from cardcore.personalization import (
    Binding,
    SecretBundle,
    device_key_fingerprint,
    encode_bundle,
    encode_payload,
    signed_part,
)
from cardcore.pin_block import seal
from cardcore.processor import apdu_link
from cardcore.scp03 import cmac_prf, open_host_channel
from cardcore.sw import SW
from tests.virtual_psd.conftest import PSD_ID, TRANSPORT
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.faults import FaultPlan

Transmit = Callable[[bytes], bytes]
_DAY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass
class SoftwareRoot:
    """A provider root CA in software (the real one's key is in an HSM)."""

    key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(
        ec.SECP256R1()))

    def certify(self, serial: str, spki_der: bytes, role: str) -> bytes:
        now = datetime.datetime.now(datetime.UTC)
        public = serialization.load_der_public_key(spki_der)
        cert = (x509.CertificateBuilder()
                .subject_name(_name(f"{serial} {role}"))
                .issuer_name(_name("test provider root"))
                .public_key(public)  # type: ignore[arg-type]
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _DAY).not_valid_after(now + 365 * _DAY)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.DER)

    def certificates(self, request: CertificateRequest) -> Certificates:
        return Certificates(
            self.certify(request.serial, rsa_spki(request.device_public_key), "device"),
            self.certify(request.serial, ec_spki(request.issuer_auth_public_key),
                         "issuer authentication"))


def issuer_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962,
                                         serialization.PublicFormat.UncompressedPoint)


SERIAL = "CMS-0001"
ISSUER = ec.generate_private_key(ec.SECP256R1())
"""The issuer's key pair of these tests (its private half is the HSM's in the system)."""
ISSUER_POINT = issuer_point(ISSUER)


class HostError(Exception):
    """The card refused EXTERNAL AUTHENTICATE."""


@dataclass
class SoftwareProvider:
    """Runs the initialization scripts over ``transmit`` with software transport keys."""

    transmit: Transmit
    root: SoftwareRoot = field(default_factory=SoftwareRoot)
    keys: StaticKeySet = TRANSPORT
    session: SecureSession | None = None
    answers: list[tuple[bytes, int]] = field(default_factory=list)

    def run(self, script: Script) -> Answers:
        if script.opening is not None:
            o = script.opening
            channel, ext_auth = open_host_channel(
                cmac_prf(self.keys.enc), cmac_prf(self.keys.mac), o.host_challenge,
                o.initialize_update_response, key_length=self.keys.key_length,
                security_level=o.security_level, aid=o.aid)
            if parse_response(self.transmit(ext_auth))[1] != SW.OK:
                raise HostError("EXTERNAL AUTHENTICATE refused")
            self.session = SecureSession(self.transmit, channel, o.kvn)
        out: list[tuple[bytes, int]] = []
        link = apdu_link(self.transmit)
        for command in script.commands:
            if script.secured:
                assert self.session is not None
                out.append(self.session.send(command))
            else:
                response = link.send(parse_command(command))
                out.append((response.data, response.sw))
        self.answers.extend(out)
        return out

    def initialize(self, serial: str, issuer_public_key: bytes) -> Initialized:
        return drive(initialize(serial, issuer_public_key), self.run, self.root.certificates)


# The issuer's side of personalization, in software --------------------------------

USER_KEY = (0x1F2E3D4C5B6A7988).to_bytes(32, "big")
"""A user private key of these tests: any secp256k1 scalar (the real one is BIP32's, in the
issuer HSM)."""
DEVICE_AUTH = ec.generate_private_key(ec.SECP256R1())
"""The device authentication key pair of these tests (the issuer system HSM's in the system)."""
DEVICE_AUTH_POINT = issuer_point(DEVICE_AUTH)


def bundle(pin: bytes | None = b"123456", puk: bytes | None = b"12345678",
           user_key: bytes = USER_KEY, device_auth: bytes = DEVICE_AUTH_POINT) -> SecretBundle:
    return SecretBundle(user_key, device_auth, pin, puk)


def sign_payload(signed: bytes, issuer: ec.EllipticCurvePrivateKey = ISSUER) -> bytes:
    """The whole payload: ``signed`` and the issuer's ECDSA-SHA256 over it."""
    return encode_payload(signed, issuer.sign(signed, ec.ECDSA(hashes.SHA256())))


def make_payload(card: CardData, secrets: SecretBundle | None = None, *, sequence: int = 1,
                 issuance_id: bytes = b"\x01" * 16, serial: str | None = None,
                 fingerprint: bytes | None = None,
                 issuer: ec.EllipticCurvePrivateKey = ISSUER,
                 plaintext: bytes | None = None) -> bytes:
    """A payload for ``card`` as the issuer HSM makes it; each keyword bends one field
    (``plaintext`` replaces the encoded bundle, for malformed secrets)."""
    assert card.device_public_key is not None and card.serial is not None
    binding = Binding(serial or card.serial,
                      fingerprint or device_key_fingerprint(card.device_public_key),
                      issuance_id, sequence, issuer_key_id(issuer_point(issuer)))
    inner = plaintext if plaintext is not None else encode_bundle(secrets or bundle())
    return sign_payload(signed_part(binding, seal(card.device_public_key, inner)), issuer)


def open_card(path: Path, faults: FaultPlan | None = None) -> VirtualCard:
    card = VirtualCard.open(path, faults=faults)
    card.power_on()
    return card


def select_applet(card: VirtualCard) -> I.CardData:
    """SELECT the issuance applet and read what it holds (GET DATA DF00)."""
    assert parse_response(card.transmit(gp.select_command(I.ISSUANCE_AID)))[1] == SW.OK
    data, sw = parse_response(card.transmit(I.get_data(I.Tag.ALL)))
    assert sw == SW.OK
    return I.decode_card_data(data)


def initialized_card(path: Path, serial: str = SERIAL, psd_id: str = PSD_ID) -> Path:
    """A card file at ``path``, initialized by the software provider for ``ISSUER``."""
    create_card(path, psd_id=psd_id)
    SoftwareProvider(open_card(path).transmit).initialize(serial, ISSUER_POINT)
    return path
