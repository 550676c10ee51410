"""This system's conventions for a PSD (personal security device).

The PSD is a GlobalPlatform card. Its issuer security domain (ISD) is the
*security executive*; its key sets (ENC/MAC/DEK at KID 1/2/3) are the *high
level key slots*, identified by key version number (KVN):

* ``0xFF``        transport (factory) key set, retired at personalization
* ``0x70``        MKRK, the master key replacement key set
* ``0x01..0x6F``  master key (MK) sets, KVN = MK version

The *non-mutable unique identification number* (PSD id) is taken from the
card's CPLC: IC fabricator (2) || IC type (2) || IC batch identifier (2) ||
IC serial number (4), as 20 uppercase hex digits.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from typing import Final

from cardcore import tlv as T

ISD_AID: Final = bytes.fromhex("A000000151000000")
# The Card Production Life Cycle data object (GET DATA 9F7F), where a PSD keeps
# the unique id of claims 2 and 29; kept here, free of dependencies, so that
# light parts of the system can read a card's id.
TAG_CPLC: Final = 0x9F7F
KID_ENC: Final = 1
KID_MAC: Final = 2
KID_DEK: Final = 3


class Kvn(IntEnum):
    """The key version numbers that give a key set its role on a PSD.

    Members are the KVN bytes on the wire (INITIALIZE UPDATE P1, PUT KEY,
    the key information template), so they compare with what a card reports.
    """

    MK_MIN = 0x01
    """The first master key set: MK version 1."""
    MK_MAX = 0x6F
    """The last master key set: MK version 111."""
    MKRK = 0x70
    TRANSPORT = 0xFF


MK_KVNS: Final = range(Kvn.MK_MIN, Kvn.MK_MAX + 1)
"""The KVNs of master key sets (KVN = MK version)."""

# GlobalPlatform's well-known test key, for factory sets used with third-party hosts.
GP_DEFAULT_KEY: Final = bytes(range(0x40, 0x50))

PSD_ID_LENGTH: Final = 10
CPLC_LENGTH: Final = 42

# CPLC field offsets (GlobalPlatform Card Specification, Card Production Life Cycle).
_CPLC_FABRICATOR = slice(0, 2)
_CPLC_IC_TYPE = slice(2, 4)
_CPLC_SERIAL = slice(12, 16)
_CPLC_BATCH = slice(16, 18)


class KeySetRole(Enum):
    TRANSPORT = "transport"
    MKRK = "mkrk"
    MASTER = "mk"
    OTHER = "other"


def key_set_role(kvn: int) -> KeySetRole:
    """What a KVN is for in this system."""
    if not 0 <= kvn <= 0xFF:
        raise ValueError("a KVN is one byte")
    if kvn == Kvn.TRANSPORT:
        return KeySetRole.TRANSPORT
    if kvn == Kvn.MKRK:
        return KeySetRole.MKRK
    if kvn in MK_KVNS:
        return KeySetRole.MASTER
    return KeySetRole.OTHER


def is_mk_kvn(kvn: int) -> bool:
    return kvn in MK_KVNS


def mk_kvn(version: int) -> int:
    """The KVN of master key version ``version`` (1..111)."""
    if not Kvn.MK_MIN <= version <= Kvn.MK_MAX:
        raise ValueError(f"MK version must be {Kvn.MK_MIN}..{Kvn.MK_MAX}, got {version}")
    return version


def _cplc_body(cplc: bytes) -> bytes:
    """Accept the 42 CPLC bytes, or the GET DATA response with its 9F7F tag."""
    cplc = bytes(cplc)
    if len(cplc) != CPLC_LENGTH:
        cplc = T.parse_single(cplc, TAG_CPLC).value
    if len(cplc) != CPLC_LENGTH:
        raise ValueError(f"CPLC is {CPLC_LENGTH} bytes, got {len(cplc)}")
    return cplc


def psd_id_bytes_from_cplc(cplc: bytes) -> bytes:
    body = _cplc_body(cplc)
    return body[_CPLC_FABRICATOR] + body[_CPLC_IC_TYPE] + body[_CPLC_BATCH] + body[_CPLC_SERIAL]


def psd_id_from_cplc(cplc: bytes) -> str:
    """The PSD id (20 uppercase hex digits) from CPLC data (with or without tag 9F7F)."""
    return psd_id_bytes_from_cplc(cplc).hex().upper()


def psd_id_bytes(psd_id: str) -> bytes:
    """The 10 bytes of a PSD id given as hex (case-insensitive)."""
    try:
        raw = bytes.fromhex(psd_id)
    except ValueError as exc:
        raise ValueError(f"PSD id is not hex: {psd_id!r}") from exc
    if len(raw) != PSD_ID_LENGTH:
        raise ValueError(f"PSD id is {PSD_ID_LENGTH} bytes ({2 * PSD_ID_LENGTH} hex digits)")
    return raw


def normalize_psd_id(psd_id: str) -> str:
    return psd_id_bytes(psd_id).hex().upper()


def cplc_for_psd_id(psd_id: bytes, *, os_id: bytes = b"\x43\x4D",
                    os_release: bytes = b"\x01\x00") -> bytes:
    """42 CPLC bytes that carry ``psd_id`` (for a virtual card's factory)."""
    if len(psd_id) != PSD_ID_LENGTH:
        raise ValueError("PSD id is 10 bytes")
    body = bytearray(CPLC_LENGTH)
    body[_CPLC_FABRICATOR] = psd_id[0:2]
    body[_CPLC_IC_TYPE] = psd_id[2:4]
    body[4:6] = os_id
    body[8:10] = os_release
    body[_CPLC_BATCH] = psd_id[4:6]
    body[_CPLC_SERIAL] = psd_id[6:10]
    return bytes(body)
