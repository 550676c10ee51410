"""Worker operations of the ``cms.v1.Hsm`` contract (operator keys), on python-pkcs11.

Each operation receives a payload from ``hsm_proxy.messages`` already
validated and authorized by the frontend, checks what only the HSM side can
know (key class and its tag, type, usages, duplicate labels) and returns
plain values or serialized ``KeyInfo`` messages. Errors are
``cms.runtime.errors`` classes with messages that name keys by label or handle
and never carry key material or data.

This service makes and uses OPERATOR_KEY keys only (``hsm_proxy.key_classes``):
never extractable, never wrapping or unwrapping, neither modifiable nor
copyable. Keys of every other class are reached through their purposes
(``key_blocks_ops``, ``card_keys_ops``); here they may only be described and
their public halves read.

Session keys live in the worker that made them as ``KeyState`` objects, named
by the handle the frontend chose.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections import defaultdict
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from cms.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc
from hsm_proxy import messages as m
from hsm_proxy.backend import ResolvedKey, resolve_objects
from hsm_proxy.keyspec import (
    EC_BY_PARAMS,
    EC_PARAMS,
    PRIVATE_USAGES,
    PUBLIC_USAGES,
    RSA_BITS,
    RSA_PUBLIC_EXPONENT,
    KeyShape,
    describe,
    object_template,
    read_attributes,
    require_usage,
    secret_type,
    shape_of,
)
from hsm_proxy.registry import State, WorkerContext, operation

OAEP_SHA1 = (Mechanism.SHA_1, MGF.SHA1, None)
PSS_SHA256 = (Mechanism.SHA256, MGF.SHA256, 32)
AES_BLOCK = 16


class KeyState(State):
    """A session key (or session key pair) behind a handle."""

    kind = "key"

    def __init__(self, key: ResolvedKey):
        self.key = key
        self.token = key.token
        self.label = key.label

    def close(self, ctx: WorkerContext) -> None:
        for obj in self.key.all_objects():
            try:
                obj.destroy()
            except (pkcs11.ObjectHandleInvalid, pkcs11.KeyHandleInvalid):
                pass


# ---------------------------------------------------------------------------
# Helpers

def resolve(ctx: WorkerContext, ref: m.KeyRef) -> ResolvedKey:
    if isinstance(ref, m.HandleRef):
        return ctx.states.get(ref.handle, KeyState).key
    return ctx.backend.key(ref.token, ref.label)


def resolve_operator(ctx: WorkerContext, ref: m.KeyRef) -> ResolvedKey:
    """A key this service may use: an operator key that matches its class."""
    key = resolve(ctx, ref)
    kc.require_role(key.label, {pb.OPERATOR_KEY}, "key")
    if key.handle is None and key.conformance:
        raise kc.KeyClassError(f"key {key.name} does not match its class: {key.conformance}")
    return key


def operator_tag(origin: int) -> kc.Tag:
    return kc.Tag(pb.OPERATOR_KEY, origin)


def need(key: ResolvedKey, cls: ObjectClass, what: str) -> tuple[pkcs11.Object, KeyShape]:
    found = key.get(cls)
    if found is None:
        raise FailedPrecondition(f"key {key.name} has no {what}")
    return found


def need_type(shape: KeyShape, key: ResolvedKey, key_type: KeyType, what: str) -> None:
    if shape.key_type != key_type:
        raise FailedPrecondition(f"key {key.name} is not {what}")


def require_free_label(ctx: WorkerContext, token: str, label: str) -> None:
    if not label:
        raise InvalidArgument("a persistent key needs a label")
    if ctx.backend.label_exists(token, label):
        raise AlreadyExists(f"a key labelled {label!r} already exists on token {token!r}")


def created(ctx: WorkerContext, token: str, template: m.Template,
            objects: list[pkcs11.Object], key_class: int | None = None, *,
            value_len: int = 0) -> bytes:
    """KeyInfo of a new key; a session key is stored under its handle.

    ``value_len``: the secret key's length when the token cannot say (SoftHSM
    2.6.1 reports CKA_VALUE_LEN 0 for unwrapped keys).
    """
    resolved = resolve_objects(token, template.label, objects, handle=template.handle)
    main = resolved.main()
    if value_len and main == ObjectClass.SECRET_KEY \
            and not resolved.attrs[main].get(Attribute.VALUE_LEN):
        resolved.attrs[main][Attribute.VALUE_LEN] = value_len
        resolved.shapes[main] = shape_of(resolved.attrs[main])
    info = describe(resolved.objects[main], key_class=key_class, attrs=resolved.attrs[main],
                    objects=resolved.attrs)
    if template.session:
        assert template.handle is not None
        ctx.states.put(template.handle, KeyState(resolved))
        info.ref.token, info.ref.handle = token, template.handle
    else:
        info.ref.token, info.ref.label = token, template.label
        ctx.backend.forget(token, template.label)
    return info.SerializeToString()


def _destroy_quietly(objects: list[pkcs11.Object]) -> None:
    for obj in objects:
        try:
            obj.destroy()
        except pkcs11.PKCS11Error:
            pass


# ---------------------------------------------------------------------------
# Tokens and listing

@operation("tokens", idempotent=True)
def tokens(ctx: WorkerContext, _payload: Any) -> list[dict[str, Any]]:
    ctx.backend.ensure()
    return ctx.backend.token_infos()


@operation("list_keys", idempotent=True)
def list_keys(ctx: WorkerContext, req: m.ListKeys) -> list[bytes]:
    pattern = req.pattern or "*"
    by_label: dict[str, dict[ObjectClass, tuple[pkcs11.Object, dict]]] = defaultdict(dict)
    session = ctx.backend.session(req.token)
    for obj in session.get_objects({Attribute.TOKEN: True}):
        attrs = read_attributes(obj)
        cls = attrs.get(Attribute.CLASS)
        label = str(attrs.get(Attribute.LABEL) or "")
        if cls not in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            continue
        if not fnmatch.fnmatchcase(label, pattern):
            continue
        by_label[label].setdefault(cls, (obj, attrs))
    out: list[bytes] = []
    for label in sorted(by_label):
        objs = by_label[label]
        chosen: tuple[ObjectClass, int] | None = None
        pair = ObjectClass.PRIVATE_KEY in objs and ObjectClass.PUBLIC_KEY in objs
        want = req.key_class
        if want == pb.SECRET_KEY:
            chosen = (ObjectClass.SECRET_KEY, pb.SECRET_KEY) if ObjectClass.SECRET_KEY in objs \
                else None
        elif want == pb.PRIVATE_KEY:
            chosen = (ObjectClass.PRIVATE_KEY, pb.PRIVATE_KEY) \
                if ObjectClass.PRIVATE_KEY in objs else None
        elif want == pb.PUBLIC_KEY:
            chosen = (ObjectClass.PUBLIC_KEY, pb.PUBLIC_KEY) if ObjectClass.PUBLIC_KEY in objs \
                else None
        elif want == pb.KEY_PAIR:
            chosen = (ObjectClass.PRIVATE_KEY, pb.KEY_PAIR) if pair else None
        elif ObjectClass.SECRET_KEY in objs:
            chosen = (ObjectClass.SECRET_KEY, pb.SECRET_KEY)
        elif pair:
            chosen = (ObjectClass.PRIVATE_KEY, pb.KEY_PAIR)
        else:
            cls = next(iter(objs))
            chosen = (cls, pb.PRIVATE_KEY if cls == ObjectClass.PRIVATE_KEY else pb.PUBLIC_KEY)
        if chosen is None:
            continue
        obj, attrs = objs[chosen[0]]
        info = describe(obj, key_class=chosen[1], attrs=attrs,
                        objects={cls: a for cls, (_, a) in objs.items()})
        info.ref.token, info.ref.label = req.token, label
        out.append(info.SerializeToString())
    return out


# ---------------------------------------------------------------------------
# Generation

@operation("generate_secret", idempotent=False)
def generate_secret(ctx: WorkerContext, req: m.GenerateSecret) -> bytes:
    t = req.template
    key_type, size = secret_type(req.algorithm, req.length_bytes)
    usages = kc.operator_usages(kc.SECRET, t.usages)
    if not t.session:
        require_free_label(ctx, req.token, t.label)
    template = object_template(kc.ObjectTemplate(kc.SECRET, usages), label=t.label,
                               tag=operator_tag(pb.GENERATED), token_object=not t.session,
                               key_type=key_type, value_len=size)
    key = ctx.backend.session(req.token).generate_key(
        key_type, size * 8, capabilities=0, template=template)
    return created(ctx, req.token, t, [key])


def _pair_templates(t: m.Template) -> tuple[dict, dict]:
    """The private half takes the private usages and gives the public half their
    counterparts (SIGN -> VERIFY, DECRYPT -> ENCRYPT); one usage group only."""
    unknown = t.usages - PRIVATE_USAGES - PUBLIC_USAGES
    if unknown:
        raise InvalidArgument("a key pair's usages are SIGN, DECRYPT, DERIVE (private half) "
                              "and VERIFY, ENCRYPT (public half)")
    private_usages = kc.operator_usages(kc.PRIVATE, t.usages & PRIVATE_USAGES)
    public_usages = frozenset(kc.PUBLIC_COUNTERPART[u] for u in private_usages
                              if u in kc.PUBLIC_COUNTERPART)
    extra = (t.usages & PUBLIC_USAGES) - public_usages
    if extra:
        allowed = ", ".join(pb.KeyUsage.Name(u) for u in sorted(public_usages)) or "none"
        raise kc.KeyClassError(f"the public half of this pair has the counterpart of the "
                               f"private usage only ({allowed})")
    tag = operator_tag(pb.GENERATED)
    common = {"label": t.label, "tag": tag, "token_object": not t.session}
    return (object_template(kc.ObjectTemplate(kc.PUBLIC, public_usages, private=False),
                            **common),
            object_template(kc.ObjectTemplate(kc.PRIVATE, private_usages), **common))


@operation("generate_pair", idempotent=False)
def generate_pair(ctx: WorkerContext, req: m.GeneratePair) -> bytes:
    t = req.template
    public, private = _pair_templates(t)
    if req.algorithm in EC_PARAMS:
        key_type, bits = KeyType.EC, None
        public[Attribute.EC_PARAMS] = EC_PARAMS[req.algorithm]
    elif req.algorithm in RSA_BITS:
        key_type, bits = KeyType.RSA, RSA_BITS[req.algorithm]
        if pb.DERIVE in t.usages:
            raise kc.KeyClassError("an RSA key does not derive")
    else:
        raise InvalidArgument(f"{pb.KeyAlgorithm.Name(req.algorithm)} is not a key pair "
                              f"algorithm (use EC_P256, EC_SECP256K1, RSA_2048 or RSA_3072)")
    if not t.session:
        require_free_label(ctx, req.token, t.label)
    pub, priv = ctx.backend.session(req.token).generate_keypair(
        key_type, bits, capabilities=0, public_template=public, private_template=private)
    return created(ctx, req.token, t, [pub, priv], key_class=pb.KEY_PAIR)


# ---------------------------------------------------------------------------
# Derivation

@operation("derive", idempotent=True)
def derive(ctx: WorkerContext, req: m.DeriveItem) -> bytes:
    """An operator key derived from another: of the operator class too, never extractable."""
    base = resolve_operator(ctx, req.base)
    obj, shape = need(base, ObjectClass.SECRET_KEY, "secret key to derive from")
    need_type(shape, base, KeyType.AES, "an AES key")
    require_usage(shape, pb.DERIVE, base.name)
    key_type, size = secret_type(req.algorithm, req.length_bytes)
    t = req.template
    usages = kc.operator_usages(kc.SECRET, t.usages)
    token = base.token
    if not t.session:
        require_free_label(ctx, token, t.label)
    if req.mechanism == pb.AES_ECB_ENCRYPT_DATA:
        mechanism, param = Mechanism.AES_ECB_ENCRYPT_DATA, req.data
    else:
        mechanism, param = Mechanism.AES_CBC_ENCRYPT_DATA, (req.iv, req.data)
    template = object_template(kc.ObjectTemplate(kc.SECRET, usages), label=t.label,
                               tag=operator_tag(pb.DERIVED), token_object=not t.session,
                               key_type=key_type, value_len=size)
    new = obj.derive_key(key_type, size * 8, capabilities=0, mechanism=mechanism,
                         mechanism_param=param, template=template)
    return created(ctx, token, t, [new])


# ---------------------------------------------------------------------------
# Public keys

@operation("import_public", idempotent=False)
def import_public(ctx: WorkerContext, req: m.ImportPublic) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    t = req.template
    try:
        public = serialization.load_der_public_key(req.der)
    except ValueError:
        raise InvalidArgument("public_key_der is not a DER SubjectPublicKeyInfo") from None
    usages = kc.operator_usages(kc.PUBLIC, t.usages)
    template = object_template(kc.ObjectTemplate(kc.PUBLIC, usages, private=False),
                               label=t.label, tag=operator_tag(pb.IMPORTED),
                               token_object=not t.session)
    if isinstance(public, ec.EllipticCurvePublicKey):
        algorithm = {"secp256r1": pb.EC_P256, "secp256k1": pb.EC_SECP256K1}.get(public.curve.name)
        if algorithm is None:
            raise InvalidArgument(f"EC curve {public.curve.name} is not supported "
                                  f"(P-256 and secp256k1 are)")
        point = public.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.UncompressedPoint)
        template.update({Attribute.KEY_TYPE: KeyType.EC,
                         Attribute.EC_PARAMS: EC_PARAMS[algorithm],
                         Attribute.EC_POINT: bytes([0x04, len(point)]) + point})
    elif isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        if public.key_size not in RSA_BITS.values():
            raise InvalidArgument(f"RSA-{public.key_size} is not supported (2048 and 3072 are)")
        template.update({
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
            Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8,
                                                          "big"),
        })
    else:
        raise InvalidArgument("only EC (P-256, secp256k1) and RSA public keys can be imported")
    if not t.session:
        require_free_label(ctx, req.token, t.label)
    obj = ctx.backend.session(req.token).create_object(template)
    return created(ctx, req.token, t, [obj])


# ---------------------------------------------------------------------------
# Ciphers, signatures, MACs

@operation("cipher", idempotent=True)
def cipher(ctx: WorkerContext, req: m.CipherItem) -> bytes:
    key = resolve_operator(ctx, req.key)
    usage = pb.DECRYPT if req.decrypt else pb.ENCRYPT
    if req.mechanism in (pb.CIPHER_AES_ECB, pb.CIPHER_AES_CBC):
        obj, shape = need(key, ObjectClass.SECRET_KEY, "secret key")
        need_type(shape, key, KeyType.AES, "an AES key")
        if req.mechanism == pb.CIPHER_AES_ECB:
            mechanism, param = Mechanism.AES_ECB, None
        else:
            mechanism, param = Mechanism.AES_CBC, req.iv
    else:  # CIPHER_RSA_OAEP_SHA1
        cls = ObjectClass.PRIVATE_KEY if req.decrypt else ObjectClass.PUBLIC_KEY
        what = "RSA private key" if req.decrypt else "RSA public key"
        obj, shape = need(key, cls, what)
        need_type(shape, key, KeyType.RSA, f"an {what}")
        mechanism, param = Mechanism.RSA_PKCS_OAEP, OAEP_SHA1
    require_usage(shape, usage, key.name)
    if req.decrypt:
        return obj.decrypt(req.data, mechanism=mechanism, mechanism_param=param)
    return obj.encrypt(req.data, mechanism=mechanism, mechanism_param=param)


def _signer(ctx: WorkerContext, key: ResolvedKey, mechanism: int, usage: int, data: bytes
            ) -> tuple[pkcs11.Object, Mechanism, Any, bytes]:
    """Object, PKCS#11 mechanism, parameter and data for a sign or verify."""
    if mechanism == pb.AES_CMAC:
        obj, shape = need(key, ObjectClass.SECRET_KEY, "secret key for AES-CMAC")
        need_type(shape, key, KeyType.AES, "an AES key")
        require_usage(shape, usage, key.name)
        return obj, Mechanism.AES_CMAC, None, data
    cls = ObjectClass.PRIVATE_KEY if usage == pb.SIGN else ObjectClass.PUBLIC_KEY
    half = "private key" if usage == pb.SIGN else "public key"
    if mechanism in (pb.ECDSA, pb.ECDSA_SHA256):
        obj, shape = need(key, cls, f"EC {half}")
        need_type(shape, key, KeyType.EC, "an EC key")
        require_usage(shape, usage, key.name)
        if mechanism == pb.ECDSA_SHA256:
            if ctx.backend.supports(key.token, Mechanism.ECDSA_SHA256):
                return obj, Mechanism.ECDSA_SHA256, None, data
            # The token hashes nothing itself: the digest of public data is
            # computed here, the signature still in the HSM.
            data = hashlib.sha256(data).digest()
        return obj, Mechanism.ECDSA, None, data
    obj, shape = need(key, cls, f"RSA {half}")
    need_type(shape, key, KeyType.RSA, "an RSA key")
    require_usage(shape, usage, key.name)
    if mechanism == pb.RSA_PKCS1_SHA256:
        return obj, Mechanism.SHA256_RSA_PKCS, None, data
    return obj, Mechanism.SHA256_RSA_PKCS_PSS, PSS_SHA256, data


