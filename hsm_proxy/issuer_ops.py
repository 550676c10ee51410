"""Worker operations of IssuerHsm: the issuer's seed, device authentication keys, payloads.

The seed (ISSUER_SEED, ``issuer-seed/<version>`` in token ``issuer``) is a
64-byte GENERIC_SECRET made by the HSM's generator (CKM_GENERIC_SECRET_KEY_GEN),
sensitive, with no usage. SoftHSM has no BIP32 mechanism, so an operation
that derives from it takes it out for that operation only: the worker makes a
one-time AES-256 key (a session object, WRAP only, its value from the HSM's
generator), wraps the seed under it (CKM_AES_KEY_WRAP_PAD), destroys it, and
unwraps the result in software into a ``bytearray`` that is zeroed when the
operation ends (``_seed``). Everything derived from the seed stays inside
that same operation: ``issue`` derives each user key, seals it to the card's
device key, has the issuer key sign the payload and returns only the
payload, the user's public key and the PIN letter data: one call a module
with native BIP32 mechanisms could run inside the HSM unchanged.

The device authentication keys (DEVICE_AUTH_KEY) are P-256 pairs generated in
token ``issuer-system`` as session objects; the private half is wrapped under
the token's KEK (DEVICE_AUTH_KEK, AES-256, WRAP/UNWRAP only) and destroyed.
To sign, the wrapped half is unwrapped into a session object that is
sensitive, never extractable and may only sign, used once, and destroyed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
)
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from cardcore import issuance
from cardcore import issuance_keys as ik
from cardcore import personalization as perso
from cardcore.kcv import KCV_INPUT, KCV_LENGTH
from cms import keynames
from cms.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import bip32
from hsm_proxy import key_classes as kc
from hsm_proxy import provider_x509 as px
from hsm_proxy.backend import ResolvedKey, is_backend_failure
from hsm_proxy.key_blocks_ops import _destroy_quietly, _require_free
from hsm_proxy.keyspec import EC_PARAMS, finish, object_template
from hsm_proxy.provider_ops import (
    _signing_key,
    certificate_beside,
    certificate_template,
    random_serial,
    sign_with,
)
from hsm_proxy.registry import WorkerContext, operation

ZERO_IV = bytes(16)
WRAP_MECHANISM = Mechanism.AES_KEY_WRAP_PAD
_OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(),  # noqa: S303
                          label=None)
_NO_USAGE = {Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.SIGN: False,
             Attribute.VERIFY: False, Attribute.WRAP: False, Attribute.UNWRAP: False,
             Attribute.DERIVE: False}


class KeyRef(NamedTuple):
    token: str
    label: str


class SeedAnswer(NamedTuple):
    label: str
    seed_id: bytes


class KekAnswer(NamedTuple):
    label: str
    kcv: bytes


class GenerateKeys(NamedTuple):
    kek: KeyRef
    count: int


class DeviceAuthKey(NamedTuple):
    public_key: bytes           # uncompressed P-256 point
    wrapped_private_key: bytes


class SignDeviceAuth(NamedTuple):
    kek: KeyRef
    key: DeviceAuthKey
    statement: bytes            # personalization.issuer_auth_statement, built by the frontend


class Codes(NamedTuple):
    """PIN and PUK made by the HSM, and the mailing house's key they are sealed to."""

    mailer_public_key: bytes    # SubjectPublicKeyInfo DER, checked RSA
    pin_length: int
    puk_length: int


class Item(NamedTuple):
    """One card of IssueBatch, checked by the frontend."""

    serial: str
    device_key: issuance.RsaPublic
    element: int
    device_auth_public_key: bytes
    issuance_id: bytes
    sequence: int


class IssueGroup(NamedTuple):
    """Cards of one IssueBatch that one worker call issues with one reading of the seed."""

    seed: KeyRef
    issuer: KeyRef
    items: tuple[Item, ...]
    codes: Codes | None
    first: int = 0              # the index of the group's first item in the request


class Issued(NamedTuple):
    serial: str
    payload: bytes
    user_public_key: bytes      # compressed secp256k1 point
    mailer_data: bytes


class SignFile(NamedTuple):
    issuer: KeyRef
    sha256: bytes


class FileSignature(NamedTuple):
    signature: bytes
    signing_time: datetime


# ---------------------------------------------------------------------------
# The seed

