"""GlobalPlatform card management commands and response parsers
(Card Specification v2.3, chapter 11, and Amendment D for SCP03 keys).

Builders return plain (unprotected) APDUs as bytes; a secure channel wraps
them. Parsers take response *data* (no status word) and raise
:class:`GpError` (a ``ValueError``) on anything malformed, so the same
functions serve the card emulator, which maps that error to ``6A80``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

from cardcore import tlv as T
from cardcore.apdu import encode_command
from cardcore.ins import Ins
from cardcore.psd import TAG_CPLC
from cardcore.scp03 import InitializeUpdateResponse

CLA_ISO: Final = 0x00
CLA_GP: Final = 0x80

# The whole response data of a successful DELETE (Card Specification v2.3 §11.2.3.1).
DELETE_CONFIRMATION: Final = b"\x00"

TAG_CARD_DATA: Final = 0x66
TAG_CARD_RECOGNITION: Final = 0x73
TAG_KEY_INFORMATION: Final = 0xE0
TAG_KEY_INFORMATION_DATA: Final = 0xC0
TAG_IIN: Final = 0x42
TAG_CIN: Final = 0x45
TAG_FCI: Final = 0x6F
TAG_AID: Final = 0x4F
TAG_DF_NAME: Final = 0x84
TAG_FCI_PROPRIETARY: Final = 0xA5
TAG_MAX_COMMAND_LENGTH: Final = 0x9F65
TAG_GP_REGISTRY: Final = 0xE3
TAG_LIFE_CYCLE: Final = 0x9F70
TAG_PRIVILEGES: Final = 0xC5
TAG_TAG_LIST: Final = 0x5C
TAG_DELETE_KID: Final = 0xD0
TAG_DELETE_KVN: Final = 0xD2

KEY_TYPE_AES: Final = 0x88
KEY_TYPE_EXTENDED: Final = 0xFF

# GET STATUS P1
STATUS_ISD: Final = 0x80
STATUS_APPLICATIONS: Final = 0x40
STATUS_LOAD_FILES: Final = 0x20
STATUS_LOAD_FILES_AND_MODULES: Final = 0x10
STATUS_P2_TLV: Final = 0x02
STATUS_P2_NEXT: Final = 0x01

# STORE DATA P1
STORE_LAST_BLOCK: Final = 0x80
STORE_ENCRYPTED: Final = 0x60
STORE_DGI: Final = 0x08
STORE_BER_TLV: Final = 0x10
STORE_STRUCTURE_MASK: Final = 0x18

# OIDs of Card Recognition Data (GP Card Specification §H.2).
OID_GP_RID: Final = bytes.fromhex("2A864886FC6B01")
OID_CARD_MANAGEMENT_PREFIX: Final = bytes.fromhex("2A864886FC6B02")
OID_CARD_IDENTIFICATION: Final = bytes.fromhex("2A864886FC6B03")
OID_SCP_PREFIX: Final = bytes.fromhex("2A864886FC6B04")


class GpError(ValueError):
    """Malformed GlobalPlatform command or response data."""


def _parse(data: bytes) -> list[T.Tlv]:
    try:
        return T.parse_tlvs(data)
    except T.TlvError as exc:
        raise GpError(str(exc)) from exc


# --- SELECT ------------------------------------------------------------------


def select_command(aid: bytes | None = None) -> bytes:
    """SELECT by name (P1=04, first or only occurrence); no AID = default selection."""
    if aid is None:
        return encode_command(CLA_ISO, Ins.SELECT, 0x04, 0x00, ne=256)
    if not 5 <= len(aid) <= 16:
        raise GpError("an AID is 5 to 16 bytes")
    return encode_command(CLA_ISO, Ins.SELECT, 0x04, 0x00, aid, ne=256)


def select_response(aid: bytes, max_command_length: int = 0xFF) -> bytes:
    """The FCI an ISD returns (GP Card Specification §11.9.3.1)."""
    length = max_command_length.to_bytes(2 if max_command_length > 0xFF else 1, "big")
    return T.tlv(TAG_FCI, [T.tlv(TAG_DF_NAME, aid),
                           T.tlv(TAG_FCI_PROPRIETARY, T.tlv(TAG_MAX_COMMAND_LENGTH, length))])


def parse_select_response(data: bytes) -> bytes:
    """The AID (DF name) in an FCI."""
    fci = _parse(data)
    top = T.find(fci, TAG_FCI)
    if top is None:
        raise GpError("SELECT response is not an FCI template")
    name = T.find(_parse(top.value), TAG_DF_NAME)
    if name is None:
        raise GpError("FCI without DF name")
    return name.value


# --- GET DATA ----------------------------------------------------------------


def get_data_command(tag: int, data: bytes = b"") -> bytes:
    """GET DATA for a one- or two-byte tag (e.g. CPLC 9F7F, card data 66, keys E0)."""
    if not 0 < tag <= 0xFFFF:
        raise GpError("GET DATA takes a one- or two-byte tag")
    return encode_command(CLA_GP, Ins.GET_DATA, tag >> 8, tag & 0xFF, data, ne=256)


def unwrap_get_data(tag: int, data: bytes) -> bytes:
    """The value of ``tag`` in a GET DATA response, whether or not the card wrapped it."""
    items = _parse(data)
    if len(items) == 1 and items[0].tag == tag:
        return items[0].value
    return data


@dataclass(frozen=True)
class KeyInfo:
    """One entry of the key information template: KID, KVN and (type, length) components."""

    kid: int
    kvn: int
    components: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        body = bytes((self.kid, self.kvn))
        for key_type, length in self.components:
            if length > 0xFF:
                raise GpError("key length over 255 needs the extended format")
            body += bytes((key_type, length))
        return T.tlv(TAG_KEY_INFORMATION_DATA, body)


def encode_key_information(keys: Iterable[KeyInfo]) -> bytes:
    return T.tlv(TAG_KEY_INFORMATION, [k.encode() for k in keys])


def parse_key_information(data: bytes) -> list[KeyInfo]:
    """Parse GET DATA E0 (with or without its E0 wrapper); basic format only."""
    items = _parse(data)
    if len(items) == 1 and items[0].tag == TAG_KEY_INFORMATION:
        items = _parse(items[0].value)
    out = []
    for item in items:
        if item.tag != TAG_KEY_INFORMATION_DATA:
            raise GpError(f"unexpected tag 0x{item.tag:X} in key information")
        v = item.value
        if len(v) < 4 or len(v) % 2:
            raise GpError("malformed key information data")
        comps = tuple((v[i], v[i + 1]) for i in range(2, len(v), 2))
        out.append(KeyInfo(v[0], v[1], comps))
    return out


def key_versions(infos: Iterable[KeyInfo]) -> dict[int, list[KeyInfo]]:
    """Key information grouped by KVN."""
    out: dict[int, list[KeyInfo]] = {}
    for info in infos:
        out.setdefault(info.kvn, []).append(info)
    return out


def encode_card_data(scp_i: int, card_management_version: bytes = b"\x02\x03\x01") -> bytes:
    """Card recognition data (GET DATA 66) announcing SCP03 with parameter ``i``."""
    def oid_tag(tag: int, oid: bytes) -> bytes:
        return T.tlv(tag, T.tlv(0x06, oid))

    body = [T.tlv(0x06, OID_GP_RID),
            oid_tag(0x60, OID_CARD_MANAGEMENT_PREFIX + card_management_version),
            oid_tag(0x63, OID_CARD_IDENTIFICATION),
            oid_tag(0x64, OID_SCP_PREFIX + bytes((0x03, scp_i)))]
    return T.tlv(TAG_CARD_DATA, T.tlv(TAG_CARD_RECOGNITION, body))


def parse_card_data_scp(data: bytes) -> list[tuple[int, int]]:
    """The (SCP, i) pairs announced by card recognition data (GET DATA 66)."""
    items = _parse(data)
    if len(items) == 1 and items[0].tag == TAG_CARD_DATA:
        items = _parse(items[0].value)
    rec = T.find(items, TAG_CARD_RECOGNITION)
    if rec is None:
        raise GpError("no card recognition data (tag 73)")
    out = []
    for item in _parse(rec.value):
        if item.tag != 0x64:
            continue
        oid = T.find(_parse(item.value), 0x06)
        if oid and oid.value.startswith(OID_SCP_PREFIX) and len(oid.value) == len(
                OID_SCP_PREFIX) + 2:
            out.append((oid.value[-2], oid.value[-1]))
    return out


# --- INITIALIZE UPDATE / EXTERNAL AUTHENTICATE --------------------------------


def initialize_update_command(kvn: int, host_challenge: bytes) -> bytes:
    """INITIALIZE UPDATE with key version ``kvn`` (0 = the card's default set)."""
    if len(host_challenge) not in (8, 16):
        raise GpError("host challenge is 8 (S8) or 16 (S16) bytes")
    if not 0 <= kvn <= 0xFF:
        raise GpError("KVN is one byte")
    return encode_command(CLA_GP, Ins.INITIALIZE_UPDATE, kvn, 0x00, host_challenge, ne=256)


def parse_initialize_update_response(data: bytes) -> InitializeUpdateResponse:
    return InitializeUpdateResponse.parse(data)


# --- PUT KEY -----------------------------------------------------------------


@dataclass(frozen=True)
class KeyComponent:
    """One key in PUT KEY data: encrypted value, clear length and KCV."""

    encrypted: bytes = field(repr=False)
    key_length: int
    kcv: bytes
    key_type: int = KEY_TYPE_AES

    def encode(self) -> bytes:
        """Amendment D format: type 88, length, clear key length, encrypted key, KCV."""
        if len(self.encrypted) % 16 or self.key_length > len(self.encrypted):
            raise GpError("encrypted key must be whole AES blocks covering the key")
        value = bytes((self.key_length,)) + self.encrypted
        return (bytes((self.key_type,)) + T.encode_length(len(value)) + value
                + bytes((len(self.kcv),)) + self.kcv)


def put_key_command(new_kvn: int, components: Sequence[KeyComponent], *,
                    replace_kvn: int = 0, first_kid: int = 1) -> bytes:
    """PUT KEY of a whole key set (P2 b8 = several keys, starting at ``first_kid``).

    ``replace_kvn`` 0 adds a set; otherwise it names the set being replaced.
    """
    if not 1 <= new_kvn <= 0xFF or not 0 <= replace_kvn <= 0xFF:
        raise GpError("KVN out of range")
    if not components or not 1 <= first_kid <= 0x7F:
        raise GpError("PUT KEY needs at least one key and a KID of 1..127")
    p2 = first_kid | (0x80 if len(components) > 1 else 0)
    data = bytes((new_kvn,)) + b"".join(c.encode() for c in components)
    return encode_command(CLA_GP, Ins.PUT_KEY, replace_kvn, p2, data, ne=256)


def parse_put_key_data(data: bytes) -> tuple[int, list[KeyComponent]]:
    """Card side: new KVN and key components of a PUT KEY (after unwrapping).

    Accepts the Amendment D form (clear key length byte, then the encrypted
    key) and the bare form where the encrypted value is exactly the key.
    """
    if len(data) < 1:
        raise GpError("PUT KEY without data")
    new_kvn, offset, out = data[0], 1, []
    while offset < len(data):
        key_type = data[offset]
        offset += 1
        if key_type == KEY_TYPE_EXTENDED:
            raise GpError("extended key format not supported")
        length, offset = _read_length(data, offset)
        value = data[offset:offset + length]
        if len(value) != length:
            raise GpError("truncated key component")
        offset += length
        if offset >= len(data):
            raise GpError("missing KCV length")
        kcv_len = data[offset]
        kcv = data[offset + 1:offset + 1 + kcv_len]
        if len(kcv) != kcv_len:
            raise GpError("truncated KCV")
        offset += 1 + kcv_len
        if length % 16 == 1 and value[0] <= length - 1:
            key_length, encrypted = value[0], value[1:]
        elif length % 16 == 0 and length:
            key_length, encrypted = length, value
        else:
            raise GpError("key component length does not fit an AES key")
        out.append(KeyComponent(encrypted, key_length, kcv, key_type))
    if not out:
        raise GpError("PUT KEY without key components")
    return new_kvn, out


def _read_length(data: bytes, offset: int) -> tuple[int, int]:
    if offset >= len(data):
        raise GpError("missing length")
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    n = first & 0x7F
    if n not in (1, 2) or offset + 1 + n > len(data):
        raise GpError("bad length encoding")
    return int.from_bytes(data[offset + 1:offset + 1 + n], "big"), offset + 1 + n


def put_key_response(kvn: int, kcvs: Sequence[bytes]) -> bytes:
    return bytes((kvn,)) + b"".join(kcvs)


def parse_put_key_response(data: bytes, key_count: int = 3,
                           kcv_length: int = 3) -> tuple[int, list[bytes]]:
    """``(kvn, [kcv, ...])`` from a PUT KEY response."""
    if len(data) != 1 + key_count * kcv_length:
        raise GpError(f"PUT KEY response of {len(data)} bytes, expected "
                      f"{1 + key_count * kcv_length}")
    return data[0], [data[1 + i * kcv_length:1 + (i + 1) * kcv_length]
                     for i in range(key_count)]


# --- DELETE KEY --------------------------------------------------------------


def delete_key_command(kvn: int, kid: int | None = None) -> bytes:
    """DELETE of a key set by KVN (tag D2), optionally one key by KID (tag D0)."""
    if not 1 <= kvn <= 0xFF:
        raise GpError("KVN out of range")
    data = T.tlv(TAG_DELETE_KVN, bytes((kvn,)))
    if kid is not None:
        data = T.tlv(TAG_DELETE_KID, bytes((kid,))) + data
    return encode_command(CLA_GP, Ins.DELETE, 0x00, 0x00, data, ne=256)


def foreseen_answer(apdu: bytes) -> bytes | None:
    """The response data a successful command always returns, when it is fixed.

    DELETE answers a single byte '00' (Card Specification v2.3 §11.2.3.1);
    a PUT KEY's answer depends on its keys (:func:`put_key_response`) and
    other commands' on the card's content: ``None``.
    """
    if len(apdu) >= 4 and apdu[1] == Ins.DELETE:
        return DELETE_CONFIRMATION
    return None


def parse_delete_data(data: bytes) -> tuple[int | None, int | None, bytes | None]:
    """Card side: ``(kvn, kid, aid)`` from DELETE data."""
    kvn = kid = aid = None
    for item in _parse(data):
        if item.tag == TAG_DELETE_KVN and len(item.value) == 1:
            kvn = item.value[0]
        elif item.tag == TAG_DELETE_KID and len(item.value) == 1:
            kid = item.value[0]
        elif item.tag == TAG_AID and 5 <= len(item.value) <= 16:
            aid = item.value
        else:
            raise GpError(f"unexpected DELETE tag 0x{item.tag:X}")
    if kvn is None and kid is None and aid is None:
        raise GpError("DELETE names nothing")
    return kvn, kid, aid


# --- GET STATUS --------------------------------------------------------------


@dataclass(frozen=True)
class ApplicationStatus:
    aid: bytes
    life_cycle: int
    privileges: bytes

    def encode(self) -> bytes:
        return T.tlv(TAG_GP_REGISTRY, [T.tlv(TAG_AID, self.aid),
                                       T.tlv(TAG_LIFE_CYCLE, bytes((self.life_cycle,))),
                                       T.tlv(TAG_PRIVILEGES, self.privileges)])


def get_status_command(p1: int = STATUS_ISD, aid_prefix: bytes = b"", *,
                       next_occurrence: bool = False) -> bytes:
    """GET STATUS, response in TLV format (P2 b2), search on AID prefix."""
    p2 = STATUS_P2_TLV | (STATUS_P2_NEXT if next_occurrence else 0)
    return encode_command(CLA_GP, Ins.GET_STATUS, p1, p2, T.tlv(TAG_AID, aid_prefix), ne=256)


def parse_get_status_response(data: bytes) -> list[ApplicationStatus]:
    out = []
    for item in _parse(data):
        if item.tag != TAG_GP_REGISTRY:
            raise GpError(f"unexpected tag 0x{item.tag:X} in GET STATUS response")
        fields = _parse(item.value)
        aid = T.find(fields, TAG_AID)
        lc = T.find(fields, TAG_LIFE_CYCLE)
        priv = T.find(fields, TAG_PRIVILEGES)
        if aid is None or lc is None or len(lc.value) != 1:
            raise GpError("GET STATUS entry without AID or life cycle")
        out.append(ApplicationStatus(aid.value, lc.value[0], priv.value if priv else b""))
    return out


def parse_get_status_data(data: bytes) -> bytes:
    """Card side: the AID prefix searched for (tag 4F); extra tags are ignored."""
    items = _parse(data)
    aid = T.find(items, TAG_AID)
    if aid is None:
        raise GpError("GET STATUS without search criterion 4F")
    return aid.value


# --- STORE DATA --------------------------------------------------------------


def store_data_commands(data: bytes, *, structure: int = STORE_BER_TLV,
                        block_size: int = 0xEF) -> list[bytes]:
    """STORE DATA blocks numbered from 0, the last one flagged (P1 b8).

    ``block_size`` leaves room for an SCP03 MAC and padding in a short APDU.
    """
    if structure & ~STORE_STRUCTURE_MASK:
        raise GpError("structure must be STORE_DGI, STORE_BER_TLV or 0")
    chunks = [data[i:i + block_size] for i in range(0, len(data), block_size)] or [b""]
    if len(chunks) > 256:
        raise GpError("STORE DATA is limited to 256 blocks")
    out = []
    for n, chunk in enumerate(chunks):
        p1 = structure | (STORE_LAST_BLOCK if n == len(chunks) - 1 else 0)
        out.append(encode_command(CLA_GP, Ins.STORE_DATA, p1, n, chunk))
    return out


def encode_dgi(tag: int, value: bytes) -> bytes:
    """One DGI (GP §11.11.2.2): 2-byte tag, length 1 byte or FF + 2 bytes."""
    if not 0 <= tag <= 0xFFFF:
        raise GpError("DGI tag is two bytes")
    n = len(value)
    length = bytes((n,)) if n < 0xFF else b"\xFF" + n.to_bytes(2, "big")
    return tag.to_bytes(2, "big") + length + value


def parse_dgis(data: bytes) -> list[tuple[int, bytes]]:
    out, offset = [], 0
    while offset < len(data):
        if offset + 3 > len(data):
            raise GpError("truncated DGI header")
        tag = int.from_bytes(data[offset:offset + 2], "big")
        n = data[offset + 2]
        offset += 3
        if n == 0xFF:
            if offset + 2 > len(data):
                raise GpError("truncated DGI length")
            n = int.from_bytes(data[offset:offset + 2], "big")
            offset += 2
        if offset + n > len(data):
            raise GpError(f"DGI {tag:04X} truncated")
        out.append((tag, bytes(data[offset:offset + n])))
        offset += n
    return out


# --- CPLC --------------------------------------------------------------------


def parse_cplc(data: bytes) -> bytes:
    """The 42 CPLC bytes from a GET DATA 9F7F response (tag optional)."""
    body = unwrap_get_data(TAG_CPLC, data)
    if len(body) != 42:
        raise GpError(f"CPLC is 42 bytes, got {len(body)}")
    return body

