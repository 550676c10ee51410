"""Translation between the contract's key vocabulary and PKCS#11 attributes.

Used inside the worker processes only (it imports python-pkcs11). Key
algorithms, usages and classes of ``cms.v1`` map to key types, usage
attributes and object classes; ``describe`` reads an object back into a
``KeyInfo``.

Key check values: SoftHSM 2.6.1 stores a correct CKA_CHECK_VALUE for keys it
generates (CKA_LOCAL true) but a wrong one for derived keys and none for
unwrapped keys, so for any other AES key the KCV is computed in the HSM as
AES-ECB(key, 16 x 00) truncated to 3 bytes (through a short-lived session copy
with CKA_ENCRYPT when the key itself may not encrypt). The value never leaves
the HSM in clear; only the 3-byte KCV does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from cardcore.kcv import KCV_LENGTH, ZERO_BLOCK
from cms.runtime.errors import FailedPrecondition, InvalidArgument
from cms.v1 import hsm_pb2 as pb
from hsm_proxy import key_classes as kc

MAX_GENERIC_SECRET_BYTES = 512

AES_SIZES = {pb.AES_128: 16, pb.AES_192: 24, pb.AES_256: 32}
AES_BY_SIZE = {v: k for k, v in AES_SIZES.items()}
EC_CURVES = {pb.EC_P256: "secp256r1", pb.EC_SECP256K1: "secp256k1"}
EC_PARAMS = {alg: encode_named_curve_parameters(name) for alg, name in EC_CURVES.items()}
EC_BY_PARAMS = {v: k for k, v in EC_PARAMS.items()}
EC_BITS = {pb.EC_P256: 256, pb.EC_SECP256K1: 256}
RSA_BITS = {pb.RSA_2048: 2048, pb.RSA_3072: 3072}
RSA_BY_BITS = {v: k for k, v in RSA_BITS.items()}
RSA_PUBLIC_EXPONENT = 65537

USAGE_ATTRIBUTES = {
    pb.ENCRYPT: Attribute.ENCRYPT,
    pb.DECRYPT: Attribute.DECRYPT,
    pb.SIGN: Attribute.SIGN,
    pb.VERIFY: Attribute.VERIFY,
    pb.WRAP: Attribute.WRAP,
    pb.UNWRAP: Attribute.UNWRAP,
    pb.DERIVE: Attribute.DERIVE,
}
SECRET_USAGES = frozenset(USAGE_ATTRIBUTES)
PRIVATE_USAGES = frozenset({pb.SIGN, pb.DECRYPT, pb.UNWRAP, pb.DERIVE})
PUBLIC_USAGES = frozenset({pb.VERIFY, pb.ENCRYPT, pb.WRAP})
# The public half of a pair gets the counterpart of each private usage.
PUBLIC_COUNTERPART = {pb.SIGN: pb.VERIFY, pb.DECRYPT: pb.ENCRYPT, pb.UNWRAP: pb.WRAP}

CLASS_TO_PB = {
    ObjectClass.SECRET_KEY: pb.SECRET_KEY,
    ObjectClass.PRIVATE_KEY: pb.PRIVATE_KEY,
    ObjectClass.PUBLIC_KEY: pb.PUBLIC_KEY,
}
KEY_CLASSES = tuple(CLASS_TO_PB)

INFO_ATTRIBUTES = [
    Attribute.CLASS, Attribute.KEY_TYPE, Attribute.LABEL, Attribute.ID, Attribute.TOKEN,
    Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
    Attribute.NEVER_EXTRACTABLE, Attribute.LOCAL, Attribute.VALUE_LEN, Attribute.EC_PARAMS,
    Attribute.MODULUS_BITS, Attribute.MODULUS, Attribute.PUBLIC_EXPONENT, Attribute.EC_POINT,
    Attribute.CHECK_VALUE, Attribute.PRIVATE,
    Attribute.TRUSTED, Attribute.WRAP_WITH_TRUSTED, Attribute.MODIFIABLE, Attribute.COPYABLE,
    *USAGE_ATTRIBUTES.values(),
]


def usage_name(usage: int) -> str:
    return pb.KeyUsage.Name(usage) if usage in pb.KeyUsage.values() else str(usage)


def algorithm_name(algorithm: int) -> str:
    try:
        return pb.KeyAlgorithm.Name(algorithm)
    except ValueError:
        return str(algorithm)


def usage_template(usages: frozenset[int], allowed: frozenset[int]) -> dict[Attribute, bool]:
    """Every usage attribute the object class has, true only for the requested usages."""
    bad = usages - allowed
    if bad:
        raise InvalidArgument(
            f"usage(s) {', '.join(sorted(usage_name(u) for u in bad))} do not apply to this "
            f"kind of key (allowed: {', '.join(sorted(usage_name(u) for u in allowed))})")
    return {USAGE_ATTRIBUTES[u]: u in usages for u in allowed}


OBJECT_CLASSES = {kc.SECRET: ObjectClass.SECRET_KEY, kc.PRIVATE: ObjectClass.PRIVATE_KEY,
                  kc.PUBLIC: ObjectClass.PUBLIC_KEY}
CLASS_NAMES = {v: k for k, v in OBJECT_CLASSES.items()}
CLASS_USAGES = {kc.SECRET: SECRET_USAGES, kc.PRIVATE: PRIVATE_USAGES, kc.PUBLIC: PUBLIC_USAGES}


def object_template(tpl: kc.ObjectTemplate, *, label: str, tag: kc.Tag, token_object: bool,
                    key_type: KeyType | None = None, value_len: int | None = None
                    ) -> dict[Attribute, Any]:
    """The PKCS#11 template of one object of a key class.

    Every usage attribute of the object class is given explicitly (true or
    false, never the token's default); the object can be neither modified nor
    copied afterwards, so nothing can be switched on later. CKA_ID carries the
    class and origin tag the proxy checks on every use.
    """
    template: dict[Attribute, Any] = {
        Attribute.CLASS: OBJECT_CLASSES[tpl.object_class],
        Attribute.LABEL: label,
        Attribute.ID: tag.encode(),
        Attribute.TOKEN: token_object,
        Attribute.PRIVATE: tpl.private,
        Attribute.COPYABLE: False,
        **usage_template(tpl.usages, CLASS_USAGES[tpl.object_class]),
    }
    if tpl.object_class != kc.PUBLIC:
        template[Attribute.SENSITIVE] = True
        template[Attribute.EXTRACTABLE] = tpl.extractable
        template[Attribute.WRAP_WITH_TRUSTED] = tpl.wrap_with_trusted
    if tpl.trusted:
        template[Attribute.TRUSTED] = True
    if key_type is not None:
        template[Attribute.KEY_TYPE] = key_type
    if value_len is not None:
        template[Attribute.VALUE_LEN] = value_len
    return finish(template)


def finish(template: dict[Attribute, Any]) -> dict[Attribute, Any]:
    """``template`` with CKA_MODIFIABLE false as its very last attribute.

    SoftHSM 2.6 applies a template in order, and once CKA_MODIFIABLE is false
    an unwrap or derive cannot set the attributes after it
    (CKR_ATTRIBUTE_READ_ONLY); last, it applies to the finished object.
    """
    out = {k: v for k, v in template.items() if k != Attribute.MODIFIABLE}
    out[Attribute.MODIFIABLE] = False
    return out


def secret_type(algorithm: int, length_bytes: int) -> tuple[KeyType, int]:
    if algorithm in AES_SIZES:
        if length_bytes not in (0, AES_SIZES[algorithm]):
            raise InvalidArgument(f"length_bytes {length_bytes} contradicts "
                                  f"{algorithm_name(algorithm)}; leave it 0")
        return KeyType.AES, AES_SIZES[algorithm]
    if algorithm == pb.GENERIC_SECRET:
        if not 1 <= length_bytes <= MAX_GENERIC_SECRET_BYTES:
            raise InvalidArgument(f"GENERIC_SECRET needs length_bytes between 1 and "
                                  f"{MAX_GENERIC_SECRET_BYTES}")
        return KeyType.GENERIC_SECRET, length_bytes
    raise InvalidArgument(f"{algorithm_name(algorithm)} is not a secret key algorithm "
                          f"(use AES_128, AES_192, AES_256 or GENERIC_SECRET)")


def session_secret_template(usages: frozenset[int], *, extractable: bool,
                            value_len: int | None = None) -> dict[Attribute, Any]:
    """A key that lives only inside one worker operation (a card key, a session key).

    Sensitive, never a token object, neither modifiable nor copyable;
    extractable only for the one case that needs it (a PUT KEY's new keys,
    wrapped under the card's DEK in the same operation).
    """
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: extractable,
        Attribute.WRAP_WITH_TRUSTED: False,
        Attribute.COPYABLE: False,
        **usage_template(usages, SECRET_USAGES),
    }
    if value_len is not None:
        template[Attribute.VALUE_LEN] = value_len
    return finish(template)


@dataclass(frozen=True)
class KeyShape:
    """What an object is, read once and cached with its handle."""

    object_class: ObjectClass
    key_type: KeyType
    algorithm: int
    size_bits: int
    usages: frozenset[int]

    @property
    def is_aes(self) -> bool:
        return self.key_type == KeyType.AES


def read_attributes(obj: pkcs11.Object) -> dict[Attribute, Any]:
    """Every attribute of INFO_ATTRIBUTES the object has (others are left out)."""
    try:
        return obj.get_attributes(INFO_ATTRIBUTES)
    except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive, pkcs11.FunctionFailed):
        attrs: dict[Attribute, Any] = {}
        for attr in INFO_ATTRIBUTES:
            try:
                attrs[attr] = obj[attr]
            except (pkcs11.AttributeTypeInvalid, pkcs11.AttributeSensitive,
                    pkcs11.FunctionFailed):
                continue
        return attrs


def shape_of(attrs: dict[Attribute, Any]) -> KeyShape:
    cls = attrs[Attribute.CLASS]
    key_type = attrs.get(Attribute.KEY_TYPE)
    usages = frozenset(u for u, a in USAGE_ATTRIBUTES.items() if attrs.get(a))
    algorithm, bits = pb.KEY_ALGORITHM_UNSPECIFIED, 0
    if key_type == KeyType.AES:
        size = int(attrs.get(Attribute.VALUE_LEN) or 0)
        algorithm, bits = AES_BY_SIZE.get(size, pb.KEY_ALGORITHM_UNSPECIFIED), size * 8
    elif key_type == KeyType.GENERIC_SECRET:
        size = int(attrs.get(Attribute.VALUE_LEN) or 0)
        algorithm, bits = pb.GENERIC_SECRET, size * 8
    elif key_type == KeyType.EC:
        algorithm = EC_BY_PARAMS.get(bytes(attrs.get(Attribute.EC_PARAMS) or b""),
                                     pb.KEY_ALGORITHM_UNSPECIFIED)
        bits = EC_BITS.get(algorithm, 0)
    elif key_type == KeyType.RSA:
        bits = int(attrs.get(Attribute.MODULUS_BITS) or 0)
        if not bits and attrs.get(Attribute.MODULUS):
            bits = int.from_bytes(bytes(attrs[Attribute.MODULUS]), "big").bit_length()
        algorithm = RSA_BY_BITS.get(bits, pb.KEY_ALGORITHM_UNSPECIFIED)
    return KeyShape(cls, key_type, algorithm, bits, usages)


def compute_kcv(obj: pkcs11.Object, attrs: dict[Attribute, Any], shape: KeyShape) -> bytes:
    """KCV_ZERO_BLOCK check value of an AES key, computed in the HSM so it is always right.

    No key can be copied or modified, so the check value comes from what the
    key itself allows, in this order: the CKA_CHECK_VALUE the token computed
    when it generated the key (CKA_LOCAL) or when the proxy created it from
    components (SoftHSM checks a given value and refuses a wrong one); an
    encryption of the zero block when the key may encrypt; for a key that
    may only derive, a 3-byte key derived from it by AES-ECB of the zero
    block (CKM_AES_ECB_ENCRYPT_DATA) and read back: by construction exactly
    the check value. Empty otherwise (an unwrapping key that landed wrapped:
    its check value was taken when it landed).
    """
    if not shape.is_aes:
        return b""
    stored = bytes(attrs.get(Attribute.CHECK_VALUE) or b"")
    tag = kc.decode_tag(bytes(attrs.get(Attribute.ID) or b""))
    if len(stored) == KCV_LENGTH and (attrs.get(Attribute.LOCAL) or (
            tag is not None and tag.origin == pb.CEREMONY)):
        return stored
    if attrs.get(Attribute.ENCRYPT):
        return obj.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB)[:KCV_LENGTH]
    if attrs.get(Attribute.DERIVE):
        return derived_kcv(obj)
    return b""


def derived_kcv(obj: pkcs11.Object) -> bytes:
    """AES-ECB(key, 16 x 00)[:3] of a DERIVE key: a 3-byte derived key, read and destroyed.

    The derived object holds the check value and nothing else (its length is
    the KCV's); it exists for the duration of this function.
    """
    check = obj.derive_key(KeyType.GENERIC_SECRET, KCV_LENGTH * 8, capabilities=0,
                           mechanism=Mechanism.AES_ECB_ENCRYPT_DATA, mechanism_param=ZERO_BLOCK,
                           template={Attribute.TOKEN: False, Attribute.SENSITIVE: False,
                                     Attribute.EXTRACTABLE: True,
                                     Attribute.VALUE_LEN: KCV_LENGTH,
                                     Attribute.DERIVE: False, Attribute.ENCRYPT: False,
                                     Attribute.DECRYPT: False, Attribute.SIGN: False,
                                     Attribute.VERIFY: False, Attribute.WRAP: False,
                                     Attribute.UNWRAP: False})
    try:
        return bytes(check[Attribute.VALUE])[:KCV_LENGTH]
    finally:
        check.destroy()


def generate_signing_pair(session: Any, label: str, role: int) -> list[pkcs11.Object]:
    """A P-256 pair of a signing class (``kc.SIGNING_PAIR_ROLES``) generated in the token
    with its class's template and a GENERATED tag: the private half signs and nothing
    else, and never leaves the token."""
    if role not in kc.SIGNING_PAIR_ROLES:
        raise kc.KeyClassError(f"a {kc.role_name(role)} is not a signing pair")
    objects = kc.SIGNING_PAIR_TEMPLATE
    common = {"label": label, "tag": kc.Tag(role, pb.GENERATED), "token_object": True}
    public = object_template(objects[kc.PUBLIC], **common)
    public[Attribute.EC_PARAMS] = EC_PARAMS[pb.EC_P256]
    private = object_template(objects[kc.PRIVATE], **common)
    pub, priv = session.generate_keypair(KeyType.EC, None, capabilities=0,
                                         public_template=finish(public),
                                         private_template=private)
    return [pub, priv]


def generate_mailer_pair(session: Any, label: str) -> list[pkcs11.Object]:
    """The mailing house's RSA-2048 pair (``kc.MAILER_TEMPLATE``, e = 65537) generated in
    the token with a GENERATED tag: the private half decrypts and never leaves it."""
    common = {"label": label, "tag": kc.Tag(pb.MAILER_KEY, pb.GENERATED), "token_object": True}
    public = object_template(kc.MAILER_TEMPLATE[kc.PUBLIC], **common)
    public[Attribute.PUBLIC_EXPONENT] = RSA_PUBLIC_EXPONENT.to_bytes(3, "big")
    private = object_template(kc.MAILER_TEMPLATE[kc.PRIVATE], **common)
    pub, priv = session.generate_keypair(KeyType.RSA, RSA_BITS[pb.RSA_2048], capabilities=0,
                                         public_template=finish(public),
                                         private_template=private)
    return [pub, priv]


def spki_der(objects: dict[ObjectClass, dict[Attribute, Any]]) -> bytes | None:
    """DER SubjectPublicKeyInfo of a pair or public key from its public attributes."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    public = objects.get(ObjectClass.PUBLIC_KEY) or objects.get(ObjectClass.PRIVATE_KEY)
    if public is None:
        return None
    key_type = public.get(Attribute.KEY_TYPE)
    try:
        if key_type == KeyType.RSA:
            n = int.from_bytes(bytes(public.get(Attribute.MODULUS) or b""), "big")
            e = int.from_bytes(bytes(public.get(Attribute.PUBLIC_EXPONENT) or b""), "big")
            if not n or not e:
                return None
            key: Any = rsa.RSAPublicNumbers(e, n).public_key()
        elif key_type == KeyType.EC:
            pub = objects.get(ObjectClass.PUBLIC_KEY) or {}
            algorithm = EC_BY_PARAMS.get(bytes(pub.get(Attribute.EC_PARAMS) or b""))
            point = bytes(pub.get(Attribute.EC_POINT) or b"")
            if algorithm is None or not point:
                return None
            if len(point) > 2 and point[0] == 0x04 and point[1] == len(point) - 2:
                point = point[2:]  # DER OCTET STRING around the X9.62 point
            curve = ec.SECP256R1() if algorithm == pb.EC_P256 else ec.SECP256K1()
            key = ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
        else:
            return None
    except ValueError:
        return None
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def spki_kcv(der: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(der).digest()[:KCV_LENGTH]


def role_and_origin(label: str, attrs: dict[Attribute, Any]) -> tuple[int, int, kc.Tag | None]:
    """The class the label names, the origin its tag records, and the tag."""
    tag = kc.decode_tag(bytes(attrs.get(Attribute.ID) or b""))
    role = kc.role_of_label(label)
    origin = tag.origin if tag is not None and tag.role == role else pb.KEY_ORIGIN_UNKNOWN
    return role, origin, tag


def conformance(label: str, objects: dict[ObjectClass, dict[Attribute, Any]]) -> str:
    """Empty when the key's objects match its class's template; else what differs.

    A key made outside the proxy (no tag, or a tag of another class than its
    label) does not conform, nor does one whose attributes differ from the
    template its tag names: such a key is refused for its class's purposes.
    """
    if not objects:
        return "no key objects"
    role = kc.role_of_label(label)
    if role == pb.OPERATOR_KEY:
        return _operator_conformance(objects)
    tags = {kc.decode_tag(bytes(a.get(Attribute.ID) or b"")) for a in objects.values()}
    if len(tags) != 1:
        return "its objects carry different tags"
    tag = tags.pop()
    if tag is None:
        return "it carries no tag of the proxy (made outside it)"
    if tag.role != role:
        return (f"its tag says {kc.role_name(tag.role)} but its label names a "
                f"{kc.role_name(role)}")
    expected = kc.expected_objects(tag)
    if expected is None:
        return f"no {kc.role_name(role)} is made by {kc.origin_name(tag.origin)}"
    have = {CLASS_NAMES[c] for c in objects}
    if have != set(expected):
        return f"it has objects {sorted(have)}, its class has {sorted(expected)}"
    for name, tpl in expected.items():
        problem = _object_problem(tpl, objects[OBJECT_CLASSES[name]], tag.origin)
        if problem:
            return f"{name} key: {problem}"
    return ""


def _object_problem(tpl: kc.ObjectTemplate, attrs: dict[Attribute, Any], origin: int) -> str:
    usages = frozenset(u for u, a in USAGE_ATTRIBUTES.items() if attrs.get(a))
    if usages != tpl.usages:
        want = ", ".join(sorted(usage_name(u) for u in tpl.usages)) or "none"
        got = ", ".join(sorted(usage_name(u) for u in usages)) or "none"
        return f"usages {got}, expected {want}"
    checks = [(Attribute.PRIVATE, tpl.private), (Attribute.MODIFIABLE, False),
              (Attribute.COPYABLE, False)]
    if tpl.object_class != kc.PUBLIC:
        checks += [(Attribute.SENSITIVE, True), (Attribute.EXTRACTABLE, tpl.extractable),
                   (Attribute.WRAP_WITH_TRUSTED, tpl.wrap_with_trusted),
                   (Attribute.TRUSTED, tpl.trusted) if tpl.object_class == kc.SECRET
                   else (Attribute.SENSITIVE, True)]
    if origin == pb.GENERATED:
        checks.append((Attribute.LOCAL, True))
        if tpl.object_class != kc.PUBLIC and not tpl.extractable:
            # Generated in the token and never out of it: no copy of it was ever readable.
            checks += [(Attribute.ALWAYS_SENSITIVE, True), (Attribute.NEVER_EXTRACTABLE, True)]
    elif origin in (pb.TRANSFERRED, pb.CEREMONY):
        checks.append((Attribute.LOCAL, False))
    for attr, value in checks:
        if bool(attrs.get(attr, False)) != value:
            return f"{_attr_name(attr)} is {not value}, expected {value}"
    return ""


def _operator_conformance(objects: dict[ObjectClass, dict[Attribute, Any]]) -> str:
    for cls, attrs in objects.items():
        if cls == ObjectClass.PUBLIC_KEY:
            continue
        if not attrs.get(Attribute.SENSITIVE) or attrs.get(Attribute.EXTRACTABLE):
            return f"{CLASS_NAMES[cls]} key is not sensitive or is extractable"
        if attrs.get(Attribute.WRAP) or attrs.get(Attribute.UNWRAP):
            return f"{CLASS_NAMES[cls]} key may wrap or unwrap"
    return ""


def _attr_name(attr: Attribute) -> str:
    return "CKA_" + attr.name


def describe(obj: pkcs11.Object, *, key_class: int | None = None,
             attrs: dict[Attribute, Any] | None = None,
             objects: dict[ObjectClass, dict[Attribute, Any]] | None = None) -> pb.KeyInfo:
    """KeyInfo of one object (``key_class`` overrides the class, e.g. KEY_PAIR).

    ``objects``: every object of the key by class, for the conformance check
    (default: this object alone).
    """
    attrs = attrs if attrs is not None else read_attributes(obj)
    shape = shape_of(attrs)
    label = str(attrs.get(Attribute.LABEL) or "")
    role, origin, _ = role_and_origin(label, attrs)
    info = pb.KeyInfo(
        key_class=key_class if key_class is not None else CLASS_TO_PB.get(
            shape.object_class, pb.KEY_CLASS_UNSPECIFIED),
        algorithm=shape.algorithm,
        size_bits=shape.size_bits,
        usages=sorted(shape.usages),
        sensitive=bool(attrs.get(Attribute.SENSITIVE, False)),
        extractable=bool(attrs.get(Attribute.EXTRACTABLE, False)),
        always_sensitive=bool(attrs.get(Attribute.ALWAYS_SENSITIVE, False)),
        never_extractable=bool(attrs.get(Attribute.NEVER_EXTRACTABLE, False)),
        local=bool(attrs.get(Attribute.LOCAL, False)),
        token_object=bool(attrs.get(Attribute.TOKEN, False)),
        id=bytes(attrs.get(Attribute.ID) or b""),
        label=label,
        role=role,
        origin=origin,
        trusted=bool(attrs.get(Attribute.TRUSTED, False)),
        wrap_with_trusted=bool(attrs.get(Attribute.WRAP_WITH_TRUSTED, False)),
        modifiable=bool(attrs.get(Attribute.MODIFIABLE, False)),
        copyable=bool(attrs.get(Attribute.COPYABLE, False)),
    )
    if attrs.get(Attribute.TOKEN):
        info.conformance = conformance(label, objects if objects is not None
                                       else {shape.object_class: attrs})
    if shape.object_class == ObjectClass.SECRET_KEY and shape.is_aes:
        kcv = compute_kcv(obj, attrs, shape)
        if kcv:
            info.kcv = kcv
            info.kcv_method = pb.KCV_ZERO_BLOCK
    elif shape.object_class != ObjectClass.SECRET_KEY:
        der = spki_der(objects if objects is not None else {shape.object_class: attrs})
        if der is not None:
            info.kcv = spki_kcv(der)
            info.kcv_method = pb.KCV_SPKI_SHA256
    return info


def require_usage(shape: KeyShape, usage: int, label: str) -> None:
    if usage not in shape.usages:
        have = ", ".join(sorted(usage_name(u) for u in shape.usages)) or "none"
        raise FailedPrecondition(f"key {label} does not allow {usage_name(usage)} "
                                 f"(its usages: {have})")
