"""The issuance applet (seed 004): the card's own keys, made on the card, and
what the provider puts beside them (docs/issuance-applet.md is its reference).

Its persistent data is its own section of the card's state
(:class:`IssuanceState`); a card made before the applet existed gains the
section, in ``factory``, at its first change. Its life cycle runs one way,
``factory -> initialized -> personalized``; in ``factory`` the provider,
inside a level-33 channel opened through the ISD with the card's transport
keys (KVN FF), has the card generate its key pairs (claim 1), writes the
serial and the public issuer key, returns the root-signed keys (claims 9,
11), has the card certify its device key (claim 10), and activates it.

The applet runs no SCP03 of its own: INITIALIZE UPDATE and EXTERNAL
AUTHENTICATE go to the ISD's channel logic with the ISD's keys, counter and
AID (:mod:`virtual_psd.secure_channel`), which also unwraps its commands and
wraps its answers, as ``SecureChannel`` does for a GlobalPlatform applet.

Private keys are kept in the state file in clear, as the ISD keeps its
keys: it is the card's protected memory. No command returns one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore import gp
from cardcore import tlv as T
from cardcore.apdu import CommandApdu
from cardcore.ins import Ins
from cardcore.issuance import (
    CLA,
    DEVICE_KEY_BITS,
    DEVICE_KEY_EXPONENT,
    ISSUANCE_AID,
    MAX_CERTIFICATE,
    PROVIDER_SECURITY_LEVEL,
    PUT_DATA_TAGS,
    GeneratedKeys,
    IssuanceError,
    IssuanceIns,
    LifeCycle,
    RsaPublic,
    Tag,
    check_serial,
    decode_ec_public,
    device_key_statement,
    encode_ec_public,
    encode_generated_keys,
    encode_rsa_public,
)
from cardcore.psd import ISD_AID, Kvn
from cardcore.scp03 import CLA_SECURE_MESSAGING, CardChannel
from cardcore.sw import SW
from virtual_psd.applet import CommandContext, StatusError
from virtual_psd.isd import IsdState, default_kvn
from virtual_psd.secure_channel import ChannelSession, SecureChannel
from virtual_psd.state import CardState, StateError

PROVIDER_INS: Final = frozenset({IssuanceIns.GENERATE_KEYS, IssuanceIns.PUT_DATA,
                                 IssuanceIns.CERTIFY_DEVICE_KEY, IssuanceIns.ACTIVATE})
"""Commands of the provider: ``factory`` only, level 33 with the transport keys only."""

RESERVED_INS: Final = frozenset({IssuanceIns.PERSONALIZE, IssuanceIns.VERIFY_PIN,
                                 IssuanceIns.CHANGE_PIN, IssuanceIns.UNBLOCK_PIN,
                                 IssuanceIns.SIGN, IssuanceIns.AUTHENTICATE,
                                 IssuanceIns.VERIFY_ISSUER})
"""Personalization and use (seed 004, part 2): answered 6D00 until they exist."""

_P256 = ec.SECP256R1()
_PRIVATE_SCALAR_LENGTH: Final = 32


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex().upper()


def _unhex(obj: dict[str, Any], name: str) -> bytes | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"malformed issuance section: {name} must be hex text")
    return bytes.fromhex(value)


@dataclass(frozen=True)
class IssuanceState:
    """The applet's section of the card's persistent state.

    Every field is immutable, so a working copy is the object itself
    (``copy``) and a command changes it with :func:`dataclasses.replace`.
    Part 2 of seed 004 adds the user key, the device authentication key, PIN,
    PUK and their counters beside these, each absent until personalization.
    """

    life_cycle: LifeCycle = LifeCycle.FACTORY
    serial: str | None = None
    device_private_key: bytes | None = field(default=None, repr=False)
    """PKCS#8 DER of the RSA-2048 device key."""
    issuer_auth_private_key: bytes | None = field(default=None, repr=False)
    """The P-256 private scalar (32 bytes) of the issuer authentication key."""
    issuer_public_key: bytes | None = None
    device_certificate: bytes | None = None
    issuer_auth_certificate: bytes | None = None
    signed_device_key: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "life_cycle": self.life_cycle.name.lower(),
            "serial": self.serial,
            "device_private_key": _hex(self.device_private_key),
            "issuer_auth_private_key": _hex(self.issuer_auth_private_key),
            "issuer_public_key": _hex(self.issuer_public_key),
            "device_certificate": _hex(self.device_certificate),
            "issuer_auth_certificate": _hex(self.issuer_auth_certificate),
            "signed_device_key": _hex(self.signed_device_key),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IssuanceState:
        try:
            life_cycle = LifeCycle[str(obj["life_cycle"]).upper()]
            serial = obj.get("serial")
            state = cls(
                life_cycle=life_cycle,
                serial=None if serial is None else check_serial(serial),
                device_private_key=_unhex(obj, "device_private_key"),
                issuer_auth_private_key=_unhex(obj, "issuer_auth_private_key"),
                issuer_public_key=_unhex(obj, "issuer_public_key"),
                device_certificate=_unhex(obj, "device_certificate"),
                issuer_auth_certificate=_unhex(obj, "issuer_auth_certificate"),
                signed_device_key=_unhex(obj, "signed_device_key"),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateError(f"malformed issuance section: {exc}") from exc
        if (state.device_private_key is None) != (state.issuer_auth_private_key is None):
            raise StateError("malformed issuance section: one key pair without the other")
        if state.life_cycle is not LifeCycle.FACTORY and not is_complete(state):
            raise StateError(f"malformed issuance section: {life_cycle.name.lower()} "
                             "without all of its initialization data")
        return state

    def copy(self) -> IssuanceState:
        return self


def is_complete(state: IssuanceState) -> bool:
    """Whether the card holds everything ACTIVATE asks for."""
    return None not in (state.serial, state.device_private_key, state.issuer_auth_private_key,
                        state.issuer_public_key, state.device_certificate,
                        state.issuer_auth_certificate, state.signed_device_key)


# keys -------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _device_key(der: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise StateError("issuance section: the device key is not an RSA key")
    return key


@lru_cache(maxsize=64)
def _issuer_auth_key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), _P256)


