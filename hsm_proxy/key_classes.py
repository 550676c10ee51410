"""Key classes: one role per key, one template per role, chosen here and never by a caller.

This is the key-usage model the proxy enforces (docs/threat-model.md has the
table). A key's class comes from its label (``cms.keynames``); where it came
from (its *origin*) is a tag the proxy writes into CKA_ID when it makes the
key, and every later use checks both the tag and the object's attributes
against the class's template. Callers name purposes (generate a block,
transfer blocks, open a card channel); they never pass attributes.

Rules every template keeps (the classic attacks on PKCS#11 APIs: Clulow,
CHES 2003; Bortolozzo, Centenaro, Focardi, Steel, CCS 2010):

- no key both wraps and decrypts, or both unwraps and encrypts;
- a key that may leave an HSM is extractable only under a trusted key
  (CKA_WRAP_WITH_TRUSTED), and only transport keys are trusted;
- no key is modifiable or copyable, so no attribute can be turned on later;
- a secret or private key is always sensitive;
- keys derived from a block live only inside one worker operation and are
  never extractable (the one exception, a PUT KEY's new key set, is wrapped
  under the card's DEK inside that operation and never named by a handle).

Pure data: the frontend uses it to refuse early and the worker (through
``hsm_proxy.keyspec``) to build and check PKCS#11 templates.
"""

from __future__ import annotations

from dataclasses import dataclass

from cms import keynames
from cms.runtime.errors import PermissionDenied
from cms.v1 import hsm_pb2 as pb

SECRET, PRIVATE, PUBLIC = "secret", "private", "public"
WRAPPING, UNWRAPPING = "wrapping", "unwrapping"
"""The two halves of a transport key: trusted wrapping half in the source token (HSM2),
unwrapping half in the target (HSM1)."""

ROLE_NAMES: dict[int, str] = {
    pb.MK_BLOCK: "mk-block",
    pb.MKRK_BLOCK: "mkrk-block",
    pb.CRYPTOGRAM_PAIR: "cryptogram-pair",
    pb.TRANSPORT_KEY: "transport-key",
    pb.FACTORY_TRANSPORT_MASTER: "factory-transport-master",
    pb.AUDIT_KEY: "audit-key",
    pb.OPERATOR_KEY: "operator-key",
    pb.PROVIDER_ROOT: "provider-root",
    pb.ISSUER_KEY: "issuer-key",
    pb.ISSUER_SEED: "issuer-seed",
    pb.DEVICE_AUTH_KEK: "device-auth-kek",
    pb.DEVICE_AUTH_KEY: "device-auth-key",
    pb.BUREAU_KEY: "bureau-key",
    pb.MAILER_KEY: "mailer-key",
    pb.BUREAU_CODES_KEY: "bureau-codes-key",
    pb.MAILER_SIGN_KEY: "mailer-sign-key",
}
ROLE_BY_NAME = {v: k for k, v in ROLE_NAMES.items()}
ORIGIN_NAMES: dict[int, str] = {
    pb.KEY_ORIGIN_UNKNOWN: "unknown",
    pb.GENERATED: "generated",
    pb.TRANSFERRED: "transferred",
    pb.CEREMONY: "ceremony",
    pb.ESTABLISHED: "established",
    pb.DERIVED: "derived",
    pb.IMPORTED: "imported",
}
ORIGIN_BY_NAME = {v: k for k, v in ORIGIN_NAMES.items()}

_KIND_ROLES = {
    keynames.MK: pb.MK_BLOCK,
    keynames.MKRK: pb.MKRK_BLOCK,
    keynames.CRYPTOGRAM: pb.CRYPTOGRAM_PAIR,
    keynames.TRANSPORT: pb.TRANSPORT_KEY,
    keynames.FACTORY: pb.FACTORY_TRANSPORT_MASTER,
    keynames.AUDIT: pb.AUDIT_KEY,
    keynames.PROVIDER_ROOT: pb.PROVIDER_ROOT,
    keynames.ISSUER: pb.ISSUER_KEY,
    keynames.ISSUER_SEED: pb.ISSUER_SEED,
    keynames.DEVICE_AUTH_KEK: pb.DEVICE_AUTH_KEK,
    keynames.BUREAU: pb.BUREAU_KEY,
    keynames.MAILER: pb.MAILER_KEY,
    keynames.BUREAU_CODES: pb.BUREAU_CODES_KEY,
    keynames.MAILER_SIGN: pb.MAILER_SIGN_KEY,
}
BLOCK_ROLES = frozenset({pb.MK_BLOCK, pb.MKRK_BLOCK, pb.CRYPTOGRAM_PAIR})
CEREMONY_ROLES = frozenset({pb.TRANSPORT_KEY, pb.FACTORY_TRANSPORT_MASTER})