def _conforming(ctx: WorkerContext, ref: KeyRef, role: int, what: str) -> ResolvedKey:
    """The secret key of ``role`` under ``ref`` when it matches its class: the proxy's tag
    (GENERATED), its template, and never readable since it was made (ALWAYS_SENSITIVE)."""
    kc.require_role(ref.label, {role}, what)
    key = ctx.backend.key(ref.token, ref.label)
    if key.conformance:
        raise kc.KeyClassError(f"{what} {ref.label!r} on token {ref.token!r} does not match "
                               f"its class: {key.conformance}")
    found = key.get(ObjectClass.SECRET_KEY)
    attrs = key.attrs.get(ObjectClass.SECRET_KEY, {})
    if found is None or not attrs.get(Attribute.ALWAYS_SENSITIVE):
        raise kc.KeyClassError(f"{what} {ref.label!r} on token {ref.token!r} is not a secret "
                               f"key the proxy generated")
    return key


def _seed_object(ctx: WorkerContext, ref: KeyRef) -> Any:
    key = _conforming(ctx, ref, pb.ISSUER_SEED, "seed")
    obj, shape = key.get(ObjectClass.SECRET_KEY)  # type: ignore[misc]
    if shape.key_type != KeyType.GENERIC_SECRET or shape.size_bits != kc.SEED_BYTES * 8:
        raise kc.KeyClassError(f"seed {ref.label!r} on token {ref.token!r} is not a "
                               f"{kc.SEED_BYTES}-byte generic secret")
    return obj


def _wipe(secret: bytearray) -> None:
    secret[:] = bytes(len(secret))


@contextmanager
def _seed(ctx: WorkerContext, ref: KeyRef) -> Iterator[bytearray]:
    """The seed in clear, for the ``with`` block only (zeroed after).

    It leaves the token wrapped under a one-time AES key: a session object
    with WRAP only, made from the HSM's random bytes and destroyed before
    the wrapped seed is opened in software. The one-time key's value and the
    wrapped seed are immutable ``bytes`` Python cannot wipe (see the threat model).
    """
    seed_object = _seed_object(ctx, ref)
    session = ctx.backend.session(ref.token)
    one_time = bytearray(session.generate_random(256))
    wrapper = session.create_object(finish({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.COPYABLE: False, Attribute.VALUE: bytes(one_time),
        **_NO_USAGE, Attribute.WRAP: True}))
    try:
        wrapped = wrapper.wrap_key(seed_object, mechanism=WRAP_MECHANISM)
    finally:
        _destroy_quietly([wrapper])
    try:
        seed = bytearray(aes_key_unwrap_with_padding(bytes(one_time), bytes(wrapped)))
    except InvalidUnwrap:
        raise FailedPrecondition(f"the seed {ref.label!r} did not come out of its "
                                 f"token whole") from None
    finally:
        _wipe(one_time)
    try:
        if len(seed) != kc.SEED_BYTES:
            raise kc.KeyClassError(f"seed {ref.label!r} is not {kc.SEED_BYTES} bytes")
        yield seed
    finally:
        _wipe(seed)


def seed_id(seed: bytearray) -> bytes:
    """Names a seed in records: SHA-256 of its BIP32 master public key, first 8 bytes."""
    return hashlib.sha256(bip32.public_key(bip32.master(seed))).digest()[:8]


@operation("issuer.create_seed", idempotent=False)
def create_seed(ctx: WorkerContext, ref: KeyRef) -> SeedAnswer:
    """64 bytes from the HSM's generator as the seed's own object; its id read back once."""
    kc.require_role(ref.label, {pb.ISSUER_SEED}, "seed")
    _require_free(ctx, ref.token, ref.label)
    template = object_template(kc.ISSUER_SEED_TEMPLATE, label=ref.label,
                               tag=kc.Tag(pb.ISSUER_SEED, pb.GENERATED), token_object=True,
                               key_type=KeyType.GENERIC_SECRET, value_len=kc.SEED_BYTES)
    made = ctx.backend.session(ref.token).generate_key(
        KeyType.GENERIC_SECRET, kc.SEED_BYTES * 8, capabilities=0, template=template,
        mechanism=Mechanism.GENERIC_SECRET_KEY_GEN)
    ctx.backend.forget(ref.token, ref.label)
    try:
        with _seed(ctx, ref) as seed:
            return SeedAnswer(ref.label, seed_id(seed))
    except BaseException:
        _destroy_quietly([made])
        ctx.backend.forget(ref.token, ref.label)
        raise


