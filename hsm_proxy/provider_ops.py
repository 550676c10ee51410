"""Worker operations of ProviderCa and IssuerKeys: the provider's root and the issuer keys.

Both classes are P-256 signing pairs generated in their token
(``key_classes.SIGNING_PAIR_TEMPLATE``, origin GENERATED), checked against
that template, their algorithm and origin before every use. The root's
self-signed CA certificate is a CKO_CERTIFICATE object beside the key, under
the same label: every operation reads it from the token, and takes it only
when it carries the root's public key and the root's own signature, so a
certificate planted beside the key cannot change what is issued.

What the root key signs is built here (``hsm_proxy.provider_x509``) from the
checked inputs of the request: the HSM signs the SHA-256 of a
TBSCertificate or of a CMS signed-attribute set the proxy made (CKM_ECDSA
on a digest the worker computes: the same ECDSA-SHA256 on every token),
and certificate serials come from the token's random generator.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pkcs11 import Attribute, CertificateType, Mechanism, ObjectClass

from cms import keynames
from cms.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy import provider_x509 as px
from hsm_proxy.backend import ResolvedKey
from hsm_proxy.key_blocks_ops import _destroy_quietly, _require_free
from hsm_proxy.keyspec import finish, generate_signing_pair, spki_der
from hsm_proxy.registry import WorkerContext, operation


class CreateRoot(NamedTuple):
    token: str
    label: str
    provider_id: str
    validity_days: int


class RootRef(NamedTuple):
    token: str
    label: str


class CardKeys(NamedTuple):
    """A card's checked public keys (canonical SubjectPublicKeyInfo DER)."""

    serial: str
    device: bytes
    issuer_auth: bytes


class IssueCard(NamedTuple):
    """One card of an IssueCardCertificates call: one item of its batch across workers."""

    token: str
    label: str
    provider_id: str
    card: CardKeys
    validity_days: int          # 0: the default, within the root's validity
    now: datetime               # the call's time, the same for every card
    call_id: str                # the root is read and checked once per call and worker


class Issued(NamedTuple):
    serial: str
    device: bytes
    issuer_auth: bytes


class SignPack(NamedTuple):
    token: str
    label: str
    sha256: bytes


class PackSignature(NamedTuple):
    signature: bytes
    signing_time: datetime


class IssuerKeyRef(NamedTuple):
    token: str
    version: int                # 0: the newest


class IssuerKeyAnswer(NamedTuple):
    label: str
    version: int
    public_key: bytes


# ---------------------------------------------------------------------------
# Keys of the two classes

PAIR_NAMES = {pb.EC_P256: "P-256", pb.RSA_2048: "RSA-2048"}


def _signing_key(ctx: WorkerContext, token: str, label: str, role: int, what: str
                 ) -> tuple[ResolvedKey, bytes]:
    """The key of ``role`` under ``label`` with its public key (SPKI DER), when it matches
    its class: template, GENERATED origin, P-256; KeyClassError otherwise."""
    return generated_pair(ctx, token, label, role, what, pb.EC_P256)


def generated_pair(ctx: WorkerContext, token: str, label: str, role: int, what: str,
                   algorithm: int) -> tuple[ResolvedKey, bytes]:
    """The pair of ``role`` under ``label`` with its public key (SPKI DER), when it matches
    its class: template, GENERATED origin, ``algorithm``; KeyClassError otherwise."""
    kc.require_role(label, {role}, what)
    key = ctx.backend.key(token, label)
    if key.conformance:
        raise kc.KeyClassError(f"{what} {label!r} on token {token!r} does not match its "
                               f"class: {key.conformance}")
    private = key.get(ObjectClass.PRIVATE_KEY)
    public = key.get(ObjectClass.PUBLIC_KEY)
    tag = kc.decode_tag(bytes(key.attrs[key.main()].get(Attribute.ID) or b""))
    if private is None or public is None or tag is None or tag.origin != pb.GENERATED:
        raise kc.KeyClassError(f"{what} {label!r} on token {token!r} is not a pair the "
                               f"proxy generated")
    if public[1].algorithm != algorithm or private[1].algorithm != algorithm:
        raise kc.KeyClassError(f"{what} {label!r} on token {token!r} is not a "
                               f"{PAIR_NAMES[algorithm]} key")
    der = spki_der(key.attrs)
    if der is None:
        raise FailedPrecondition(f"{what} {label!r} on token {token!r} has no readable "
                                 f"public key")
    return key, der