AES = frozenset({pb.AES_128, pb.AES_192, pb.AES_256})
ALGORITHMS: dict[int, frozenset[int]] = {
    pb.MK_BLOCK: frozenset({pb.AES_128, pb.AES_256}),
    pb.MKRK_BLOCK: frozenset({pb.AES_128, pb.AES_256}),
    pb.CRYPTOGRAM_PAIR: frozenset({pb.RSA_2048, pb.RSA_3072}),
    pb.TRANSPORT_KEY: AES,
    pb.FACTORY_TRANSPORT_MASTER: AES,
    pb.AUDIT_KEY: frozenset({pb.EC_P256}),
    pb.PROVIDER_ROOT: frozenset({pb.EC_P256}),
    pb.ISSUER_KEY: frozenset({pb.EC_P256}),
    pb.ISSUER_SEED: frozenset({pb.GENERIC_SECRET}),
    pb.DEVICE_AUTH_KEK: frozenset({pb.AES_256}),
    pb.DEVICE_AUTH_KEY: frozenset({pb.EC_P256}),
    pb.BUREAU_KEY: frozenset({pb.EC_P256}),
    pb.MAILER_KEY: frozenset({pb.RSA_2048}),
    pb.BUREAU_CODES_KEY: frozenset({pb.GENERIC_SECRET}),
    pb.MAILER_SIGN_KEY: frozenset({pb.EC_P256}),
}

# Usage groups an operator key may have (one group, any non-empty part of it).
OPERATOR_SECRET_GROUPS = (frozenset({pb.ENCRYPT, pb.DECRYPT}), frozenset({pb.SIGN, pb.VERIFY}),
                          frozenset({pb.DERIVE}))
OPERATOR_PRIVATE_GROUPS = (frozenset({pb.SIGN}), frozenset({pb.DECRYPT}), frozenset({pb.DERIVE}))
OPERATOR_PUBLIC_GROUPS = (frozenset({pb.VERIFY}), frozenset({pb.ENCRYPT}))
PUBLIC_COUNTERPART = {pb.SIGN: pb.VERIFY, pb.DECRYPT: pb.ENCRYPT}


class KeyClassError(PermissionDenied):
    """A request that the key's class does not allow: PERMISSION_DENIED, whatever the
    policy says (the policy grants identities; the class decides what a key does)."""


def role_name(role: int) -> str:
    return ROLE_NAMES.get(role, "no class")


def origin_name(origin: int) -> str:
    return ORIGIN_NAMES.get(origin, "unknown")


def role_of_label(label: str) -> int:
    """The class a label puts its key in; KEY_ROLE_UNSPECIFIED for a malformed reserved
    label (``mk/x``), which no operation accepts."""
    kind = keynames.label_kind(label)
    if kind is None:
        return pb.OPERATOR_KEY
    return _KIND_ROLES.get(kind, pb.KEY_ROLE_UNSPECIFIED)


def require_role(label: str, roles: frozenset[int] | set[int], what: str) -> int:
    """The label's class when it is one of ``roles``; KeyClassError naming both otherwise."""
    role = role_of_label(label)
    if role not in roles:
        wanted = " or ".join(sorted(role_name(r) for r in roles))
        if role == pb.KEY_ROLE_UNSPECIFIED:
            raise KeyClassError(f"{what} {label!r} is a malformed label of a reserved "
                                f"prefix; no operation accepts it")
        raise KeyClassError(f"{what} {label!r} is of key class {role_name(role)}; this "
                            f"operation takes key class {wanted}")
    return role


# ---------------------------------------------------------------------------
# Origin tags (CKA_ID)

TAG_PREFIX = "cms1"


@dataclass(frozen=True)
class Tag:
    """What the proxy wrote into a key's CKA_ID when it made the key."""

    role: int
    origin: int
    half: str = ""          # WRAPPING or UNWRAPPING for transport keys

    def encode(self) -> bytes:
        parts = [TAG_PREFIX, f"role={role_name(self.role)}", f"origin={origin_name(self.origin)}"]
        if self.half:
            parts.append(f"half={self.half}")
        return ";".join(parts).encode()