# ---------------------------------------------------------------------------
# Device authentication keys

def _kek(ctx: WorkerContext, ref: KeyRef) -> Any:
    key = _conforming(ctx, ref, pb.DEVICE_AUTH_KEK, "device authentication KEK")
    obj, shape = key.get(ObjectClass.SECRET_KEY)  # type: ignore[misc]
    if shape.algorithm != pb.AES_256:
        raise kc.KeyClassError(f"device authentication KEK {ref.label!r} is not AES-256")
    return obj


def _kcv(session: Any, kek: Any) -> bytes:
    """GlobalPlatform KCV of a key that only wraps: C_WrapKey (CBC, zero IV: one block of
    ECB) of a session key whose value is the KCV input, 16 x 01."""
    probe = session.create_object(finish({
        Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False, Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True,
        Attribute.VALUE: KCV_INPUT, **_NO_USAGE}))
    try:
        return bytes(kek.wrap_key(probe, mechanism=Mechanism.AES_CBC,
                                  mechanism_param=ZERO_IV))[:KCV_LENGTH]
    finally:
        _destroy_quietly([probe])


@operation("issuer.create_kek", idempotent=False)
def create_kek(ctx: WorkerContext, ref: KeyRef) -> KekAnswer:
    kc.require_role(ref.label, {pb.DEVICE_AUTH_KEK}, "device authentication KEK")
    _require_free(ctx, ref.token, ref.label)
    session = ctx.backend.session(ref.token)
    template = object_template(kc.DEVICE_AUTH_KEK_TEMPLATE, label=ref.label,
                               tag=kc.Tag(pb.DEVICE_AUTH_KEK, pb.GENERATED), token_object=True,
                               key_type=KeyType.AES, value_len=32)
    made = session.generate_key(KeyType.AES, 256, capabilities=0, template=template)
    ctx.backend.forget(ref.token, ref.label)
    try:
        return KekAnswer(ref.label, _kcv(session, _kek(ctx, ref)))
    except BaseException:
        _destroy_quietly([made])
        ctx.backend.forget(ref.token, ref.label)
        raise


def newest(ctx: WorkerContext, token: str, parse: Any) -> int:
    """The highest version of the labels ``parse`` reads on ``token``, NotFound if none."""
    versions = [v for obj in ctx.backend.list_objects(token, ObjectClass.SECRET_KEY)
                if (v := parse(str(obj[Attribute.LABEL] or ""))) is not None]
    if not versions:
        raise NotFound(f"no key of this kind on token {token!r}")
    return max(versions)


@operation("issuer.newest_kek", idempotent=True)
def newest_kek(ctx: WorkerContext, token: str) -> int:
    return newest(ctx, token, keynames.parse_device_auth_kek_label)


def _ec_point(public: Any) -> bytes:
    point = bytes(public[Attribute.EC_POINT])
    if len(point) == issuance.EC_POINT_LENGTH + 2 and point[0] == 0x04:
        point = point[2:]   # DER OCTET STRING around the X9.62 point
    return point


@operation("issuer.generate_device_auth_keys", idempotent=True)
def generate_device_auth_keys(ctx: WorkerContext, req: GenerateKeys) -> list[DeviceAuthKey]:
    """``count`` P-256 pairs made in the HSM as session objects, the private half wrapped
    under the KEK and both destroyed: nothing of them stays in the token."""
    kek = _kek(ctx, req.kek)
    session = ctx.backend.session(req.kek.token)
    public_template = finish({Attribute.TOKEN: False, Attribute.PRIVATE: False,
                              Attribute.COPYABLE: False, Attribute.VERIFY: False,
                              Attribute.ENCRYPT: False, Attribute.WRAP: False,
                              Attribute.DERIVE: False, Attribute.EC_PARAMS: EC_PARAMS[pb.EC_P256]})
    private_template = finish({Attribute.TOKEN: False, Attribute.PRIVATE: True,
                               Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: True,
                               Attribute.WRAP_WITH_TRUSTED: False, Attribute.COPYABLE: False,
                               Attribute.SIGN: False, Attribute.DECRYPT: False,
                               Attribute.UNWRAP: False, Attribute.DERIVE: False})
    out = []
    for _ in range(req.count):
        public, private = session.generate_keypair(KeyType.EC, None, capabilities=0,
                                                   public_template=public_template,
                                                   private_template=private_template)
        try:
            wrapped = bytes(kek.wrap_key(private, mechanism=WRAP_MECHANISM))
            out.append(DeviceAuthKey(_ec_point(public), wrapped))
        finally:
            _destroy_quietly([private, public])
    return out