def device_public_key(state: IssuanceState) -> RsaPublic | None:
    if state.device_private_key is None:
        return None
    numbers = _device_key(state.device_private_key).public_key().public_numbers()
    return RsaPublic(numbers.n.to_bytes(DEVICE_KEY_BITS // 8, "big"),
                     numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))


def issuer_auth_public_key(state: IssuanceState) -> bytes | None:
    if state.issuer_auth_private_key is None:
        return None
    return _issuer_auth_key(state.issuer_auth_private_key).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def generate_key_pairs() -> tuple[bytes, bytes]:
    """A new device key pair and issuer authentication key pair (claim 1).

    ``cryptography`` draws on the operating system's random source
    (os.urandom); a real card generates both pairs with its own true random
    number generator, as claim 1 asks.
    """
    device = rsa.generate_private_key(public_exponent=DEVICE_KEY_EXPONENT,
                                      key_size=DEVICE_KEY_BITS)
    der = device.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    scalar = ec.generate_private_key(_P256).private_numbers().private_value
    return der, scalar.to_bytes(_PRIVATE_SCALAR_LENGTH, "big")


def sign_statement(state: IssuanceState, statement: bytes) -> bytes:
    """ECDSA-SHA256 (DER) with the private issuer authentication key (claim 10)."""
    assert state.issuer_auth_private_key is not None
    return _issuer_auth_key(state.issuer_auth_private_key).sign(
        statement, ec.ECDSA(hashes.SHA256()))


# data objects -----------------------------------------------------------------


def public_objects(state: IssuanceState) -> dict[int, bytes]:
    """Every public data object the card holds, by tag (GET DATA); never a private key."""
    device = device_public_key(state)
    iak = issuer_auth_public_key(state)
    values: dict[int, bytes | None] = {
        Tag.LIFE_CYCLE: bytes((state.life_cycle,)),
        Tag.SERIAL: None if state.serial is None else state.serial.encode("ascii"),
        Tag.DEVICE_PUBLIC_KEY: None if device is None else encode_rsa_public(device),
        Tag.ISSUER_AUTH_PUBLIC_KEY: None if iak is None else encode_ec_public(iak),
        Tag.ISSUER_PUBLIC_KEY: None if state.issuer_public_key is None
        else encode_ec_public(state.issuer_public_key),
        Tag.DEVICE_CERTIFICATE: state.device_certificate,
        Tag.ISSUER_AUTH_CERTIFICATE: state.issuer_auth_certificate,
        Tag.SIGNED_DEVICE_KEY: state.signed_device_key,
    }
    return {tag: value for tag, value in values.items() if value is not None}


