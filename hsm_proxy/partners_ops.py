"""Worker operations of BureauHsm and MailerHsm: the bureau's signing key, the mailer's key.

The bureau key is a signing pair like the provider's root
(``keyspec.generate_signing_pair``, checked by ``provider_ops._signing_key``)
with its self-signed certificate beside it in the token, made with the key:
CMS names its signer by a certificate, and the issuer trusts the bureau by
that certificate (``cms bureaus trust``). It signs only the detached CMS
signature built here over a file's SHA-256 (``provider_x509.pack_signature``).

The mailer key is an RSA-2048 pair (``key_classes.MAILER_TEMPLATE``): the
private half decrypts with CKM_RSA_PKCS_OAEP (SHA-1, MGF1-SHA1, the only
hash SoftHSM 2.6 takes for OAEP) inside the token. The plaintext, PIN and
PUK, is in the worker's memory from the decryption until the answer leaves:
the one place PINs leave an HSM in clear, for the mailing house to print them
(docs/threat-model.md). Anything that is not ``PIN || 00 || PUK`` is refused
without a word about its content, so the key is no decryption oracle.
"""

from __future__ import annotations

from typing import NamedTuple

import pkcs11
from pkcs11 import MGF, Mechanism, ObjectClass

from cardcore.pin_block import PinBlockError, check_code
from cms import keynames
from cms.runtime.errors import FailedPrecondition, InvalidArgument
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy import provider_x509 as px
from hsm_proxy.backend import ResolvedKey
from hsm_proxy.key_blocks_ops import _destroy_quietly, _require_free
from hsm_proxy.keyspec import generate_mailer_pair, generate_signing_pair, spki_der
from hsm_proxy.provider_ops import (
    _signing_key,
    certificate_beside,
    certificate_template,
    random_serial,
    sign_with,
)
from hsm_proxy.registry import WorkerContext, operation

OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
"""RSA-OAEP's parameters for mailer data: SHA-1, MGF1-SHA1, no label."""
MAILER_DATA_LENGTH = 256
"""An RSA-2048 ciphertext."""


class PartnerRef(NamedTuple):
    token: str
    label: str


class SignFile(NamedTuple):
    bureau: PartnerRef
    sha256: bytes


class OpenMailerData(NamedTuple):
    mailer: PartnerRef
    mailer_data: bytes


class Codes(NamedTuple):
    pin: bytes
    puk: bytes


def _name(ref: PartnerRef) -> str:
    parsed = keynames.parse_partner_label(ref.label)
    assert parsed is not None  # the frontend made the label
    return parsed[1]


# ---------------------------------------------------------------------------
# The bureau key

def _bureau(ctx: WorkerContext, ref: PartnerRef) -> tuple[ResolvedKey, bytes]:
    """The bureau key and its certificate, both checked."""
    key, spki = _signing_key(ctx, ref.token, ref.label, pb.BUREAU_KEY, "bureau key")
    return key, certificate_beside(ctx, ref.token, ref.label, spki, "bureau key")


@operation("bureau.create", idempotent=False)
def create_bureau_key(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    """The bureau key and its self-signed certificate, both in the token."""
    _require_free(ctx, ref.token, ref.label)
    made = generate_signing_pair(ctx.backend.session(ref.token), ref.label, pb.BUREAU_KEY)
    ctx.backend.forget(ref.token, ref.label)
    try:
        key, spki = _signing_key(ctx, ref.token, ref.label, pb.BUREAU_KEY, "bureau key")
        der = sign_with(key, px.signer_certificate(
            common_name=_name(ref), spki_der=spki,
            serial=random_serial(ctx, ref.token), now=px.utc_now()))
        ctx.backend.session(ref.token).create_object(
            certificate_template(ref.label, der, pb.BUREAU_KEY))
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(ref.token, ref.label)
        raise
    return der


@operation("bureau.get", idempotent=True)
def get_bureau_certificate(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    return _bureau(ctx, ref)[1]


@operation("bureau.sign_file", idempotent=True)
def sign_bureau_file(ctx: WorkerContext, req: SignFile) -> bytes:
    """A detached CMS SignedData by the bureau key over content whose SHA-256 is given."""
    key, der = _bureau(ctx, req.bureau)
    return sign_with(key, px.pack_signature(root=px.read_root(der), sha256=req.sha256,
                                            signing_time=px.utc_now()))


# ---------------------------------------------------------------------------
# The mailer key

def _mailer(ctx: WorkerContext, ref: PartnerRef) -> tuple[ResolvedKey, bytes]:
    """The mailer key when it matches its class (template, GENERATED, RSA-2048), and its
    public key (SPKI DER)."""
    kc.require_role(ref.label, {pb.MAILER_KEY}, "mailer key")
    key = ctx.backend.key(ref.token, ref.label)
    if key.conformance:
        raise kc.KeyClassError(f"mailer key {ref.label!r} on token {ref.token!r} does not "
                               f"match its class: {key.conformance}")
    private = key.get(ObjectClass.PRIVATE_KEY)
    public = key.get(ObjectClass.PUBLIC_KEY)
    if private is None or public is None or private[1].algorithm != pb.RSA_2048:
        raise kc.KeyClassError(f"mailer key {ref.label!r} on token {ref.token!r} is not an "
                               f"RSA-2048 pair")
    der = spki_der(key.attrs)
    if der is None:
        raise FailedPrecondition(f"mailer key {ref.label!r} on token {ref.token!r} has no "
                                 f"readable public key")
    return key, der


@operation("mailer.create", idempotent=False)
def create_mailer_key(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    _require_free(ctx, ref.token, ref.label)
    made = generate_mailer_pair(ctx.backend.session(ref.token), ref.label)
    ctx.backend.forget(ref.token, ref.label)
    try:
        return _mailer(ctx, ref)[1]
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(ref.token, ref.label)
        raise


@operation("mailer.get", idempotent=True)
def get_mailer_key(ctx: WorkerContext, ref: PartnerRef) -> bytes:
    return _mailer(ctx, ref)[1]


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
                                           mechanism_param=OAEP_SHA1))
    except (pkcs11.EncryptedDataInvalid, pkcs11.EncryptedDataLenRange,
            pkcs11.ArgumentsBad):
        raise InvalidArgument(NOT_MAILER_DATA) from None
    try:
        return split_codes(plaintext)
    except ValueError:
        raise InvalidArgument(NOT_MAILER_DATA) from None
