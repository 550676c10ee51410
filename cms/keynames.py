"""Token names and key labels: one place for the names every part uses.

The HSM proxy decides a key's class from its label (``hsm_proxy.key_classes``),
key management makes the labels, the access server asks for them: all of them
read the forms here, so a label means the same class everywhere.

Labels::

    mk/<version>               MK_BLOCK              master key data block (seed 000)
    mkrk/<version>             MKRK_BLOCK            master key replacement key block
    cryptogram/<version>       CRYPTOGRAM_PAIR       RSA pair that makes the cryptograms of R
    transport/<name>           TRANSPORT_KEY         moves blocks from HSM2 to HSM1
    factory/transport-master   FACTORY_TRANSPORT_MASTER   diversifies the cards' initial keys
    audit/<name>               AUDIT_KEY             signs the proxy's audit head
    provider-root/<provider>   PROVIDER_ROOT         the provider's root CA key (seed 004)
    issuer/<version>           ISSUER_KEY            the issuer's P-256 key, injected into cards
    issuer-seed/<version>      ISSUER_SEED           the issuer's BIP32 seed (token issuer)
    device-auth-kek/<version>  DEVICE_AUTH_KEK       wraps device authentication keys
                                                     (token issuer-system)
    bureau/<name>              BUREAU_KEY            the bureau's P-256 key: signs its results
                                                     and shipping files (token bureau)
    bureau-codes/<name>        BUREAU_CODES_KEY      the bureau's HMAC key its cards' PIN and PUK
                                                     are derived under (token bureau)
    mailer/<name>              MAILER_KEY            the mailing house's RSA-2048 key: opens
                                                     mailer data (token mailer)
    mailer-sign/<name>         MAILER_SIGN_KEY       the mailing house's P-256 key: signs its
                                                     dispatch confirmations (token mailer)
    anything else              OPERATOR_KEY          an operator's own keys (policy: demo/*)

Each form is made and read by the functions here (``mk_label(3)``,
``parse_block_label``, ``parse_named_label``, ``provider_root_label``,
``issuer_key_label``, ``issuer_seed_label``, ``device_auth_kek_label``, ``partner_label``,
``label_pattern``), never by
formatting or splitting a label elsewhere: the proxy's policy patterns, key
management's checks and the access server's requests then cannot drift apart.
"""

from __future__ import annotations

import re

HSM1_TOKEN = "access"
"""The access side's token (HSM1): blocks are used here, never made."""
HSM2_TOKEN = "kms"
"""Key management's token (HSM2): blocks are generated here and leave only wrapped."""
PROVIDER_TOKEN = "provider"
"""The provider's HSM (seed 004): its root CA key and the root certificate beside it."""
ISSUER_TOKEN = "issuer"
"""The issuer's HSM (seed 004): the issuer keys whose public halves go into every card."""
ISSUER_SYSTEM_TOKEN = "issuer-system"
"""The issuer system's HSM (seed 004, B3): the key-encryption key under which the cards'
device authentication keys are kept, wrapped."""
BUREAU_TOKEN = "bureau"
"""The personalization bureau's HSM (seed 004, B4): the key that signs its results and
shipping files, and its certificate beside it."""
MAILER_TOKEN = "mailer"
"""The mailing house's HSM (seed 004, B4): the key that opens the PINs mailed to users."""
TOKENS = (HSM1_TOKEN, HSM2_TOKEN, PROVIDER_TOKEN, ISSUER_TOKEN, ISSUER_SYSTEM_TOKEN,
          BUREAU_TOKEN, MAILER_TOKEN)

MK, MKRK, CRYPTOGRAM, TRANSPORT, FACTORY, AUDIT = (
    "mk", "mkrk", "cryptogram", "transport", "factory", "audit")