def sign_with(key: ResolvedKey, to_sign: px.ToSign) -> bytes:
    found = key.get(ObjectClass.PRIVATE_KEY)
    assert found is not None  # _signing_key checked it
    return to_sign.finish(bytes(found[0].sign(to_sign.digest, mechanism=Mechanism.ECDSA)))


def random_serial(ctx: WorkerContext, token: str) -> int:
    return px.positive_serial(bytes(ctx.backend.session(token).generate_random(
        px.SERIAL_BYTES * 8)))


# ---------------------------------------------------------------------------
# The root certificate in the token

def certificate_template(label: str, der: bytes, role: int = pb.PROVIDER_ROOT
                         ) -> dict[Attribute, Any]:
    """A certificate object beside the key ``label`` of ``role`` (the root's, an issuer
    key's), neither modifiable nor copyable."""
    root = px.read_root(der)
    tbs = root.certificate["tbs_certificate"]
    return finish({
        Attribute.CLASS: ObjectClass.CERTIFICATE,
        Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.COPYABLE: False,
        Attribute.LABEL: label,
        Attribute.ID: kc.Tag(role, pb.GENERATED).encode(),
        Attribute.SUBJECT: tbs["subject"].dump(),
        Attribute.ISSUER: tbs["issuer"].dump(),
        Attribute.SERIAL_NUMBER: tbs["serial_number"].dump(),
        Attribute.VALUE: der,
    })


def _self_signed_by(der: bytes, spki: bytes) -> bool:
    """Whether the certificate ``der`` carries ``spki`` and is signed by its key."""
    try:
        if px.certificate_spki(der) != spki:
            return False
        cert = px.read_root(der).certificate
        public = load_der_public_key(spki)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(cert["signature_value"].native, cert["tbs_certificate"].dump(),
                      ec.ECDSA(hashes.SHA256()))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def certificate_beside(ctx: WorkerContext, token: str, label: str, spki: bytes,
                       what: str = "root") -> bytes:
    """The one certificate under ``label``, when it carries ``spki`` and that key's own
    signature (a planted certificate, or a second one, stops the key's use)."""
    found = list(ctx.backend.session(token).get_objects(
        {Attribute.LABEL: label, Attribute.CLASS: ObjectClass.CERTIFICATE}))
    if not found:
        raise FailedPrecondition(f"{what} {label!r} on token {token!r} has no certificate "
                                 f"beside its key")
    if len(found) > 1:
        raise FailedPrecondition(f"{what} {label!r} on token {token!r} has more than one "
                                 f"certificate; the proxy refuses ambiguous labels")
    der = bytes(found[0][Attribute.VALUE])
    if not _self_signed_by(der, spki):
        raise kc.KeyClassError(f"the certificate beside {what} {label!r} on token {token!r} "
                               f"is not the {what}'s own self-signed certificate")
    return der


def _root(ctx: WorkerContext, token: str, label: str) -> tuple[ResolvedKey, bytes]:
    key, spki = _signing_key(ctx, token, label, pb.PROVIDER_ROOT, "root")
    return key, certificate_beside(ctx, token, label, spki)


@operation("provider.create_root", idempotent=False)
def create_root(ctx: WorkerContext, req: CreateRoot) -> bytes:
    """The root key and its self-signed CA certificate, both in the token."""
    if keynames.parse_provider_root_label(req.label) != req.provider_id:
        raise InvalidArgument(f"label {req.label!r} does not name provider {req.provider_id!r}")
    _require_free(ctx, req.token, req.label)
    session = ctx.backend.session(req.token)
    made = generate_signing_pair(session, req.label, pb.PROVIDER_ROOT)
    ctx.backend.forget(req.token, req.label)
    try:
        key, spki = _signing_key(ctx, req.token, req.label, pb.PROVIDER_ROOT, "root")
        der = sign_with(key, px.root_certificate(
            provider_id=req.provider_id, spki_der=spki, serial=random_serial(ctx, req.token),
            now=px.utc_now(), validity_days=req.validity_days))
        session.create_object(certificate_template(req.label, der))
    except BaseException:
        _destroy_quietly(made)
        ctx.backend.forget(req.token, req.label)
        raise
    return der