def decode_tag(raw: bytes) -> Tag | None:
    """The tag in a CKA_ID, or None when the proxy did not write it."""
    try:
        text = bytes(raw).decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(";")
    if not parts or parts[0] != TAG_PREFIX:
        return None
    fields: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or key in fields:
            return None
        fields[key] = value
    role = ROLE_BY_NAME.get(fields.get("role", ""))
    origin = ORIGIN_BY_NAME.get(fields.get("origin", ""))
    half = fields.get("half", "")
    if role is None or origin is None or half not in ("", WRAPPING, UNWRAPPING):
        return None
    return Tag(role, origin, half)


# ---------------------------------------------------------------------------
# Templates

@dataclass(frozen=True)
class ObjectTemplate:
    """The attributes of one object of a class (PKCS#11 names in the comments)."""

    object_class: str                      # SECRET, PRIVATE or PUBLIC
    usages: frozenset[int]                 # the usage attributes that are true
    extractable: bool = False              # CKA_EXTRACTABLE
    wrap_with_trusted: bool = False        # CKA_WRAP_WITH_TRUSTED
    trusted: bool = False                  # CKA_TRUSTED (security officer only)
    private: bool = True                   # CKA_PRIVATE (false: made in an SO session)

    @property
    def sensitive(self) -> bool:
        return self.object_class != PUBLIC


def _secret(*usages: int, extractable: bool = False, trusted: bool = False,
            private: bool = True) -> ObjectTemplate:
    return ObjectTemplate(SECRET, frozenset(usages), extractable, extractable, trusted, private)


# Blocks in the token they are generated in: wrappable under a trusted key, nothing else.
_BLOCK_SOURCE = _secret(extractable=True)
_BLOCK_TARGET = _secret(pb.DERIVE)
_PAIR_SOURCE = {PRIVATE: ObjectTemplate(PRIVATE, frozenset(), True, True),
                PUBLIC: ObjectTemplate(PUBLIC, frozenset(), private=False)}
_PAIR_TARGET = {PRIVATE: ObjectTemplate(PRIVATE, frozenset({pb.DECRYPT})),
                PUBLIC: ObjectTemplate(PUBLIC, frozenset({pb.ENCRYPT}), private=False)}
_TRANSPORT = {WRAPPING: _secret(pb.WRAP, trusted=True, private=False),
              UNWRAPPING: _secret(pb.UNWRAP)}


def block_template(role: int, origin: int) -> dict[str, ObjectTemplate]:
    """Objects of a block made by ``origin``: GENERATED (source) or TRANSFERRED (target)."""
    if role in (pb.MK_BLOCK, pb.MKRK_BLOCK):
        if origin == pb.GENERATED:
            return {SECRET: _BLOCK_SOURCE}
        if origin == pb.TRANSFERRED:
            return {SECRET: _BLOCK_TARGET}
    if role == pb.CRYPTOGRAM_PAIR:
        if origin == pb.GENERATED:
            return dict(_PAIR_SOURCE)
        if origin == pb.TRANSFERRED:
            return dict(_PAIR_TARGET)
    raise KeyClassError(f"a {role_name(role)} is not made by {origin_name(origin)}")


def transport_template(half: str) -> ObjectTemplate:
    return _TRANSPORT[half]


FACTORY_MASTER_TEMPLATE = _secret(pb.DERIVE)
AUDIT_TEMPLATE = {PRIVATE: ObjectTemplate(PRIVATE, frozenset({pb.SIGN})),
                  PUBLIC: ObjectTemplate(PUBLIC, frozenset({pb.VERIFY}), private=False)}
SIGNING_PAIR_ROLES = frozenset({pb.AUDIT_KEY, pb.PROVIDER_ROOT, pb.ISSUER_KEY, pb.BUREAU_KEY,
                                pb.MAILER_SIGN_KEY})
"""Classes that are one P-256 pair generated in the token, private half SIGN only and
never extractable: what each signs is decided by the one purpose that reaches it
(audit heads; the certificates and pack signatures ProviderCa builds; seed 004 part 2;
the bureau's and the mailing house's file signatures BureauHsm and MailerHsm build)."""
SIGNING_PAIR_TEMPLATE = AUDIT_TEMPLATE