def _unwrap_template() -> dict[Attribute, Any]:
    """A device authentication key in the HSM: a session object, sensitive, never
    extractable, SIGN and nothing else."""
    template: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC,
        Attribute.TOKEN: False, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False, Attribute.WRAP_WITH_TRUSTED: False,
        Attribute.COPYABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
        Attribute.UNWRAP: False, Attribute.DERIVE: False}
    # python-pkcs11 adds every usage attribute to an unwrap template; those of public
    # keys do not exist on a private key (DEFAULT removes them).
    for attr in (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP):
        template[attr] = pkcs11.DEFAULT
    return finish(template)


def _backend_answers(ctx: WorkerContext, token: str) -> bool:
    """Whether the token still answers (random bytes) after an unwrap failed.

    SoftHSM 2.6 answers CKR_GENERAL_ERROR, which otherwise means the backend
    failed, when a blob fails the key-wrap integrity check (random bytes, a
    blob of another KEK): a caller's bad blob must not reset the worker's
    sessions, so a token that answers at once marks the blob, not the backend.
    """
    try:
        ctx.backend.session(token).generate_random(64)
    except pkcs11.PKCS11Error:
        return False
    return True


def _not_ours(ref: KeyRef) -> InvalidArgument:
    return InvalidArgument(f"key.wrapped_private_key is not a device authentication key "
                           f"wrapped under {ref.label!r}")