@operation("sign", idempotent=True)
def sign(ctx: WorkerContext, req: m.SignItem) -> bytes:
    key = resolve_operator(ctx, req.key)
    obj, mechanism, param, data = _signer(ctx, key, req.mechanism, pb.SIGN, req.data)
    return obj.sign(data, mechanism=mechanism, mechanism_param=param)


@operation("verify", idempotent=True)
def verify(ctx: WorkerContext, req: m.VerifyItem) -> bool:
    key = resolve_operator(ctx, req.key)
    obj, mechanism, param, data = _signer(ctx, key, req.mechanism, pb.VERIFY, req.data)
    return bool(obj.verify(data, req.signature, mechanism=mechanism, mechanism_param=param))


@operation("random", idempotent=True)
def random(ctx: WorkerContext, req: m.Random) -> bytes:
    return ctx.backend.session(req.token).generate_random(req.length * 8)


# ---------------------------------------------------------------------------
# Inspection and lifecycle

@operation("describe", idempotent=True)
def describe_key(ctx: WorkerContext, req: m.Describe) -> bytes:
    key = resolve(ctx, req.key)
    wanted = {pb.PRIVATE_KEY: ObjectClass.PRIVATE_KEY, pb.PUBLIC_KEY: ObjectClass.PUBLIC_KEY,
              pb.SECRET_KEY: ObjectClass.SECRET_KEY, pb.KEY_PAIR: ObjectClass.PRIVATE_KEY}
    if req.key_class in wanted:
        cls = wanted[req.key_class]
        if cls not in key.objects:
            raise NotFound(f"key {key.name} has no {pb.KeyClass.Name(req.key_class).lower()} "
                           f"object")
        if req.key_class == pb.KEY_PAIR and not key.is_pair:
            raise NotFound(f"key {key.name} is not a key pair")
    else:
        cls = ObjectClass.PRIVATE_KEY if ObjectClass.PRIVATE_KEY in key.objects else key.main()
    key_class = pb.KEY_PAIR if req.key_class == pb.KEY_PAIR else None
    # Attributes are read afresh: usages or extractability may have changed.
    fresh = {c: read_attributes(o) for c, o in key.objects.items()}
    info = describe(key.objects[cls], key_class=key_class, attrs=fresh[cls], objects=fresh)
    if key.handle:
        info.ref.token, info.ref.handle = key.token, key.handle
    else:
        info.ref.token, info.ref.label = key.token, key.label
    return info.SerializeToString()