@operation("provider.get_root", idempotent=True)
def get_root(ctx: WorkerContext, req: RootRef) -> bytes:
    return _root(ctx, req.token, req.label)[1]


def _card_validity(root: px.Root, now: datetime, requested: int) -> int:
    rest = px.days_left(root, now)
    if rest < 1:
        raise FailedPrecondition("the root certificate has expired or expires within a day")
    if requested == 0:
        return min(px.CARD_VALIDITY_DAYS, rest)
    if requested > rest:
        raise InvalidArgument(f"validity_days: {requested} goes beyond the root "
                              f"certificate, which is valid for {rest} more days")
    return requested


_call_root: dict[tuple[str, str, str, int], tuple[ResolvedKey, px.Root]] = {}
"""The root as checked for the call running in this worker (one entry: the last call)."""


def _root_for_call(ctx: WorkerContext, req: IssueCard) -> tuple[ResolvedKey, px.Root]:
    key = (req.call_id, req.token, req.label, ctx.backend.generation)
    found = _call_root.get(key)
    if found is None:
        resolved, der = _root(ctx, req.token, req.label)
        found = (resolved, px.read_root(der))
        _call_root.clear()
        _call_root[key] = found
    return found


@operation("provider.issue", idempotent=True)
def issue_card(ctx: WorkerContext, req: IssueCard) -> Issued:
    """The two end-entity certificates of one card, issued by the root (nothing is
    stored: running it again issues two new certificates)."""
    key, root = _root_for_call(ctx, req)
    days = _card_validity(root, req.now, req.validity_days)

    def certificate(use: px.CardKeyUse, spki: bytes) -> bytes:
        return sign_with(key, px.card_certificate(
            root=root, provider_id=req.provider_id, serial=req.card.serial, use=use,
            spki_der=spki, certificate_serial=random_serial(ctx, req.token), now=req.now,
            validity_days=days))

    return Issued(req.card.serial, certificate(px.DEVICE_KEY, req.card.device),
                  certificate(px.ISSUER_AUTH_KEY, req.card.issuer_auth))


@operation("provider.sign_pack", idempotent=True)
def sign_pack(ctx: WorkerContext, req: SignPack) -> PackSignature:
    """A detached CMS SignedData over a pack whose SHA-256 is given."""
    key, der = _root(ctx, req.token, req.label)
    now = px.utc_now()
    signature = sign_with(key, px.pack_signature(root=px.read_root(der), sha256=req.sha256,
                                             signing_time=now))
    return PackSignature(signature, now)


# ---------------------------------------------------------------------------
# Issuer keys

@operation("issuer.create", idempotent=False)
def create_issuer_key(ctx: WorkerContext, req: IssuerKeyRef) -> IssuerKeyAnswer:
    label = keynames.issuer_key_label(req.version)
    _require_free(ctx, req.token, label)
    generate_signing_pair(ctx.backend.session(req.token), label, pb.ISSUER_KEY)
    ctx.backend.forget(req.token, label)
    return _issuer_key(ctx, req.token, label)


def _issuer_key(ctx: WorkerContext, token: str, label: str) -> IssuerKeyAnswer:
    version = keynames.parse_issuer_key_label(label)
    assert version is not None
    _, spki = _signing_key(ctx, token, label, pb.ISSUER_KEY, "issuer key")
    return IssuerKeyAnswer(label, version, spki)


def newest_issuer_label(ctx: WorkerContext, token: str) -> str:
    versions = []
    for obj in ctx.backend.list_objects(token, ObjectClass.PUBLIC_KEY):
        version = keynames.parse_issuer_key_label(str(obj[Attribute.LABEL] or ""))
        if version is not None:
            versions.append(version)
    if not versions:
        raise NotFound(f"no issuer key on token {token!r}")
    return keynames.issuer_key_label(max(versions))


@operation("issuer.get", idempotent=True)
def get_issuer_key(ctx: WorkerContext, req: IssuerKeyRef) -> IssuerKeyAnswer:
    label = (keynames.issuer_key_label(req.version) if req.version
             else newest_issuer_label(ctx, req.token))
    return _issuer_key(ctx, req.token, label)