@operation("issuer.sign_device_auth", idempotent=True)
def sign_device_auth(ctx: WorkerContext, req: SignDeviceAuth) -> bytes:
    """ECDSA-SHA256 (DER) of the statement by the unwrapped key, which must be the half of
    ``req.key.public_key``; the session object is destroyed before the answer."""
    kek = _kek(ctx, req.kek)
    try:
        private = kek.unwrap_key(ObjectClass.PRIVATE_KEY, KeyType.EC,
                                 req.key.wrapped_private_key, mechanism=WRAP_MECHANISM,
                                 capabilities=0, template=_unwrap_template())
    except pkcs11.PKCS11Error as exc:
        if is_backend_failure(exc) and not _backend_answers(ctx, req.kek.token):
            raise
        raise _not_ours(req.kek) from None
    try:
        if bytes(private[Attribute.EC_PARAMS]) != EC_PARAMS[pb.EC_P256]:
            raise _not_ours(req.kek)
        signature = px.ecdsa_der(bytes(private.sign(hashlib.sha256(req.statement).digest(),
                                                    mechanism=Mechanism.ECDSA)))
    finally:
        _destroy_quietly([private])
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), req.key.public_key)
    try:
        public.verify(signature, req.statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise InvalidArgument("key.public_key is not the public half of the wrapped "
                              "device authentication key") from None
    return signature


# ---------------------------------------------------------------------------
# Issuance

def _issuer_key(ctx: WorkerContext, ref: KeyRef) -> tuple[Any, bytes]:
    """The issuer key's private object and its key id (cardcore.issuance.issuer_key_id)."""
    key, spki = _signing_key(ctx, ref.token, ref.label, pb.ISSUER_KEY, "issuer key")
    found = key.get(ObjectClass.PRIVATE_KEY)
    assert found is not None  # _signing_key checked it
    return found[0], issuance.issuer_key_id(ik.ec_point_from_spki(spki))


def _digits(session: Any, length: int) -> bytes:
    """``length`` decimal digits from the HSM's generator (bytes of 250 and above are
    dropped, so every digit is equally likely)."""
    out = bytearray()
    while len(out) < length:
        out += bytes(0x30 + b % 10 for b in session.generate_random(16 * length) if b < 250)
    return bytes(out[:length])


def _seal_codes(session: Any, codes: Codes) -> tuple[bytes, bytes, bytes]:
    """PIN, PUK and RSA-OAEP-SHA1(mailer key, PIN || 00 || PUK): SHA-1 because the mailing
    house opens it in its own HSM, and SoftHSM 2.6 does RSA-OAEP with SHA-1 only."""
    pin, puk = _digits(session, codes.pin_length), _digits(session, codes.puk_length)
    mailer = load_der_public_key(codes.mailer_public_key)
    assert isinstance(mailer, rsa.RSAPublicKey)  # the frontend checked it
    return pin, puk, mailer.encrypt(pin + b"\x00" + puk, _OAEP_SHA1)


def _seal_bundle(item: Item, bundle: bytes) -> bytes:
    n = int.from_bytes(item.device_key.modulus, "big")
    e = int.from_bytes(item.device_key.exponent, "big")
    return rsa.RSAPublicNumbers(e, n).public_key().encrypt(bundle, _OAEP_SHA1)


def _issue_one(session: Any, seed: bytearray, signer: Any, key_id: bytes, item: Item,
               codes: Codes | None) -> Issued:
    user = bip32.user_key(seed, item.element)
    pin = puk = None
    mailer_data = b""
    if codes is not None:
        pin, puk, mailer_data = _seal_codes(session, codes)
    ciphertext = _seal_bundle(item, perso.encode_bundle(perso.SecretBundle(
        user.key.to_bytes(32, "big"), item.device_auth_public_key, pin, puk)))
    binding = perso.Binding(item.serial, perso.device_key_fingerprint(item.device_key),
                            item.issuance_id, item.sequence, key_id)
    signed = perso.signed_part(binding, ciphertext)
    signature = px.ecdsa_der(bytes(signer.sign(hashlib.sha256(signed).digest(),
                                               mechanism=Mechanism.ECDSA)))
    return Issued(item.serial, perso.encode_payload(signed, signature), bip32.public_key(user),
                  mailer_data)


@operation("issuer.issue", idempotent=True)
def issue(ctx: WorkerContext, req: IssueGroup) -> list[Issued]:
    """The payloads of a group of cards: one reading of the seed, each user key derived,
    sealed and signed inside this call; the seed is zeroed before the answer."""
    signer, key_id = _issuer_key(ctx, req.issuer)
    session = ctx.backend.session(req.seed.token)
    with _seed(ctx, req.seed) as seed:
        issued = []
        for index, item in enumerate(req.items):
            try:
                issued.append(_issue_one(session, seed, signer, key_id, item, req.codes))
            except (bip32.Bip32Error, perso.PayloadError, ValueError) as exc:
                raise InvalidArgument(f"items[{req.first + index}] (serial {item.serial}): "
                                      f"{exc}") from None
        return issued


# ---------------------------------------------------------------------------
# Files signed by the issuer key

def _issuer_certificate(ctx: WorkerContext, ref: KeyRef, key: ResolvedKey, spki: bytes
                        ) -> bytes:
    """The issuer key's self-signed certificate beside it in the token, made on first use.

    CMS names its signer by a certificate, and ``openssl cms -verify`` checks a
    signature only against one: the issuer's own, self-signed (CA:FALSE,
    digitalSignature), which carries nothing but the issuer key. A verifier
    trusts it by comparing its key with the issuer key it knows (IssuerKeys).
    """
    version = keynames.parse_issuer_key_label(ref.label)
    assert version is not None
    found = list(ctx.backend.session(ref.token).get_objects(
        {Attribute.LABEL: ref.label, Attribute.CLASS: ObjectClass.CERTIFICATE}))
    if found:
        return certificate_beside(ctx, ref.token, ref.label, spki, "issuer key")
    der = sign_with(key, px.issuer_certificate(
        version=version, spki_der=spki, serial=random_serial(ctx, ref.token), now=px.utc_now()))
    ctx.backend.session(ref.token).create_object(
        certificate_template(ref.label, der, pb.ISSUER_KEY))
    return der


@operation("issuer.sign_file", idempotent=False)
def sign_file(ctx: WorkerContext, req: SignFile) -> FileSignature:
    """A detached CMS SignedData by the issuer key over content whose SHA-256 is given
    (the signed attributes built here, as for the provider's packs)."""
    key, spki = _signing_key(ctx, req.issuer.token, req.issuer.label, pb.ISSUER_KEY,
                             "issuer key")
    der = _issuer_certificate(ctx, req.issuer, key, spki)
    now = px.utc_now()
    signature = sign_with(key, px.pack_signature(root=px.read_root(der), sha256=req.sha256,
                                                 signing_time=now))
    return FileSignature(signature, now)