def get_data(state: IssuanceState, tag: int) -> bytes:
    objects = public_objects(state)
    if tag == Tag.ALL:
        return b"".join(T.tlv(t, v) for t, v in objects.items())
    if tag not in objects:
        raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)
    return T.tlv(tag, objects[tag])


def _check_certificate(value: bytes, own_key: bytes | None) -> bytes:
    """One DER SEQUENCE of at most MAX_CERTIFICATE bytes that carries ``own_key``.

    The card does not parse X.509 (a Java Card would not either); it checks
    that the certificate is about it: its own modulus or point is in it.
    """
    if own_key is None:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "no keys generated yet")
    if len(value) > MAX_CERTIFICATE:
        raise StatusError(SW.WRONG_DATA, "certificate too long")
    try:
        items = T.parse_tlvs(value)
    except T.TlvError as exc:
        raise StatusError(SW.WRONG_DATA, "certificate is not DER") from exc
    if len(items) != 1 or items[0].tag != 0x30:
        raise StatusError(SW.WRONG_DATA, "certificate is not one SEQUENCE")
    if own_key not in value:
        raise StatusError(SW.WRONG_DATA, "certificate does not carry the card's key")
    return value


def _check_issuer_key(value: bytes) -> bytes:
    try:
        point = decode_ec_public(value)
        ec.EllipticCurvePublicKey.from_encoded_point(_P256, point)
    except (IssuanceError, ValueError, UnsupportedAlgorithm) as exc:
        raise StatusError(SW.WRONG_DATA, "not a P-256 point") from exc
    return point


def put_data(state: IssuanceState, tag: int, value: bytes) -> IssuanceState:
    """The state after PUT DATA ``tag`` (StatusError, and nothing changed, when refused)."""
    if tag not in PUT_DATA_TAGS:
        raise StatusError(SW.REFERENCED_DATA_NOT_FOUND, f"PUT DATA does not write {tag:04X}")
    if tag == Tag.SERIAL:
        try:
            serial = check_serial(value.decode("ascii"))
        except (UnicodeDecodeError, IssuanceError) as exc:
            raise StatusError(SW.WRONG_DATA, "malformed serial") from exc
        if serial == state.serial:
            return state
        # What certifies the card names its serial: a new serial drops it.
        return dataclasses.replace(state, serial=serial, device_certificate=None,
                                   issuer_auth_certificate=None, signed_device_key=None)
    if tag == Tag.ISSUER_PUBLIC_KEY:
        if state.issuer_public_key is not None:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "the issuer key is written once")
        return dataclasses.replace(state, issuer_public_key=_check_issuer_key(value))
    if tag == Tag.DEVICE_CERTIFICATE:
        device = device_public_key(state)
        cert = _check_certificate(value, None if device is None else device.modulus)
        return dataclasses.replace(state, device_certificate=cert)
    cert = _check_certificate(value, issuer_auth_public_key(state))
    return dataclasses.replace(state, issuer_auth_certificate=cert)


def generate_keys(state: IssuanceState) -> IssuanceState:
    """New key pairs; what was made for the old ones (certificates, signature) goes."""
    device, iak = generate_key_pairs()
    return dataclasses.replace(state, device_private_key=device, issuer_auth_private_key=iak,
                               device_certificate=None, issuer_auth_certificate=None,
                               signed_device_key=None)


def generated_keys(state: IssuanceState) -> bytes:
    device, iak = device_public_key(state), issuer_auth_public_key(state)
    assert device is not None and iak is not None
    return encode_generated_keys(GeneratedKeys(device, iak))


def certify_device_key(state: IssuanceState) -> IssuanceState:
    device = device_public_key(state)
    if state.serial is None or device is None:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "needs the serial and the keys")
    signature = sign_statement(state, device_key_statement(state.serial, device))
    return dataclasses.replace(state, signed_device_key=signature)


