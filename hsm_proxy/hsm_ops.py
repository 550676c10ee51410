"""Worker operations of the ``cms.v1.Hsm`` contract, on python-pkcs11.

Each operation receives a payload from ``hsm_proxy.messages`` already
validated and authorized by the frontend, checks what only the HSM side can
know (key class, type, usages, extractability, duplicate labels) and returns
plain values or serialized ``KeyInfo`` messages. Errors are
``cms.runtime.errors`` classes with messages that name keys by label or handle
and never carry key material or data.

Session keys live in the worker that made them as ``KeyState`` objects, named
by the handle the frontend chose.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections import defaultdict
from typing import Any

import pkcs11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass

from cardcore.kcv import kcv_zero_block
from cms.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import messages as m
from hsm_proxy.backend import ResolvedKey, resolve_objects
from hsm_proxy.errors import BackendUnavailable, WireError, to_wire
from hsm_proxy.handles import COMPONENT_IMPORT_KIND
from hsm_proxy.keyspec import (
    AES_SIZES,
    EC_BY_PARAMS,
    EC_PARAMS,
    PRIVATE_USAGES,
    PUBLIC_COUNTERPART,
    PUBLIC_USAGES,
    RSA_BITS,
    RSA_PUBLIC_EXPONENT,
    KeyShape,
    compute_kcv,
    describe,
    private_template,
    public_template,
    read_attributes,
    require_usage,
    secret_template,
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
    info = describe(resolved.objects[main], key_class=key_class, attrs=resolved.attrs[main])
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
        info = describe(obj, key_class=chosen[1], attrs=attrs)
        info.ref.token, info.ref.label = req.token, label
        out.append(info.SerializeToString())
    return out


# ---------------------------------------------------------------------------
# Generation

@operation("generate_secret", idempotent=False)
def generate_secret(ctx: WorkerContext, req: m.GenerateSecret) -> bytes:
    t = req.template
    key_type, size = secret_type(req.algorithm, req.length_bytes)
    if not t.session:
        require_free_label(ctx, req.token, t.label)
    template = secret_template(req.algorithm, req.length_bytes, t.label, t.key_id, t.usages,
                               t.extractable, t.session)
    key = ctx.backend.session(req.token).generate_key(
        key_type, size * 8, capabilities=0, template=template)
    return created(ctx, req.token, t, [key])


def _pair_templates(t: m.Template) -> tuple[dict, dict]:
    """Private usages go to the private half, which gives the public half their
    counterparts; public usages named as well (SIGN + VERIFY) go to the public half."""
    unknown = t.usages - PRIVATE_USAGES - PUBLIC_USAGES
    if unknown:
        raise InvalidArgument("a key pair's usages are SIGN, DECRYPT, UNWRAP, DERIVE (private "
                              "half) and VERIFY, ENCRYPT, WRAP (public half)")
    private_usages = t.usages & PRIVATE_USAGES
    if not private_usages:
        raise InvalidArgument("a key pair needs at least one private usage (SIGN, DECRYPT, "
                              "UNWRAP or DERIVE)")
    public_usages = frozenset(PUBLIC_COUNTERPART[u] for u in private_usages
                              if u in PUBLIC_COUNTERPART) | (t.usages & PUBLIC_USAGES)
    return (public_template(t.label, t.key_id, public_usages, t.session),
            private_template(t.label, t.key_id, private_usages, t.extractable, t.session))


@operation("generate_pair", idempotent=False)
def generate_pair(ctx: WorkerContext, req: m.GeneratePair) -> bytes:
    t = req.template
    public, private = _pair_templates(t)
    if req.algorithm in EC_PARAMS:
        key_type, bits = KeyType.EC, None
        public[Attribute.EC_PARAMS] = EC_PARAMS[req.algorithm]
    elif req.algorithm in RSA_BITS:
        key_type, bits = KeyType.RSA, RSA_BITS[req.algorithm]
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
    base = resolve(ctx, req.base)
    obj, shape = need(base, ObjectClass.SECRET_KEY, "secret key to derive from")
    need_type(shape, base, KeyType.AES, "an AES key")
    require_usage(shape, pb.DERIVE, base.name)
    key_type, size = secret_type(req.algorithm, req.length_bytes)
    t = req.template
    token = base.token
    if not t.session:
        require_free_label(ctx, token, t.label)
    if req.mechanism == pb.AES_ECB_ENCRYPT_DATA:
        mechanism, param = Mechanism.AES_ECB_ENCRYPT_DATA, req.data
    else:
        mechanism, param = Mechanism.AES_CBC_ENCRYPT_DATA, (req.iv, req.data)
    template = secret_template(req.algorithm, size, t.label, t.key_id, t.usages,
                               t.extractable, t.session)
    new = obj.derive_key(key_type, size * 8, capabilities=0, mechanism=mechanism,
                         mechanism_param=param, template=template)
    return created(ctx, token, t, [new])


# ---------------------------------------------------------------------------
# Wrapping

def _wrap_mechanism(mechanism: int) -> tuple[Mechanism, Any]:
    return {
        pb.AES_KEY_WRAP_PAD: (Mechanism.AES_KEY_WRAP_PAD, None),
        pb.AES_KEY_WRAP: (Mechanism.AES_KEY_WRAP, None),
        pb.RSA_OAEP_SHA1: (Mechanism.RSA_PKCS_OAEP, OAEP_SHA1),
        pb.AES_CBC_ZERO_IV: (Mechanism.AES_CBC, bytes(AES_BLOCK)),
    }[mechanism]


def _kek(key: ResolvedKey, mechanism: int, usage: int) -> pkcs11.Object:
    """The object of ``key`` that wraps (``usage`` WRAP) or unwraps under ``mechanism``."""
    if mechanism == pb.RSA_OAEP_SHA1:
        cls = ObjectClass.PUBLIC_KEY if usage == pb.WRAP else ObjectClass.PRIVATE_KEY
        what = "an RSA public key" if usage == pb.WRAP else "an RSA private key"
        obj, shape = need(key, cls, what)
        need_type(shape, key, KeyType.RSA, what)
    else:
        obj, shape = need(key, ObjectClass.SECRET_KEY, "AES key-encryption key")
        need_type(shape, key, KeyType.AES, "an AES key")
    require_usage(shape, usage, key.name)
    return obj


@operation("wrap", idempotent=True)
def wrap(ctx: WorkerContext, req: m.Wrap) -> tuple[bytes, bytes]:
    kek_key = resolve(ctx, req.wrapping)
    target = resolve(ctx, req.key)
    kek = _kek(kek_key, req.mechanism, pb.WRAP)
    main = target.main()
    if main == ObjectClass.PUBLIC_KEY:
        raise FailedPrecondition(f"key {target.name} is a public key: read it with GetPublicKey")
    obj, shape = target.objects[main], target.shapes[main]
    attrs = target.attrs[main]
    if not attrs.get(Attribute.EXTRACTABLE):
        raise FailedPrecondition(f"key {target.name} is not extractable: it may not leave the "
                                 f"HSM, not even wrapped")
    if main == ObjectClass.PRIVATE_KEY and req.mechanism != pb.AES_KEY_WRAP_PAD:
        raise InvalidArgument("a private key can only be wrapped with AES_KEY_WRAP_PAD")
    size = shape.size_bits // 8
    if req.mechanism == pb.AES_CBC_ZERO_IV and (size % AES_BLOCK or not shape.is_aes):
        raise InvalidArgument("AES_CBC_ZERO_IV wraps AES keys only (whole 16-byte blocks)")
    if req.mechanism == pb.AES_KEY_WRAP and size % 8:
        raise InvalidArgument("AES_KEY_WRAP needs a key of a multiple of 8 bytes; "
                              "use AES_KEY_WRAP_PAD")
    mechanism, param = _wrap_mechanism(req.mechanism)
    wrapped = kek.wrap_key(obj, mechanism=mechanism, mechanism_param=param)
    kcv = compute_kcv(obj, attrs, shape) if main == ObjectClass.SECRET_KEY else b""
    return wrapped, kcv


@operation("unwrap", idempotent=True)
def unwrap(ctx: WorkerContext, req: m.Unwrap) -> bytes:
    kek_key = resolve(ctx, req.unwrapping)
    kek = _kek(kek_key, req.mechanism, pb.UNWRAP)
    t = req.template
    token = kek_key.token
    if req.key_class == pb.SECRET_KEY:
        key_type, size = secret_type(req.algorithm, req.length_bytes)
        object_class = ObjectClass.SECRET_KEY
        template = secret_template(req.algorithm, size, t.label, t.key_id, t.usages,
                                   t.extractable, t.session, with_length=False)
    elif req.key_class == pb.PRIVATE_KEY:
        if req.mechanism != pb.AES_KEY_WRAP_PAD:
            raise InvalidArgument("a private key can only be unwrapped with AES_KEY_WRAP_PAD "
                                  "(PKCS#8)")
        if req.algorithm in EC_PARAMS:
            key_type = KeyType.EC
        elif req.algorithm in RSA_BITS:
            key_type = KeyType.RSA
        else:
            raise InvalidArgument("a private key is EC_P256, EC_SECP256K1, RSA_2048 or RSA_3072")
        size = 0
        object_class = ObjectClass.PRIVATE_KEY
        template = private_template(t.label, t.key_id, t.usages, t.extractable, t.session)
        template[Attribute.KEY_TYPE] = key_type
        # python-pkcs11 adds every usage attribute to an unwrap template; the
        # public-only ones do not exist on private keys (DEFAULT removes them).
        for attr in (Attribute.ENCRYPT, Attribute.VERIFY, Attribute.WRAP):
            template[attr] = pkcs11.DEFAULT
    else:
        raise InvalidArgument("key_class must be SECRET_KEY or PRIVATE_KEY")
    if not t.session:
        require_free_label(ctx, token, t.label)
    mechanism, param = _wrap_mechanism(req.mechanism)
    new = kek.unwrap_key(object_class, key_type, req.wrapped, mechanism=mechanism,
                         mechanism_param=param, capabilities=0, template=template)
    try:
        attrs = read_attributes(new)
        reported = int(attrs.get(Attribute.VALUE_LEN) or 0)
        if key_type == KeyType.AES and reported and reported != size:
            raise InvalidArgument(f"the wrapped key is {reported} bytes long, not "
                                  f"{pb.KeyAlgorithm.Name(req.algorithm)}")
        if req.expected_kcv:
            if key_type != KeyType.AES:
                raise InvalidArgument("expected_kcv applies to AES keys only")
            kcv = compute_kcv(new, attrs, shape_of(attrs))
            if not hmac.compare_digest(kcv, req.expected_kcv):
                raise InvalidArgument(
                    f"check value mismatch: the unwrapped key has KCV {kcv.hex()}, expected "
                    f"{req.expected_kcv.hex()}; the key was not kept")
    except BaseException:
        _destroy_quietly([new])
        raise
    return created(ctx, token, t, [new], value_len=size)


@operation("import_public", idempotent=False)
def import_public(ctx: WorkerContext, req: m.ImportPublic) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    t = req.template
    try:
        public = serialization.load_der_public_key(req.der)
    except ValueError:
        raise InvalidArgument("public_key_der is not a DER SubjectPublicKeyInfo") from None
    template = public_template(t.label, t.key_id, t.usages, t.session)
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
    existing: list[pkcs11.Object] = []
    if not t.session:
        existing = _pair_completed_by(ctx, req.token, t.label, template)
    obj = ctx.backend.session(req.token).create_object(template)
    return created(ctx, req.token, t, [*existing, obj],
                   key_class=pb.KEY_PAIR if existing else None)


def _pair_completed_by(ctx: WorkerContext, token: str, label: str,
                       public: dict) -> list[pkcs11.Object]:
    """The private key that an imported public key completes into a pair, if any.

    A private key arrives in an HSM wrapped (key transfer) without its public
    half; importing the matching public key under the same label makes the
    pair that encrypts with one label and decrypts with it. Any other object
    already holding the label keeps the label taken.
    """
    if not label:
        raise InvalidArgument("a persistent key needs a label")
    objects = ctx.backend.find_objects(token, label)
    if not objects:
        return []
    taken = AlreadyExists(f"a key labelled {label!r} already exists on token {token!r}")
    if len(objects) != 1 or objects[0][Attribute.CLASS] != ObjectClass.PRIVATE_KEY:
        raise taken
    private = objects[0]
    if public.get(Attribute.KEY_TYPE) != KeyType.RSA or private[Attribute.KEY_TYPE] != KeyType.RSA:
        raise taken
    modulus = bytes(private[Attribute.MODULUS]).lstrip(b"\0")
    if not hmac.compare_digest(modulus, bytes(public[Attribute.MODULUS]).lstrip(b"\0")):
        raise InvalidArgument(f"the public key does not match the private key labelled {label!r} "
                              f"on token {token!r}")
    ctx.backend.forget(token, label)
    return [private]


# ---------------------------------------------------------------------------
# Ciphers, signatures, MACs

@operation("cipher", idempotent=True)
def cipher(ctx: WorkerContext, req: m.CipherItem) -> bytes:
    key = resolve(ctx, req.key)
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
    key = resolve(ctx, req.key)
    obj, mechanism, param, data = _signer(ctx, key, req.mechanism, pb.SIGN, req.data)
    return obj.sign(data, mechanism=mechanism, mechanism_param=param)


@operation("verify", idempotent=True)
def verify(ctx: WorkerContext, req: m.VerifyItem) -> bool:
    key = resolve(ctx, req.key)
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
    attrs = read_attributes(key.objects[cls])
    info = describe(key.objects[cls], key_class=key_class, attrs=attrs)
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
    ctx.backend.forget(token, label)
    objects = [o for o in ctx.backend.find_objects(token, label)
               if o[Attribute.CLASS] in (ObjectClass.SECRET_KEY, ObjectClass.PRIVATE_KEY,
                                         ObjectClass.PUBLIC_KEY)]
    if not objects:
        raise NotFound(f"no key labelled {label!r} on token {token!r}")
    for obj in objects:
        obj.destroy()
    return len(objects)


# ---------------------------------------------------------------------------
# Key ceremony: components combined in the worker's memory

class ComponentImport(State):
    """A key being built from custodians' components (running XOR, wiped at the end).

    The sum lives in a bytearray that is zeroed when the ceremony completes or
    its handle is released. The components themselves arrive as immutable
    bytes from the request, which Python cannot wipe; the proxy drops them at
    once and the threat model records this.
    """

    kind = COMPONENT_IMPORT_KIND

    def __init__(self, tokens: tuple[str, ...], algorithm: int, needed: int, template: m.Template):
        self.tokens = tokens
        self.token = tokens[0]
        self.label = template.label
        self.algorithm = algorithm
        self.needed = needed
        self.template = template
        self.received = 0
        self.total = bytearray(AES_SIZES[algorithm])

    def wipe(self) -> None:
        self.total[:] = bytes(len(self.total))

    def close(self, ctx: WorkerContext) -> None:
        self.wipe()


@operation("component_begin", idempotent=False)
def component_begin(ctx: WorkerContext, req: m.ComponentBegin) -> tuple[int, int]:
    for token in req.tokens:
        ctx.backend.session(token)
        require_free_label(ctx, token, req.template.label)
    ctx.states.put(req.handle, ComponentImport(req.tokens, req.algorithm, req.components,
                                               req.template))
    return 0, req.components


@operation("component_add", idempotent=False)
def component_add(ctx: WorkerContext, req: m.ComponentAdd
                  ) -> tuple[int, int, list[bytes], WireError | None]:
    """Add one component; on the last, create the key in every token.

    A rejected component raises and leaves the ceremony waiting for it. A
    failure while creating the combined key ends the ceremony (the sum is
    wiped): it is returned as the fourth element so the frontend drops the
    handle too.
    """
    state = ctx.states.get(req.handle, ComponentImport)
    size = len(state.total)
    if len(req.component) != size:
        raise InvalidArgument(f"a component of {pb.KeyAlgorithm.Name(state.algorithm)} is "
                              f"{size} bytes, got {len(req.component)}")
    position = state.received + 1
    if not hmac.compare_digest(kcv_zero_block(req.component), req.kcv):
        raise InvalidArgument(f"component {position} of {state.needed}: its check value does "
                              f"not match; the component was not accepted, enter it again")
    for i, byte in enumerate(req.component):
        state.total[i] ^= byte
    state.received = position
    if state.received < state.needed:
        return state.received, state.needed, [], None
    ctx.states.pop(req.handle)
    try:
        return state.received, state.needed, _create_combined(ctx, state), None
    except ServiceError as exc:
        return state.received, state.needed, [], to_wire(exc)
    except pkcs11.PKCS11Error as exc:
        from hsm_proxy.backend import failure_name, is_backend_failure
        from hsm_proxy.worker import map_pkcs11_error

        if is_backend_failure(exc):
            ctx.backend.fail(exc)
            error: ServiceError = BackendUnavailable(
                f"HSM backend failed while creating the combined key ({failure_name(exc)}); "
                f"the ceremony is over, begin a new one")
        else:
            error = map_pkcs11_error(exc, "AddKeyComponent")
        return state.received, state.needed, [], to_wire(error)
    finally:
        state.wipe()


def _create_combined(ctx: WorkerContext, state: ComponentImport) -> list[bytes]:
    t = state.template
    made: list[pkcs11.Object] = []
    try:
        infos = []
        for token in state.tokens:
            require_free_label(ctx, token, t.label)
            template = secret_template(state.algorithm, 0, t.label, t.key_id, t.usages,
                                       t.extractable, False, with_length=False)
            template[Attribute.VALUE] = bytes(state.total)
            obj = ctx.backend.session(token).create_object(template)
            made.append(obj)
            info = describe(obj)
            info.ref.token, info.ref.label = token, t.label
            infos.append(info.SerializeToString())
            ctx.backend.forget(token, t.label)
        return infos
    except BaseException:
        _destroy_quietly(made)
        raise
