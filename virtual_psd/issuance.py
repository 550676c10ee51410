"""The issuance applet (seed 004): the card's own keys, made on the card, and
what the provider puts beside them (docs/issuance-applet.md is its reference).

Its persistent data is its own section of the card's state
(:class:`IssuanceState`); a card made before the applet existed gains the
section, in ``factory``, at its first change. Its life cycle runs one way,
``factory -> initialized -> personalized (-> blocked)``; in ``factory`` the
provider, inside a level-33 channel opened through the ISD with the card's
transport keys (KVN FF), has the card generate its key pairs (claim 1),
writes the serial and the public issuer key, returns the root-signed keys
(claims 9, 11), has the card certify its device key (claim 10), and
activates it. In ``initialized`` the card takes one personalization payload
(:mod:`cardcore.personalization`): it checks the issuer's signature and the
binding before it decrypts anything, and stores the user key, the device
authentication key and the PIN and PUK in one commit. Personalized, it
verifies PIN blocks (:mod:`cardcore.pin_block`), signs with the user key
behind the PIN, and authenticates to the issuer and the issuer to it
(claims 13, 14).

The applet runs no SCP03 of its own: INITIALIZE UPDATE and EXTERNAL
AUTHENTICATE go to the ISD's channel logic with the ISD's keys, counter and
AID (:mod:`virtual_psd.secure_channel`), which also unwraps its commands and
wraps its answers, as ``SecureChannel`` does for a GlobalPlatform applet.

Private keys, PIN and PUK are kept in the state file in clear, as the ISD
keeps its keys: it is the card's protected memory. No command returns one.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from cardcore import gp
from cardcore import tlv as T
from cardcore.apdu import EXTENDED_MAX_DATA, CommandApdu
from cardcore.ins import Ins
from cardcore.issuance import (
    CARD_CHALLENGE_LENGTH,
    CLA,
    DEVICE_KEY_BITS,
    DEVICE_KEY_EXPONENT,
    ISSUANCE_AID,
    MAX_CERTIFICATE,
    PIN_INS,
    PIN_TRIES,
    PROVIDER_SECURITY_LEVEL,
    PUK_TRIES,
    PUT_DATA_TAGS,
    SECP256K1_ORDER,
    SIGN_DIGEST_LENGTH,
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
    issuer_key_id,
)
from cardcore.personalization import (
    CHALLENGE_LENGTHS,
    Payload,
    PayloadError,
    SecretBundle,
    card_auth_statement,
    decode_bundle,
    decode_payload,
    device_key_fingerprint,
    issuer_auth_statement,
)
from cardcore.pin_block import BLOCK_LENGTH, OAEP_SHA1, PinBlock, PinBlockError, decode_pin_block
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

_P256 = ec.SECP256R1()
_SECP256K1 = ec.SECP256K1()
_PRIVATE_SCALAR_LENGTH: Final = 32
_MAX_SIGNATURE: Final = 72
"""Bytes of the longest DER ECDSA signature on a 256-bit curve."""
_USE: Final = ISSUANCE_AID + b"/use"
"""Where the applet keeps its volatile use state in the card's session (beside its channel)."""


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex().upper()


def _unhex(obj: dict[str, Any], name: str) -> bytes | None:
    value = obj.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"malformed issuance section: {name} must be hex text")
    return bytes.fromhex(value)


def _count(obj: dict[str, Any], name: str, default: int, most: int) -> int:
    value = obj.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise StateError(f"malformed issuance section: {name} must be 0 to {most}")
    return value


