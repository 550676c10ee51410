"""Worker operations of BureauHsm and MailerHsm: the bureau's signing key, the mailer's key.

The bureau key is a signing pair like the provider's root
(``keyspec.generate_signing_pair``, checked by ``provider_ops._signing_key``)
with its self-signed certificate beside it in the token, made with the key:
CMS names its signer by a certificate, and the issuer trusts the bureau by
that certificate (``cms bureaus trust``). It signs only the detached CMS
signature built here over a file's SHA-256 (``provider_x509.pack_signature``).

Beside it the codes key (``key_classes.BUREAU_CODES_TEMPLATE``, HMAC-SHA256,
SIGN only) makes the PIN and PUK of each card the bureau personalizes
(claim 5): ``seal_card_codes`` signs the proxy's own derivation input
(a context, the file serial, the card serial) with CKM_SHA256_HMAC, reads
decimal digits from the output, and seals them at once: in the card's SET
PIN block to its device key over its challenge, and as mailer data to the
mailing house's key. The digits exist in the worker's memory for that one
operation (as the issuer HSM's own PINs do, ``issuer_ops``); being derived,
they are the same on every call, which is what lets an interrupted batch
resume without a PIN the bureau would have to keep.

The mailing house's signing key (``mailer-sign/<name>``) is a signing pair
made and used exactly as the bureau key is: it signs only the detached CMS
signature over a dispatch confirmation's SHA-256, and the issuer trusts
the mailing house by its certificate (``cms mailers trust``).

The mailer key is an RSA-2048 pair (``key_classes.MAILER_TEMPLATE``): the
private half decrypts with CKM_RSA_PKCS_OAEP (SHA-1, MGF1-SHA1, the only
hash SoftHSM 2.6 takes for OAEP) inside the token. The plaintext, PIN and
PUK, is in the worker's memory from the decryption until the answer leaves:
the one place PINs leave an HSM in clear, for the mailing house to print them
(docs/threat-model.md). Anything that is not ``PIN || 00 || PUK`` is refused
without a word about its content, so the key is no decryption oracle.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import MGF, KeyType, Mechanism, ObjectClass

from cardcore.issuance import RsaPublic
from cardcore.pin_block import OAEP_SHA1, PinBlockError, check_code, set_pin
from cms import keynames
from cms.runtime.errors import InvalidArgument
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy import provider_x509 as px
from hsm_proxy.backend import ResolvedKey
from hsm_proxy.issuer_ops import _conforming
from hsm_proxy.key_blocks_ops import _destroy_quietly, _require_free
from hsm_proxy.keyspec import (
    generate_mailer_pair,
    generate_signing_pair,
    object_template,
)
from hsm_proxy.provider_ops import (
    _signing_key,
    certificate_beside,
    certificate_template,
    generated_pair,
    random_serial,
    sign_with,
)
from hsm_proxy.registry import WorkerContext, operation

OAEP_SHA1_PARAMS = (Mechanism.SHA_1, MGF.SHA1, None)
"""RSA-OAEP's parameters for mailer data: SHA-1, MGF1-SHA1, no label."""
MAILER_DATA_LENGTH = 256
"""An RSA-2048 ciphertext."""


class PartnerRef(NamedTuple):
    token: str
    label: str


class SignFile(NamedTuple):
    signer: PartnerRef
    sha256: bytes


class SealCodes(NamedTuple):
    codes_key: PartnerRef
    file_serial: bytes
    serial: str
    device_key: RsaPublic       # checked RSA-2048, e = 65537
    challenge: bytes
    mailer_public_key: bytes    # SubjectPublicKeyInfo DER, checked RSA
    pin_length: int
    puk_length: int


class SealedCodes(NamedTuple):
    set_pin: bytes
    mailer_data: bytes


class OpenMailerData(NamedTuple):
    mailer: PartnerRef
    mailer_data: bytes


class MailerKeys(NamedTuple):
    public_key: bytes   # the mailer key's SubjectPublicKeyInfo DER
    certificate: bytes  # the signing key's self-signed certificate, DER


class Codes(NamedTuple):
    pin: bytes
    puk: bytes


def _name(ref: PartnerRef) -> str:
    parsed = keynames.parse_partner_label(ref.label)
    assert parsed is not None  # the frontend made the label
    return parsed[1]


# ---------------------------------------------------------------------------
# The bureau key

class Signer(NamedTuple):
    """A partner's signing class: the bureau key, the mailing house's signing key."""
    role: int
    what: str


BUREAU_SIGNER = Signer(pb.BUREAU_KEY, "bureau key")
MAILER_SIGNER = Signer(pb.MAILER_SIGN_KEY, "mailer signing key")