PROVIDER_ROOT, ISSUER = "provider-root", "issuer"
ISSUER_SEED, DEVICE_AUTH_KEK = "issuer-seed", "device-auth-kek"
BUREAU, BUREAU_CODES, MAILER, MAILER_SIGN = "bureau", "bureau-codes", "mailer", "mailer-sign"
PARTNER_KINDS = (BUREAU, BUREAU_CODES, MAILER, MAILER_SIGN)
ISSUER_KEY_VERSIONS = range(1, 256)
"""Issuer key versions: one byte, as cards and payloads name them; seeds and device
authentication KEKs are versioned the same way."""
BLOCK_KINDS = (MK, MKRK, CRYPTOGRAM)
FACTORY_TRANSPORT_MASTER = "factory/transport-master"
AUDIT_KEY = "audit/hsm-proxy"
OPERATOR_PREFIX = "demo/"
"""Labels the default policy lets the operator (identity admin) make and use."""

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_VERSIONED = re.compile(rf"^({MK}|{MKRK}|{CRYPTOGRAM})/([1-9][0-9]{{0,8}})$")
_NAMED = re.compile(rf"^({TRANSPORT}|{AUDIT})/({_NAME})$")
_PROVIDER_ROOT = re.compile(rf"^{PROVIDER_ROOT}/({_NAME})$")
_ISSUER = re.compile(rf"^{ISSUER}/([1-9][0-9]{{0,2}})$")
_ISSUER_SEED = re.compile(rf"^{ISSUER_SEED}/([1-9][0-9]{{0,2}})$")
_DEVICE_AUTH_KEK = re.compile(rf"^{DEVICE_AUTH_KEK}/([1-9][0-9]{{0,2}})$")
_PARTNER = re.compile(rf"^({BUREAU}|{BUREAU_CODES}|{MAILER}|{MAILER_SIGN})/({_NAME})$")
PROVIDER_ID_PATTERN = re.compile(rf"^{_NAME}$")
"""A provider id: letters, digits, '.', '_', '-', up to 64, first a letter or digit."""


def block_label(kind: str, version: int) -> str:
    """``mk/3``, ``mkrk/1``, ``cryptogram/2``."""
    if kind not in BLOCK_KINDS:
        raise ValueError(f"a key block is one of {', '.join(BLOCK_KINDS)}, not {kind!r}")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"block versions start at 1, not {version!r}")
    return f"{kind}/{version}"


def mk_label(version: int) -> str:
    """The master key block of MK version ``version``: ``mk/3``."""
    return block_label(MK, version)


def mkrk_label(version: int) -> str:
    """The master key replacement key block of version ``version``: ``mkrk/1``."""
    return block_label(MKRK, version)


def cryptogram_label(version: int) -> str:
    """The RSA pair of version ``version`` that makes and opens the cryptograms of R."""
    return block_label(CRYPTOGRAM, version)


def label_pattern(kind: str) -> str:
    """``mk/*``: every label of ``kind``, as the proxy's policy and its listings match them."""
    if kind not in (*BLOCK_KINDS, TRANSPORT, AUDIT, PROVIDER_ROOT, ISSUER, ISSUER_SEED,
                    DEVICE_AUTH_KEK, *PARTNER_KINDS):
        raise ValueError(f"no label pattern for {kind!r}")
    return f"{kind}/*"


def parse_block_label(label: str) -> tuple[str, int] | None:
    """(kind, version) of a block label, or None."""
    m = _VERSIONED.match(label)
    return (m.group(1), int(m.group(2))) if m else None


def transport_label(name: str) -> str:
    return f"{TRANSPORT}/{name}"


def parse_named_label(label: str) -> tuple[str, str] | None:
    """(kind, name) of ``transport/NAME`` or ``audit/NAME``, or None; NAME is letters,
    digits, '.', '_', '-', up to 64, first a letter or digit."""
    m = _NAMED.match(label)
    return (m.group(1), m.group(2)) if m else None


def provider_root_label(provider_id: str) -> str:
    """The root CA key of provider ``provider_id``: ``provider-root/acme``."""
    if not isinstance(provider_id, str) or not PROVIDER_ID_PATTERN.match(provider_id):
        raise ValueError(f"provider id {provider_id!r}: 1-64 of letters, digits, '.', '_', "
                         f"'-', first a letter or digit")
    return f"{PROVIDER_ROOT}/{provider_id}"