@dataclass(frozen=True)
class IssuanceState:
    """The applet's section of the card's persistent state.

    Every field is immutable, so a working copy is the object itself
    (``copy``) and a command changes it with :func:`dataclasses.replace`.
    What personalization stores (the user key, the device authentication
    key, PIN, PUK, the payload's issuance id and sequence) is absent until
    then; a file written before part 2 reads with them absent.
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
    user_private_key: bytes | None = field(default=None, repr=False)
    """The secp256k1 scalar (32 bytes) the issuer HSM derived for the user."""
    device_auth_public_key: bytes | None = None
    """The uncompressed P-256 point the issuer authenticates to the card with (claim 14)."""
    pin: bytes | None = field(default=None, repr=False)
    puk: bytes | None = field(default=None, repr=False)
    pin_tries: int = PIN_TRIES
    """Tries left before the PIN blocks; decremented before each comparison."""
    puk_tries: int = PUK_TRIES
    """Tries left before the PUK, and the card, block."""
    issuance_id: bytes | None = None
    """The issuance id of the payload that personalized the card."""
    sequence: int = 0
    """The highest payload sequence the card accepted (0: none yet)."""

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
            "user_private_key": _hex(self.user_private_key),
            "device_auth_public_key": _hex(self.device_auth_public_key),
            "pin": _hex(self.pin),
            "puk": _hex(self.puk),
            "pin_tries": self.pin_tries,
            "puk_tries": self.puk_tries,
            "issuance_id": _hex(self.issuance_id),
            "sequence": self.sequence,
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
                user_private_key=_unhex(obj, "user_private_key"),
                device_auth_public_key=_unhex(obj, "device_auth_public_key"),
                pin=_unhex(obj, "pin"),
                puk=_unhex(obj, "puk"),
                pin_tries=_count(obj, "pin_tries", PIN_TRIES, PIN_TRIES),
                puk_tries=_count(obj, "puk_tries", PUK_TRIES, PUK_TRIES),
                issuance_id=_unhex(obj, "issuance_id"),
                sequence=_count(obj, "sequence", 0, 0xFFFFFFFF),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise StateError(f"malformed issuance section: {exc}") from exc
        if (state.device_private_key is None) != (state.issuer_auth_private_key is None):
            raise StateError("malformed issuance section: one key pair without the other")
        if state.life_cycle is not LifeCycle.FACTORY and not is_complete(state):
            raise StateError(f"malformed issuance section: {life_cycle.name.lower()} "
                             "without all of its initialization data")
        if (state.pin is None) != (state.puk is None):
            raise StateError("malformed issuance section: a PIN without a PUK or the reverse")
        personalized = state.life_cycle in (LifeCycle.PERSONALIZED, LifeCycle.BLOCKED)
        if personalized != (state.user_private_key is not None) or \
                personalized != (state.device_auth_public_key is not None) or \
                personalized != (state.issuance_id is not None):
            raise StateError(f"malformed issuance section: {life_cycle.name.lower()} "
                             "with or without its personalization data")
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
        Tag.LIFE_CYCLE: bytes((life_cycle_of(state),)),
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


# personalization ---------------------------------------------------------------


def life_cycle_of(state: IssuanceState) -> LifeCycle:
    """The card's life cycle, a PUK worn down to 0 counting as ``blocked``.

    UNBLOCK PIN writes the decremented counter before comparing the PUK and
    ``blocked`` after; a power loss between the two leaves the counter at 0
    in ``personalized``, which is ``blocked`` all the same.
    """
    if state.life_cycle is LifeCycle.PERSONALIZED and state.puk is not None \
            and state.puk_tries == 0:
        return LifeCycle.BLOCKED
    return state.life_cycle


def _verify_issuer_signature(state: IssuanceState, payload: Payload) -> None:
    """The payload names the card's issuer key and is signed by it (6982 otherwise)."""
    point = state.issuer_public_key
    assert point is not None
    if payload.binding.issuer_key_id != issuer_key_id(point):
        raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "another issuer key")
    public = ec.EllipticCurvePublicKey.from_encoded_point(_P256, point)
    try:
        public.verify(payload.signature, payload.signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "issuer signature") from exc


def _check_binding(state: IssuanceState, payload: Payload) -> None:
    """The payload names this card: its serial (6A88) and its own device key (6984)."""
    binding = payload.binding
    device = device_public_key(state)
    assert device is not None
    if binding.serial != state.serial:
        raise StatusError(SW.REFERENCED_DATA_NOT_FOUND, "payload for another serial")
    if not hmac.compare_digest(binding.device_key_fingerprint, device_key_fingerprint(device)):
        raise StatusError(SW.REFERENCE_DATA_NOT_USABLE, "payload for another device key")


def _open_bundle(state: IssuanceState, ciphertext: bytes) -> SecretBundle:
    """Decrypt and check the secrets (6A80 when they do not decrypt or are malformed)."""
    assert state.device_private_key is not None
    try:
        plaintext = _device_key(state.device_private_key).decrypt(ciphertext, OAEP_SHA1)
        bundle = decode_bundle(plaintext)
    except (ValueError, PayloadError) as exc:
        raise StatusError(SW.WRONG_DATA, "secrets do not decrypt or parse") from exc
    if not 1 <= int.from_bytes(bundle.user_private_key, "big") < SECP256K1_ORDER:
        raise StatusError(SW.WRONG_DATA, "user key out of range")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(_P256, bundle.device_auth_public_key)
    except ValueError as exc:
        raise StatusError(SW.WRONG_DATA, "device authentication key not on P-256") from exc
    return bundle