def _signer(ctx: WorkerContext, ref: PartnerRef, signer: Signer) -> tuple[ResolvedKey, bytes]:
    """The signing key and its certificate, both checked."""
    key, spki = _signing_key(ctx, ref.token, ref.label, signer.role, signer.what)
    return key, certificate_beside(ctx, ref.token, ref.label, spki, signer.what)


def _make_signer(ctx: WorkerContext, ref: PartnerRef, signer: Signer
                 ) -> tuple[list[pkcs11.Object], bytes]:
    """A signing pair and its self-signed certificate (CN=<name>) in the token: the objects
    made, for the caller to destroy should a later step fail, and the certificate."""
    made = generate_signing_pair(ctx.backend.session(ref.token), ref.label, signer.role)
    ctx.backend.forget(ref.token, ref.label)
    try:
        key, spki = _signing_key(ctx, ref.token, ref.label, signer.role, signer.what)
        der = sign_with(key, px.signer_certificate(
            common_name=_name(ref), spki_der=spki,
            serial=random_serial(ctx, ref.token), now=px.utc_now()))
        made.append(ctx.backend.session(ref.token).create_object(
            certificate_template(ref.label, der, signer.role)))
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(ref.token, ref.label)
        raise
    return made, der


def _sign_file(ctx: WorkerContext, req: SignFile, signer: Signer) -> bytes:
    """A detached CMS SignedData by the signing key over content whose SHA-256 is given."""
    key, der = _signer(ctx, req.signer, signer)
    return sign_with(key, px.pack_signature(root=px.read_root(der), sha256=req.sha256,
                                            signing_time=px.utc_now()))


def _codes_label(ref: PartnerRef) -> str:
    return keynames.partner_label(keynames.BUREAU_CODES, _name(ref))


def _make_codes_key(ctx: WorkerContext, ref: PartnerRef) -> list[pkcs11.Object]:
    label = _codes_label(ref)
    _require_free(ctx, ref.token, label)
    template = object_template(kc.BUREAU_CODES_TEMPLATE, label=label,
                               tag=kc.Tag(pb.BUREAU_CODES_KEY, pb.GENERATED), token_object=True,
                               key_type=KeyType.GENERIC_SECRET,
                               value_len=kc.BUREAU_CODES_BYTES)
    made = [ctx.backend.session(ref.token).generate_key(
        KeyType.GENERIC_SECRET, kc.BUREAU_CODES_BYTES * 8, capabilities=0, template=template,
        mechanism=Mechanism.GENERIC_SECRET_KEY_GEN)]
    ctx.backend.forget(ref.token, label)
    return made