SEED_BYTES = 64
"""The issuer seed: 512 bits, the longest seed BIP32 allows and the size of its HMAC-SHA512."""
ISSUER_SEED_TEMPLATE = ObjectTemplate(SECRET, frozenset(), extractable=True)
"""The seed: a GENERIC_SECRET with no usage at all, sensitive. SoftHSM has no BIP32
mechanism and keeps a sensitive value out of reach, so it is extractable, for the one
wrap that hands it to the worker deriving from it (under a one-time key made inside that
operation, ``issuer_ops``): no persistent key of its token may wrap (no class there has
WRAP), and not under a trusted key because only a security officer can make one."""
MAILER_TEMPLATE = {PRIVATE: ObjectTemplate(PRIVATE, frozenset({pb.DECRYPT})),
                   PUBLIC: ObjectTemplate(PUBLIC, frozenset({pb.ENCRYPT}), private=False)}
"""The mailing house's RSA-2048 pair: the private half decrypts and nothing else (no
unwrap, so nothing it opens becomes a key in the token), never extractable; the one
purpose that reaches it is OpenMailerData, which answers only PIN and PUK."""
BUREAU_CODES_BYTES = 32
BUREAU_CODES_TEMPLATE = _secret(pb.SIGN)
"""The bureau's 256-bit HMAC key: SIGN (CKM_SHA256_HMAC) only, never extractable; what it
signs is the proxy's own derivation input, and the output never leaves the worker."""
DEVICE_AUTH_KEK_TEMPLATE = _secret(pb.WRAP, pb.UNWRAP)
"""AES-256 that wraps and unwraps device authentication keys and nothing else: it never
encrypts or decrypts, so what it wraps never comes out in clear."""


def expected_objects(tag: Tag) -> dict[str, ObjectTemplate] | None:
    """The template a tagged key must match, or None when no such key is ever made."""
    role, origin = tag.role, tag.origin
    if role in BLOCK_ROLES:
        try:
            return block_template(role, origin)
        except KeyClassError:
            return None
    if role == pb.TRANSPORT_KEY and origin in (pb.CEREMONY, pb.ESTABLISHED) and tag.half:
        return {SECRET: _TRANSPORT[tag.half]}
    if role == pb.FACTORY_TRANSPORT_MASTER and origin == pb.CEREMONY:
        return {SECRET: FACTORY_MASTER_TEMPLATE}
    if role in SIGNING_PAIR_ROLES and origin == pb.GENERATED:
        return dict(SIGNING_PAIR_TEMPLATE)
    if role == pb.ISSUER_SEED and origin == pb.GENERATED:
        return {SECRET: ISSUER_SEED_TEMPLATE}
    if role == pb.DEVICE_AUTH_KEK and origin == pb.GENERATED:
        return {SECRET: DEVICE_AUTH_KEK_TEMPLATE}
    if role == pb.BUREAU_CODES_KEY and origin == pb.GENERATED:
        return {SECRET: BUREAU_CODES_TEMPLATE}
    if role == pb.MAILER_KEY and origin == pb.GENERATED:
        return dict(MAILER_TEMPLATE)
    return None


def operator_usages(object_class: str, usages: frozenset[int]) -> frozenset[int]:
    """``usages`` when they fit one usage group of an operator key; KeyClassError otherwise.

    Operator keys never wrap or unwrap: a key that wraps and a key that
    decrypts are the classic way out of an HSM, so this service has neither.
    """
    groups = {SECRET: OPERATOR_SECRET_GROUPS, PRIVATE: OPERATOR_PRIVATE_GROUPS,
              PUBLIC: OPERATOR_PUBLIC_GROUPS}[object_class]
    if usages and any(usages <= group for group in groups):
        return usages
    shown = "; ".join("/".join(pb.KeyUsage.Name(u) for u in sorted(g)) for g in groups)
    given = ", ".join(pb.KeyUsage.Name(u) for u in sorted(usages)) or "none"
    raise KeyClassError(f"an operator {object_class} key has the usages of one group "
                        f"({shown}); got {given}")


# ---------------------------------------------------------------------------
# Which purpose takes which class, from which origin

CARD_MASTER_ORIGINS: dict[int, frozenset[int]] = {
    # What CardKeys derives card key sets from: only what key management moved
    # into HSM1 under a trusted transport key, or a custodians' ceremony.
    pb.MK_BLOCK: frozenset({pb.TRANSFERRED}),
    pb.MKRK_BLOCK: frozenset({pb.TRANSFERRED}),
    pb.CRYPTOGRAM_PAIR: frozenset({pb.TRANSFERRED}),
    pb.FACTORY_TRANSPORT_MASTER: frozenset({pb.CEREMONY}),
}
TRANSPORT_ORIGINS = frozenset({pb.CEREMONY, pb.ESTABLISHED})
