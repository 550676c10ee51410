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

from cms.runtime.errors import FailedPrecondition, InvalidArgument
from cms.v1 import hsm_pb2 as pb

KCV_LENGTH = 3
ZERO_BLOCK = bytes(16)
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
    Attribute.MODULUS_BITS, Attribute.MODULUS, Attribute.CHECK_VALUE,
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


def common_template(label: str, key_id: bytes, session: bool) -> dict[Attribute, Any]:
    template: dict[Attribute, Any] = {Attribute.LABEL: label, Attribute.TOKEN: not session}
    if key_id:
        template[Attribute.ID] = key_id
    return template


def secret_template(algorithm: int, length_bytes: int, label: str, key_id: bytes,
                    usages: frozenset[int], extractable: bool, session: bool,
                    *, with_length: bool = True) -> dict[Attribute, Any]:
    """A sensitive secret key; ``extractable`` only ever means wrappable."""
    key_type, size = secret_type(algorithm, length_bytes)
    template = {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: key_type,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: extractable,
        **common_template(label, key_id, session),
        **usage_template(usages, SECRET_USAGES),
    }
    if with_length:
        template[Attribute.VALUE_LEN] = size
    return template


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


def private_template(label: str, key_id: bytes, usages: frozenset[int], extractable: bool,
                     session: bool) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: extractable,
        **common_template(label, key_id, session),
        **usage_template(usages, PRIVATE_USAGES),
    }


def public_template(label: str, key_id: bytes, usages: frozenset[int],
                    session: bool) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.PRIVATE: False,
        **common_template(label, key_id, session),
        **usage_template(usages, PUBLIC_USAGES),
    }


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
    """KCV_ZERO_BLOCK check value of an AES key, computed so it is always right.

    A key generated in the HSM (CKA_LOCAL) carries a trustworthy CKA_CHECK_VALUE.
    Otherwise encrypt a zero block in the HSM, through a session copy allowed
    to encrypt when the key itself is not, destroyed straight after.
    """
    if not shape.is_aes:
        return b""
    stored = bytes(attrs.get(Attribute.CHECK_VALUE) or b"")
    if attrs.get(Attribute.LOCAL) and len(stored) == KCV_LENGTH:
        return stored
    if attrs.get(Attribute.ENCRYPT):
        return obj.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB)[:KCV_LENGTH]
    copy = obj.copy({Attribute.TOKEN: False, Attribute.ENCRYPT: True})
    try:
        return copy.encrypt(ZERO_BLOCK, mechanism=Mechanism.AES_ECB)[:KCV_LENGTH]
    finally:
        copy.destroy()


def describe(obj: pkcs11.Object, *, key_class: int | None = None,
             attrs: dict[Attribute, Any] | None = None) -> pb.KeyInfo:
    """KeyInfo of one object (``key_class`` overrides the class, e.g. KEY_PAIR)."""
    attrs = attrs if attrs is not None else read_attributes(obj)
    shape = shape_of(attrs)
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
        label=str(attrs.get(Attribute.LABEL) or ""),
    )
    if shape.object_class == ObjectClass.SECRET_KEY and shape.is_aes:
        kcv = compute_kcv(obj, attrs, shape)
        if kcv:
            info.kcv = kcv
            info.kcv_method = pb.KCV_ZERO_BLOCK
    return info


def require_usage(shape: KeyShape, usage: int, label: str) -> None:
    if usage not in shape.usages:
        have = ", ".join(sorted(usage_name(u) for u in shape.usages)) or "none"
        raise FailedPrecondition(f"key {label} does not allow {usage_name(usage)} "
                                 f"(its usages: {have})")