@operation("public_key", idempotent=True)
def public_key(ctx: WorkerContext, ref: m.KeyRef) -> tuple[bytes, int]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = resolve(ctx, ref)
    main = key.main()
    if main == ObjectClass.SECRET_KEY:
        raise FailedPrecondition(f"key {key.name} is a secret key: it has no public key")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    pub = key.get(ObjectClass.PUBLIC_KEY)
    if pub is not None:
        obj, shape = pub
    else:
        obj, shape = key.objects[main], key.shapes[main]
    if shape.key_type == KeyType.EC:
        if pub is None:
            raise FailedPrecondition(f"key {key.name} has no public key object")
        attrs = obj.get_attributes([Attribute.EC_PARAMS, Attribute.EC_POINT])
        algorithm = EC_BY_PARAMS.get(bytes(attrs[Attribute.EC_PARAMS]))
        if algorithm is None:
            raise FailedPrecondition(f"key {key.name} is on an unsupported curve")
        point = bytes(attrs[Attribute.EC_POINT])
        if len(point) > 2 and point[0] == 0x04 and point[1] == len(point) - 2:
            point = point[2:]  # DER OCTET STRING around the X9.62 point
        curve = ec.SECP256R1() if algorithm == pb.EC_P256 else ec.SECP256K1()
        public = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        return public.public_bytes(der, spki), algorithm
    if shape.key_type == KeyType.RSA:
        attrs = obj.get_attributes([Attribute.MODULUS, Attribute.PUBLIC_EXPONENT])
        n = int.from_bytes(bytes(attrs[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(attrs.get(Attribute.PUBLIC_EXPONENT)
                                 or RSA_PUBLIC_EXPONENT.to_bytes(3, "big")), "big")
        public_rsa = rsa.RSAPublicNumbers(e, n).public_key()
        return public_rsa.public_bytes(der, spki), shape.algorithm
    raise FailedPrecondition(f"key {key.name} has an unsupported key type")


@operation("destroy", idempotent=False)
def destroy(ctx: WorkerContext, req: m.Destroy) -> int:
    if isinstance(req.key, m.HandleRef):
        state = ctx.states.get(req.key.handle, KeyState)
        ctx.states.pop(req.key.handle)
        objects = state.key.all_objects()
        for obj in objects:
            obj.destroy()
        return len(objects)
    token, label = req.key
    kc.require_role(label, {pb.OPERATOR_KEY}, "key")
    ctx.backend.forget(token, label)
    objects = [o for o in ctx.backend.find_objects(token, label)
               if o[Attribute.CLASS] in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY,
                                         ObjectClass.PUBLIC_KEY)]
    if not objects:
        raise NotFound(f"no key labelled {label!r} on token {token!r}")
    for obj in objects:
        obj.destroy()
    return len(objects)