@operation("bureau.create", idempotent=False)
def create_bureau_key(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    """The bureau key with its self-signed certificate, and its codes key, in the token."""
    _require_free(ctx, ref.token, ref.label)
    _require_free(ctx, ref.token, _codes_label(ref))
    made, der = _make_signer(ctx, ref, BUREAU_SIGNER)
    try:
        made += _make_codes_key(ctx, ref)
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(ref.token, ref.label)
        ctx.backend.forget(ref.token, _codes_label(ref))
        raise
    return der


@operation("bureau.get", idempotent=True)
def get_bureau_certificate(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    return _signer(ctx, ref, BUREAU_SIGNER)[1]


@operation("bureau.sign_file", idempotent=True)
def sign_bureau_file(ctx: WorkerContext, req: SignFile) -> bytes:
    return _sign_file(ctx, req, BUREAU_SIGNER)


CODES_CONTEXT = b"cms bureau pin and puk v1"


def derivation_input(file_serial: bytes, serial: str, counter: int) -> bytes:
    """What the codes key signs for one card: a context, the file serial, the card serial
    (length-prefixed) and a block counter."""
    card = serial.encode("ascii")
    return (CODES_CONTEXT + bytes([len(file_serial)]) + file_serial + bytes([len(card)])
            + card + counter.to_bytes(4, "big"))


def digits(blocks: Iterator[bytes], count: int) -> bytes:
    """``count`` decimal digits from a stream of pseudorandom blocks (bytes of 250 and above
    dropped, so every digit is equally likely)."""
    out = bytearray()
    for block in blocks:
        out += bytes(0x30 + b % 10 for b in block if b < 250)
        if len(out) >= count:
            return bytes(out[:count])
    raise AssertionError("the block stream ended")  # pragma: no cover - it never ends


@operation("bureau.seal_codes", idempotent=True)
def seal_card_codes(ctx: WorkerContext, req: SealCodes) -> SealedCodes:
    """One card's PIN and PUK, derived and sealed in one operation."""
    key = _conforming(ctx, req.codes_key, pb.BUREAU_CODES_KEY, "bureau codes key")
    obj, shape = key.get(ObjectClass.SECRET_KEY)  # type: ignore[misc]
    if shape.key_type != KeyType.GENERIC_SECRET:
        raise kc.KeyClassError(f"bureau codes key {req.codes_key.label!r} is not a generic "
                               f"secret")

    def blocks() -> Iterator[bytes]:
        counter = 0
        while True:
            yield bytes(obj.sign(derivation_input(req.file_serial, req.serial, counter),
                                 mechanism=Mechanism.SHA256_HMAC))
            counter += 1

    stream = blocks()
    both = digits(stream, req.pin_length + req.puk_length)
    pin, puk = both[:req.pin_length], both[req.pin_length:]
    mailer = load_der_public_key(req.mailer_public_key)
    assert isinstance(mailer, rsa.RSAPublicKey)  # the frontend checked it
    return SealedCodes(set_pin(req.device_key, req.challenge, pin, puk),
                       mailer.encrypt(pin + b"\x00" + puk, OAEP_SHA1))


# ---------------------------------------------------------------------------
# The mailer key

def _mailer(ctx: WorkerContext, ref: PartnerRef) -> tuple[ResolvedKey, bytes]:
    """The mailer key when it matches its class (template, GENERATED, RSA-2048), and its
    public key (SPKI DER)."""
    return generated_pair(ctx, ref.token, ref.label, pb.MAILER_KEY, "mailer key", pb.RSA_2048)


def signing_ref(ref: PartnerRef) -> PartnerRef:
    """The mailing house's signing key beside its mailer key: ``mailer-sign/<name>``."""
    return PartnerRef(ref.token, keynames.partner_label(keynames.MAILER_SIGN, _name(ref)))


@operation("mailer.create", idempotent=False)
def create_mailer_key(ctx: WorkerContext, ref: PartnerRef) -> MailerKeys:
    """The mailer key and the signing key with its self-signed certificate, in the token."""
    sign = signing_ref(ref)
    _require_free(ctx, ref.token, ref.label)
    _require_free(ctx, sign.token, sign.label)
    made = generate_mailer_pair(ctx.backend.session(ref.token), ref.label)
    ctx.backend.forget(ref.token, ref.label)
    try:
        public_key = _mailer(ctx, ref)[1]
        signing, der = _make_signer(ctx, sign, MAILER_SIGNER)
        made += signing
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(ref.token, ref.label)
        raise
    return MailerKeys(public_key, der)


@operation("mailer.get", idempotent=True)
def get_mailer_key(ctx: WorkerContext, ref: PartnerRef) -> MailerKeys:
    return MailerKeys(_mailer(ctx, ref)[1], _signer(ctx, signing_ref(ref), MAILER_SIGNER)[1])


@operation("mailer.sign_file", idempotent=True)
def sign_mailer_file(ctx: WorkerContext, req: SignFile) -> bytes:
    return _sign_file(ctx, req, MAILER_SIGNER)


def split_codes(plaintext: bytes) -> Codes:
    """PIN and PUK of ``PIN || 00 || PUK``; ValueError (without the content) otherwise."""
    pin, sep, puk = plaintext.partition(b"\x00")
    try:
        if not sep:
            raise PinBlockError("no separator")
        return Codes(check_code(pin), check_code(puk))
    except PinBlockError:
        raise ValueError("not PIN || 00 || PUK") from None


NOT_MAILER_DATA = "mailer_data is not mailer data for this mailer key"


@operation("mailer.open", idempotent=True)
def open_mailer_data(ctx: WorkerContext, req: OpenMailerData) -> Codes:
    key, _ = _mailer(ctx, req.mailer)
    found = key.get(ObjectClass.PRIVATE_KEY)
    assert found is not None  # _mailer checked it
    try:
        plaintext = bytes(found[0].decrypt(req.mailer_data, mechanism=Mechanism.RSA_PKCS_OAEP,
                                           mechanism_param=OAEP_SHA1_PARAMS))
    except (pkcs11.EncryptedDataInvalid, pkcs11.EncryptedDataLenRange,
            pkcs11.ArgumentsBad):
        raise InvalidArgument(NOT_MAILER_DATA) from None
    except pkcs11.GeneralError:
        # SoftHSM 2.6 answers CKR_GENERAL_ERROR to a ciphertext whose OAEP padding does not
        # check, where a backend failure answers it too: the token answering right after
        # tells the two apart, so bad input never costs a reconnect.
        ctx.backend.session(req.mailer.token).generate_random(64)
        raise InvalidArgument(NOT_MAILER_DATA) from None
    try:
        return split_codes(plaintext)
    except ValueError:
        raise InvalidArgument(NOT_MAILER_DATA) from None