def activate(state: IssuanceState) -> IssuanceState:
    if not is_complete(state):
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "initialization data missing")
    return dataclasses.replace(state, life_cycle=LifeCycle.INITIALIZED)


def _no_parameters(command: CommandApdu) -> None:
    if command.p1 or command.p2:
        raise StatusError(SW.INCORRECT_P1P2)
    if command.data:
        raise StatusError(SW.WRONG_LENGTH)


# the applet -------------------------------------------------------------------


class IssuanceApplet:
    aid = ISSUANCE_AID

    def __init__(self) -> None:
        self.channel = SecureChannel(self.aid, ISD_AID, ChannelSession)

    def read_section(self, state: CardState) -> None:
        if self.aid in state.sections:
            state.section(self.aid, IssuanceState)

    def _read(self, ctx: CommandContext) -> IssuanceState:
        return ctx.peek(self.aid, IssuanceState, IssuanceState)

    def _write(self, ctx: CommandContext, state: IssuanceState) -> None:
        ctx.put(self.aid, state)

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        self.channel.end(ctx)
        return gp.select_response(self.aid, 0xFFFF)

    def deselect(self, ctx: CommandContext) -> None:
        self.channel.end(ctx)

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]:
        ins = command.ins
        if ins in (Ins.INITIALIZE_UPDATE, Ins.EXTERNAL_AUTHENTICATE):
            return self._handshake(ctx, command)
        wrapped = bool(command.cla & CLA_SECURE_MESSAGING)
        try:
            command = self.channel.unwrap(ctx, command, PROVIDER_INS)
        except StatusError as exc:
            return b"", exc.sw
        session = self.channel.session(ctx)
        try:
            data, sw = self._handle(ctx, session, command), SW.OK
        except StatusError as exc:
            data, sw = b"", exc.sw
        if wrapped:
            return self.channel.protect(session, data, sw)
        return data, sw

    def _handshake(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]:
        """INITIALIZE UPDATE / EXTERNAL AUTHENTICATE, handed to the ISD's channel logic."""
        isd = ctx.section(ISD_AID, IsdState)
        if command.ins == Ins.EXTERNAL_AUTHENTICATE:
            return self.channel.external_authenticate(ctx, isd.scp_i, command)
        kvn = default_kvn(isd) if command.p1 == 0 else command.p1

        def opened(channel: CardChannel, kvn: int, dek: bytes) -> ChannelSession:
            return ChannelSession(channel=channel, kvn=kvn, dek=dek)

        return self.channel.initialize_update(ctx, isd, command, kvn, opened)

    def _handle(self, ctx: CommandContext, session: ChannelSession,
                command: CommandApdu) -> bytes:
        if command.cla != CLA:
            raise StatusError(SW.CLA_NOT_SUPPORTED)
        ins = command.ins
        if ins == IssuanceIns.GET_DATA:
            return get_data(self._read(ctx), (command.p1 << 8) | command.p2)
        if ins in RESERVED_INS:
            raise StatusError(SW.INS_NOT_SUPPORTED, "reserved for personalization")
        if ins not in PROVIDER_INS:
            raise StatusError(SW.INS_NOT_SUPPORTED)
        if not (session.authenticated and session.kvn == Kvn.TRANSPORT
                and session.security_level == PROVIDER_SECURITY_LEVEL):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED,
                              "a level-33 channel with the transport keys")
        state = self._read(ctx)
        if state.life_cycle is not LifeCycle.FACTORY:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "not in factory")
        if ins == IssuanceIns.PUT_DATA:
            self._write(ctx, put_data(state, (command.p1 << 8) | command.p2, command.data))
            return b""
        _no_parameters(command)
        if ins == IssuanceIns.GENERATE_KEYS:
            state = generate_keys(state)
            self._write(ctx, state)
            return generated_keys(state)
        if ins == IssuanceIns.CERTIFY_DEVICE_KEY:
            state = certify_device_key(state)
            self._write(ctx, state)
            assert state.signed_device_key is not None
            return state.signed_device_key
        self._write(ctx, activate(state))
        return b""


def issuance_state(state: CardState) -> IssuanceState:
    """The applet's section of ``state``; a card without one is in ``factory``."""
    if ISSUANCE_AID not in state.sections:
        return IssuanceState()
    return state.section(ISSUANCE_AID, IssuanceState)