def personalize(state: IssuanceState, data: bytes) -> IssuanceState:
    """The state after PERSONALIZE with payload ``data`` (StatusError, nothing changed, if not).

    Signature first, then the binding, and only then the private device key
    touches the ciphertext: a forged or misdirected payload is never decrypted.
    """
    if state.life_cycle is LifeCycle.FACTORY:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "not initialized")
    try:
        payload = decode_payload(data)
    except PayloadError as exc:
        raise StatusError(SW.WRONG_DATA, str(exc)) from exc
    _verify_issuer_signature(state, payload)
    _check_binding(state, payload)
    binding = payload.binding
    if state.life_cycle is not LifeCycle.INITIALIZED:
        if (binding.issuance_id, binding.sequence) == (state.issuance_id, state.sequence):
            raise StatusError(SW.ALREADY_EXISTS, "already personalized by this payload")
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "personalized by another payload")
    if binding.sequence <= state.sequence:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "sequence not above the last accepted")
    bundle = _open_bundle(state, payload.ciphertext)
    return dataclasses.replace(
        state, life_cycle=LifeCycle.PERSONALIZED, user_private_key=bundle.user_private_key,
        device_auth_public_key=bundle.device_auth_public_key, pin=bundle.pin, puk=bundle.puk,
        pin_tries=PIN_TRIES, puk_tries=PUK_TRIES, issuance_id=binding.issuance_id,
        sequence=binding.sequence)


# use ----------------------------------------------------------------------------


@dataclass
class UseSession:
    """The applet's volatile use state: lost on SELECT, reset and power loss."""

    challenge: bytes | None = field(default=None, repr=False)
    """The card's answer to the last GET CHALLENGE, until a command uses it up."""
    pin_verified: bool = False
    """A VERIFY PIN succeeded in this session (SIGN needs it)."""
    issuer_verified: bool = False
    """A VERIFY ISSUER succeeded in this session (no command needs it yet)."""


def codes_match(held: bytes, given: bytes) -> bool:
    """PIN or PUK comparison, in constant time."""
    return hmac.compare_digest(held, given)


def open_pin_block(state: IssuanceState, ins: int, challenge: bytes | None,
                   data: bytes) -> PinBlock:
    """The block ``data`` carries, in clear, answering the card's ``challenge``.

    6985 without a challenge, 6A80 when it does not decrypt or parse, 6982
    when it answers another challenge (a block recorded earlier).
    """
    if challenge is None:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "GET CHALLENGE first")
    assert state.device_private_key is not None
    try:
        plaintext = _device_key(state.device_private_key).decrypt(data, OAEP_SHA1)
        block = decode_pin_block(ins, plaintext)
    except (ValueError, PinBlockError) as exc:
        raise StatusError(SW.WRONG_DATA, "PIN block does not decrypt or parse") from exc
    if not hmac.compare_digest(block.challenge, challenge):
        raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN block for another challenge")
    return block


def _wrong(tries: int) -> StatusError:
    return StatusError(0x63C0 | tries, f"wrong, {tries} tries left")


def _use_pin(ctx: CommandContext, aid: bytes, state: IssuanceState, given: bytes
             ) -> IssuanceState:
    """Compare ``given`` with the PIN, the counter written down first (63Cx, 6983)."""
    assert state.pin is not None
    if state.pin_tries == 0:
        raise StatusError(SW.AUTHENTICATION_METHOD_BLOCKED, "PIN blocked")
    counted = dataclasses.replace(state, pin_tries=state.pin_tries - 1)
    ctx.put(aid, counted)
    ctx.commit_now()
    if not codes_match(state.pin, given):
        raise _wrong(counted.pin_tries)
    return dataclasses.replace(counted, pin_tries=PIN_TRIES)


def _use_puk(ctx: CommandContext, aid: bytes, state: IssuanceState, given: bytes
             ) -> IssuanceState:
    """Compare ``given`` with the PUK, the counter first; the last wrong one blocks the card."""
    assert state.puk is not None
    counted = dataclasses.replace(state, puk_tries=state.puk_tries - 1)
    ctx.put(aid, counted)
    ctx.commit_now()
    if not codes_match(state.puk, given):
        if counted.puk_tries == 0:
            ctx.put(aid, dataclasses.replace(counted, life_cycle=LifeCycle.BLOCKED))
        raise _wrong(counted.puk_tries)
    return dataclasses.replace(counted, puk_tries=PUK_TRIES)