def parse_provider_root_label(label: str) -> str | None:
    """The provider id of ``provider-root/<id>``, or None."""
    m = _PROVIDER_ROOT.match(label)
    return m.group(1) if m else None


def partner_label(kind: str, name: str) -> str:
    """A key of the bureau or mailing house ``name``: ``bureau/bureau-1``,
    ``bureau-codes/bureau-1``, ``mailer/post``, ``mailer-sign/post``."""
    if kind not in PARTNER_KINDS:
        raise ValueError(f"a partner key is one of {', '.join(PARTNER_KINDS)}, not {kind!r}")
    if not isinstance(name, str) or not PROVIDER_ID_PATTERN.match(name):
        raise ValueError(f"{kind} name {name!r}: 1-64 of letters, digits, '.', '_', '-', "
                         f"first a letter or digit")
    return f"{kind}/{name}"


def parse_partner_label(label: str) -> tuple[str, str] | None:
    """(kind, name) of ``bureau/NAME``, ``bureau-codes/NAME``, ``mailer/NAME`` or
    ``mailer-sign/NAME``, or None."""
    m = _PARTNER.match(label)
    return (m.group(1), m.group(2)) if m else None


def _versioned(kind: str, what: str, version: int) -> str:
    if not isinstance(version, int) or version not in ISSUER_KEY_VERSIONS:
        raise ValueError(f"{what} versions are 1 to 255, not {version!r}")
    return f"{kind}/{version}"


def _parse_versioned(pattern: re.Pattern[str], label: str) -> int | None:
    m = pattern.match(label)
    if m is None or int(m.group(1)) not in ISSUER_KEY_VERSIONS:
        return None
    return int(m.group(1))


def issuer_key_label(version: int) -> str:
    """The issuer key of version ``version`` (1..255): ``issuer/1``."""
    return _versioned(ISSUER, "issuer key", version)


def parse_issuer_key_label(label: str) -> int | None:
    """The version of ``issuer/<version>``, or None."""
    return _parse_versioned(_ISSUER, label)


def issuer_seed_label(version: int) -> str:
    """The issuer's BIP32 seed of version ``version`` (1..255): ``issuer-seed/1``."""
    return _versioned(ISSUER_SEED, "seed", version)


def parse_issuer_seed_label(label: str) -> int | None:
    """The version of ``issuer-seed/<version>``, or None."""
    return _parse_versioned(_ISSUER_SEED, label)


def device_auth_kek_label(version: int) -> str:
    """The device authentication KEK of version ``version`` (1..255): ``device-auth-kek/1``."""
    return _versioned(DEVICE_AUTH_KEK, "device authentication KEK", version)


def parse_device_auth_kek_label(label: str) -> int | None:
    """The version of ``device-auth-kek/<version>``, or None."""
    return _parse_versioned(_DEVICE_AUTH_KEK, label)


def label_kind(label: str) -> str | None:
    """The kind a label names (mk, mkrk, cryptogram, transport, factory, audit,
    provider-root, issuer, issuer-seed, device-auth-kek), or None for an operator's label."""
    parsed = parse_block_label(label)
    if parsed is not None:
        return parsed[0]
    if label == FACTORY_TRANSPORT_MASTER:
        return FACTORY
    named = parse_named_label(label)
    if named is not None:
        return named[0]
    if parse_provider_root_label(label) is not None:
        return PROVIDER_ROOT
    if parse_issuer_key_label(label) is not None:
        return ISSUER
    if parse_issuer_seed_label(label) is not None:
        return ISSUER_SEED
    if parse_device_auth_kek_label(label) is not None:
        return DEVICE_AUTH_KEK
    partner = parse_partner_label(label)
    if partner is not None:
        return partner[0]
    head = label.split("/", 1)[0]
    if head in (MK, MKRK, CRYPTOGRAM, TRANSPORT, FACTORY, AUDIT, PROVIDER_ROOT, ISSUER,
                ISSUER_SEED, DEVICE_AUTH_KEK, *PARTNER_KINDS):
        # A reserved prefix with a malformed rest is nobody's key: refused.
        return "reserved"
    return None