def _user_key(state: IssuanceState) -> ec.EllipticCurvePrivateKey:
    assert state.user_private_key is not None
    return ec.derive_private_key(int.from_bytes(state.user_private_key, "big"), _SECP256K1)


def sign_digest(state: IssuanceState, digest: bytes) -> bytes:
    """ECDSA secp256k1 (DER) with the user private key over a SHA-256 ``digest``."""
    return _user_key(state).sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def issuer_signature_verifies(state: IssuanceState, challenge: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the device authentication key's over the card's challenge."""
    assert state.device_auth_public_key is not None and state.serial is not None
    public = ec.EllipticCurvePublicKey.from_encoded_point(_P256, state.device_auth_public_key)
    try:
        public.verify(signature, issuer_auth_statement(state.serial, challenge),
                      ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _no_parameters(command: CommandApdu) -> None:
    if command.p1 or command.p2:
        raise StatusError(SW.INCORRECT_P1P2)
    if command.data:
        raise StatusError(SW.WRONG_LENGTH)


# the applet -------------------------------------------------------------------


def _check_form(command: CommandApdu, lengths: range | None) -> None:
    """P1-P2 00 00 (6A86) and a data length in ``lengths``, None for none (6700)."""
    if command.p1 or command.p2:
        raise StatusError(SW.INCORRECT_P1P2)
    if (len(command.data) not in lengths) if lengths is not None else bool(command.data):
        raise StatusError(SW.WRONG_LENGTH)


def _need(state: IssuanceState, *allowed: LifeCycle) -> None:
    if state.life_cycle not in allowed:
        raise StatusError(SW.CONDITIONS_NOT_SATISFIED, f"not in {allowed}")


_ANY_DATA: Final = range(1, EXTENDED_MAX_DATA + 1)
_PIN_BLOCK: Final = range(BLOCK_LENGTH, BLOCK_LENGTH + 1)
_DIGEST: Final = range(SIGN_DIGEST_LENGTH, SIGN_DIGEST_LENGTH + 1)
_SIGNATURE: Final = range(8, _MAX_SIGNATURE + 1)
_IN_USE: Final = (LifeCycle.INITIALIZED, LifeCycle.PERSONALIZED)


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

    def _use(self, ctx: CommandContext) -> UseSession:
        use = ctx.session.app_data.get(_USE)
        if not isinstance(use, UseSession):
            use = ctx.session.app_data[_USE] = UseSession()
        return use

    def _end(self, ctx: CommandContext) -> None:
        self.channel.end(ctx)
        ctx.session.app_data[_USE] = UseSession()

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        self._end(ctx)
        return gp.select_response(self.aid, 0xFFFF)

    def deselect(self, ctx: CommandContext) -> None:
        self._end(ctx)

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]:
        ins = command.ins
        if ins in (Ins.INITIALIZE_UPDATE, Ins.EXTERNAL_AUTHENTICATE):
            if life_cycle_of(self._read(ctx)) is not LifeCycle.BLOCKED:
                return self._handshake(ctx, command)
            return b"", SW.CONDITIONS_NOT_SATISFIED
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
        handler = self._USE_COMMANDS.get(ins)
        if handler is None and ins not in PROVIDER_INS:
            raise StatusError(SW.INS_NOT_SUPPORTED)
        state = self._read(ctx)
        if life_cycle_of(state) is LifeCycle.BLOCKED:
            raise StatusError(SW.AUTHENTICATION_METHOD_BLOCKED if ins in PIN_INS
                              else SW.CONDITIONS_NOT_SATISFIED, "card blocked")
        if handler is not None:
            return handler(self, ctx, state, command)
        return self._provider(ctx, session, state, command)

    def _provider(self, ctx: CommandContext, session: ChannelSession, state: IssuanceState,
                  command: CommandApdu) -> bytes:
        ins = command.ins
        if not (session.authenticated and session.kvn == Kvn.TRANSPORT
                and session.security_level == PROVIDER_SECURITY_LEVEL):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED,
                              "a level-33 channel with the transport keys")
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

    # personalization and use: each handler takes the state the dispatcher read

    def _personalize(self, ctx: CommandContext, state: IssuanceState,
                     command: CommandApdu) -> bytes:
        _need(state, LifeCycle.INITIALIZED, LifeCycle.PERSONALIZED)
        _check_form(command, _ANY_DATA)
        self._write(ctx, personalize(state, command.data))
        return b""

    def _get_challenge(self, ctx: CommandContext, state: IssuanceState,
                       command: CommandApdu) -> bytes:
        _need(state, *_IN_USE)
        _check_form(command, None)
        challenge = os.urandom(CARD_CHALLENGE_LENGTH)
        self._use(ctx).challenge = challenge
        return challenge

    def _pin_block(self, ctx: CommandContext, state: IssuanceState,
                   command: CommandApdu) -> PinBlock:
        """The command's PIN block in clear; the challenge is used up, whatever comes next."""
        use = self._use(ctx)
        challenge, use.challenge = use.challenge, None
        _need(state, LifeCycle.PERSONALIZED)
        _check_form(command, _PIN_BLOCK)
        if command.ins == IssuanceIns.SET_PIN:
            if state.pin is not None:
                raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "the card holds a PIN")
        elif state.pin is None:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "no PIN set yet")
        return open_pin_block(state, command.ins, challenge, command.data)

    def _set_pin(self, ctx: CommandContext, state: IssuanceState,
                 command: CommandApdu) -> bytes:
        block = self._pin_block(ctx, state, command)
        self._write(ctx, dataclasses.replace(state, pin=block.pin, puk=block.puk,
                                             pin_tries=PIN_TRIES, puk_tries=PUK_TRIES))
        return b""

    def _pin_command(self, ctx: CommandContext, state: IssuanceState,
                     command: CommandApdu) -> bytes:
        """VERIFY PIN, CHANGE PIN, UNBLOCK PIN: open the block, spend a try, compare, apply."""
        block = self._pin_block(ctx, state, command)
        use = self._use(ctx)
        use.pin_verified = False
        if command.ins == IssuanceIns.UNBLOCK_PIN:
            state = _use_puk(ctx, self.aid, state, block.puk or b"")
            state = dataclasses.replace(state, pin=block.new_pin, pin_tries=PIN_TRIES)
        else:
            state = _use_pin(ctx, self.aid, state, block.pin or b"")
            if command.ins == IssuanceIns.CHANGE_PIN:
                state = dataclasses.replace(state, pin=block.new_pin)
        self._write(ctx, state)
        use.pin_verified = command.ins == IssuanceIns.VERIFY_PIN
        return b""

    def _sign(self, ctx: CommandContext, state: IssuanceState, command: CommandApdu) -> bytes:
        _need(state, LifeCycle.PERSONALIZED)
        _check_form(command, _DIGEST)
        if not self._use(ctx).pin_verified:
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "VERIFY PIN first")
        return sign_digest(state, command.data)

    def _authenticate(self, ctx: CommandContext, state: IssuanceState,
                      command: CommandApdu) -> bytes:
        _need(state, *_IN_USE)
        _check_form(command, CHALLENGE_LENGTHS)
        assert state.serial is not None
        return sign_statement(state, card_auth_statement(state.serial, command.data))

    def _verify_issuer(self, ctx: CommandContext, state: IssuanceState,
                       command: CommandApdu) -> bytes:
        use = self._use(ctx)
        challenge, use.challenge = use.challenge, None
        use.issuer_verified = False
        _need(state, LifeCycle.PERSONALIZED)
        _check_form(command, _SIGNATURE)
        if challenge is None:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "GET CHALLENGE first")
        if not issuer_signature_verifies(state, challenge, command.data):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED, "not the issuer's signature")
        use.issuer_verified = True
        return b""

    _USE_COMMANDS: Final[dict[int, Callable[[IssuanceApplet, CommandContext, IssuanceState,
                                             CommandApdu], bytes]]] = {
        IssuanceIns.PERSONALIZE: _personalize,
        IssuanceIns.GET_CHALLENGE: _get_challenge,
        IssuanceIns.SET_PIN: _set_pin,
        IssuanceIns.VERIFY_PIN: _pin_command,
        IssuanceIns.CHANGE_PIN: _pin_command,
        IssuanceIns.UNBLOCK_PIN: _pin_command,
        IssuanceIns.SIGN: _sign,
        IssuanceIns.AUTHENTICATE: _authenticate,
        IssuanceIns.VERIFY_ISSUER: _verify_issuer,
    }
    """The commands of personalization and use, by instruction (any channel or none)."""


def issuance_state(state: CardState) -> IssuanceState:
    """The applet's section of ``state``; a card without one is in ``factory``."""
    if ISSUANCE_AID not in state.sections:
        return IssuanceState()
    return state.section(ISSUANCE_AID, IssuanceState)
