"""The issuer security domain: GlobalPlatform card management over SCP03,
and the PSD's *security executive* policy (docs/flows.md, flow A: A2 and
"Strict cards").

The ISD is one applet of the card (:mod:`virtual_psd.applet`); its
persistent data (key sets, sequence counter, "i", stored data, the policy) is
its own section of the card's state (:class:`IsdState`).

Policy, by the key set that opened the secure channel:

* transport set (KVN FF): anything (initial personalization installs the
  MKRK at 70 and the MK at its KVN, then deletes FF);
* MKRK set (KVN 70): add, replace and delete MK sets (01..6F), and rotate the
  MKRK itself; nothing else;
* an MK set or any other set: card management only, never an MK set, the
  MKRK or the transport set (6982).

Invariants, whoever asks (6985): the last MK set cannot be deleted, the
transport set cannot be deleted while no MK set exists, and only a transport
channel may delete the MKRK.

A card made *strict* (``IsdState.strict``, ``cms card init --strict``)
enforces the seed's rule to the letter: once the card holds the MKRK set, MK
sets are put, replaced and deleted only in a channel opened with it. A
transport channel opened while the card already held an MKRK set may still
replace the MKRK and delete the transport set, but answers 6982 to any PUT
KEY or DELETE KEY of an MK set. What a channel may do is fixed when it
opens, so the personalization channel that registers the MKRK on a fresh
card still installs the first MK after it (flow A1's one secured script);
an installation broken after the MKRK went in is finished through the MKRK
channel (``access_server/flows.py: install``). The default policy lets a
transport channel manage MK sets whatever the card holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Final

from cardcore import gp
from cardcore import tlv as T
from cardcore.apdu import CommandApdu
from cardcore.ins import Ins
from cardcore.kcv import kcv_aes, kcv_matches
from cardcore.psd import (
    ISD_AID,
    KeySetRole,
    Kvn,
    is_mk_kvn,
    key_set_role,
    psd_id_bytes,
)
from cardcore.scp03 import (
    CLA_SECURE_MESSAGING,
    CardChannel,
    Scp03Error,
    decrypt_key_data,
)
from cardcore.sw import SW
from virtual_psd.applet import CommandContext, StatusError
from virtual_psd.secure_channel import ChannelSession, SecureChannel
from virtual_psd.state import CardState, StateError

MAX_KEY_SETS: Final = 8
ISD_PRIVILEGES: Final = bytes.fromhex("9EFE80")

SECURED_INS: Final = frozenset({Ins.PUT_KEY, Ins.DELETE, Ins.GET_STATUS,
                                Ins.STORE_DATA})


@dataclass
class KeySet:
    """One SCP03 key set (ENC, MAC, DEK at KID 1, 2, 3)."""

    enc: bytes = field(repr=False)
    mac: bytes = field(repr=False)
    dek: bytes = field(repr=False)

    @property
    def key_length(self) -> int:
        return len(self.enc)

    def kcvs(self) -> tuple[bytes, bytes, bytes]:
        return kcv_aes(self.enc), kcv_aes(self.mac), kcv_aes(self.dek)

    def to_json(self) -> dict[str, Any]:
        return {"enc": self.enc.hex(), "mac": self.mac.hex(), "dek": self.dek.hex()}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KeySet:
        ks = cls(bytes.fromhex(obj["enc"]), bytes.fromhex(obj["mac"]),
                 bytes.fromhex(obj["dek"]))
        if {len(ks.enc), len(ks.mac), len(ks.dek)} - {ks.key_length} or \
                ks.key_length not in (16, 24, 32):
            raise StateError("key set with keys of unequal or invalid length")
        return ks


@dataclass
class IsdState:
    """The ISD's section of the card's persistent state."""

    key_sets: dict[int, KeySet]
    sequence_counter: int = 0
    scp_i: int = 0x70
    life_cycle: int = 0x0F  # SECURED
    stored_ber: dict[int, bytes] = field(default_factory=dict)
    stored_dgi: dict[int, bytes] = field(default_factory=dict)
    # The registry's entries for the other applets (life cycle, privileges), by AID in hex.
    applications: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The security executive's policy: False for the default one; True for a card
    # that manages MK sets only in a channel opened with the MKRK set once it holds
    # one. Set at the factory (``cms card init --strict``).
    strict: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "life_cycle": self.life_cycle,
            "scp_i": self.scp_i,
            "strict": self.strict,
            "sequence_counter": self.sequence_counter,
            "key_sets": {f"{kvn:02X}": ks.to_json() for kvn, ks in sorted(self.key_sets.items())},
            "stored_data": {
                "ber_tlv": {f"{t:X}": v.hex().upper() for t, v in sorted(self.stored_ber.items())},
                "dgi": {f"{t:04X}": v.hex().upper() for t, v in sorted(self.stored_dgi.items())},
            },
            "applications": copy.deepcopy(self.applications),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> IsdState:
        strict = obj.get("strict", False)
        if not isinstance(strict, bool):
            # A policy flag read as truthy text would make a strict card lax.
            raise StateError("malformed state file: strict must be true or false")
        try:
            stored = obj.get("stored_data", {})
            return cls(
                key_sets={int(k, 16): KeySet.from_json(v) for k, v in obj["key_sets"].items()},
                sequence_counter=int(obj["sequence_counter"]),
                scp_i=int(obj.get("scp_i", 0x70)),
                life_cycle=int(obj.get("life_cycle", 0x0F)),
                stored_ber={int(k, 16): bytes.fromhex(v)
                            for k, v in stored.get("ber_tlv", {}).items()},
                stored_dgi={int(k, 16): bytes.fromhex(v)
                            for k, v in stored.get("dgi", {}).items()},
                applications=copy.deepcopy(obj.get("applications", {})),
                strict=strict,
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StateError(f"malformed state file: {exc}") from exc

    def copy(self) -> IsdState:
        """A working copy: a command changes it, and it is committed only at the end.

        Built field by field (bytes are immutable; the containers and key sets
        are new), not through JSON: the card copies it for every APDU the ISD
        processes.
        """
        return IsdState(
            key_sets={kvn: KeySet(ks.enc, ks.mac, ks.dek) for kvn, ks in self.key_sets.items()},
            sequence_counter=self.sequence_counter, scp_i=self.scp_i,
            life_cycle=self.life_cycle, stored_ber=dict(self.stored_ber),
            stored_dgi=dict(self.stored_dgi), applications=copy.deepcopy(self.applications),
            strict=self.strict)


def isd_state(state: CardState) -> IsdState:
    """The ISD's section of ``state`` (StateError if the card has none or it is malformed)."""
    return state.section(ISD_AID, IsdState)


@dataclass
class IsdSession(ChannelSession):
    """The ISD's volatile state: the secure channel and a STORE DATA in progress."""

    # Strict policy: this channel was opened, with a set other than the MKRK,
    # on a card that already held the MKRK set, so it may not touch MK sets.
    mk_locked: bool = False
    store_buffer: bytearray = field(default_factory=bytearray, repr=False)
    store_next_block: int = 0


def default_kvn(state: IsdState) -> int | None:
    """KVN 0 in INITIALIZE UPDATE: transport if present, else newest MK, else MKRK."""
    sets = state.key_sets
    if Kvn.TRANSPORT in sets:
        return Kvn.TRANSPORT
    mks = [k for k in sets if is_mk_kvn(k)]
    if mks:
        return max(mks)
    if Kvn.MKRK in sets:
        return Kvn.MKRK
    return min(sets) if sets else None


def may_put(session_kvn: int, target_kvn: int) -> bool:
    """Whether a channel opened with ``session_kvn`` may write the set ``target_kvn``."""
    role, target = key_set_role(session_kvn), key_set_role(target_kvn)
    if role is KeySetRole.TRANSPORT:
        return True
    if role is KeySetRole.MKRK:
        return target in (KeySetRole.MASTER, KeySetRole.MKRK)
    return target is KeySetRole.OTHER


def mk_locked(state: IsdState, session_kvn: int) -> bool:
    """Whether a channel opened now with ``session_kvn`` is barred from MK sets (strict).

    The seed lets only the MKRK unlock master key replacement; a strict card
    applies that from the moment it holds an MKRK set, to every other channel.
    """
    return state.strict and Kvn.MKRK in state.key_sets and \
        key_set_role(session_kvn) is not KeySetRole.MKRK


def may_delete(session_kvn: int, target_kvn: int) -> bool:
    role, target = key_set_role(session_kvn), key_set_role(target_kvn)
    if role is KeySetRole.TRANSPORT:
        return True
    if role is KeySetRole.MKRK:
        return target is KeySetRole.MASTER
    return target is KeySetRole.OTHER


class IssuerSecurityDomain:
    aid = ISD_AID

    def __init__(self) -> None:
        self.channel = SecureChannel(self.aid, self.aid, IsdSession)

    # framework hooks ---------------------------------------------------------

    def read_section(self, state: CardState) -> None:
        isd_state(state)

    def _state(self, ctx: CommandContext) -> IsdState:
        """This command's working copy of the ISD's section."""
        return ctx.section(self.aid, IsdState)

    def _session(self, ctx: CommandContext) -> IsdSession:
        return self.channel.session(ctx)

    def _end_session(self, ctx: CommandContext) -> None:
        self.channel.end(ctx)

    def select(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        # Selecting the ISD (again) ends any secure channel session.
        self._end_session(ctx)
        return gp.select_response(self.aid, 0xFFFF)

    def deselect(self, ctx: CommandContext) -> None:
        self._end_session(ctx)

    # dispatch ------------------------------------------------------------------

    def process(self, ctx: CommandContext, command: CommandApdu) -> tuple[bytes, int]:
        ins = command.ins
        if ins == Ins.INITIALIZE_UPDATE:
            return self._initialize_update(ctx, command)
        if ins == Ins.EXTERNAL_AUTHENTICATE:
            return self.channel.external_authenticate(ctx, self._state(ctx).scp_i, command)
        wrapped = bool(command.cla & CLA_SECURE_MESSAGING)
        try:
            command = self.channel.unwrap(ctx, command, SECURED_INS)
        except StatusError as exc:
            return b"", exc.sw
        session = self._session(ctx)
        try:
            data, sw = self._handle(ctx, session, command)
        except StatusError as exc:
            data, sw = b"", exc.sw
        if wrapped:
            return self.channel.protect(session, data, sw)
        return data, sw

    def _handle(self, ctx: CommandContext, session: IsdSession,
                command: CommandApdu) -> tuple[bytes, int]:
        ins = command.ins
        # GlobalPlatform uses the proprietary class (80); like many cards, the
        # ISD also accepts the interindustry class (00) some hosts send.
        if ins == Ins.GET_DATA:
            return self._get_data(ctx, command), SW.OK
        if ins in SECURED_INS:
            if not session.authenticated:
                raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED)
            if ins == Ins.PUT_KEY:
                return self._put_key(ctx, session, command), SW.OK
            if ins == Ins.DELETE:
                return self._delete(ctx, session, command), SW.OK
            if ins == Ins.GET_STATUS:
                return self._get_status(ctx, command), SW.OK
            return self._store_data(ctx, session, command), SW.OK
        raise StatusError(SW.INS_NOT_SUPPORTED)

    # INITIALIZE UPDATE / EXTERNAL AUTHENTICATE -----------------------------------

    def _initialize_update(self, ctx: CommandContext, command: CommandApdu
                           ) -> tuple[bytes, int]:
        state = self._state(ctx)
        kvn = default_kvn(state) if command.p1 == 0 else command.p1

        def opened(channel: CardChannel, kvn: int, dek: bytes) -> IsdSession:
            return IsdSession(channel=channel, kvn=kvn, dek=dek, mk_locked=mk_locked(state, kvn))

        return self.channel.initialize_update(ctx, state, command, kvn, opened)

    # GET DATA -----------------------------------------------------------------

    def _get_data(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        tag = (command.p1 << 8) | command.p2
        state = self._state(ctx)
        if tag == gp.TAG_CPLC:
            return T.tlv(gp.TAG_CPLC, ctx.state.cplc)
        if tag == gp.TAG_CARD_DATA:
            return gp.encode_card_data(state.scp_i)
        if tag == gp.TAG_KEY_INFORMATION:
            return gp.encode_key_information(
                gp.KeyInfo(kid, kvn, ((gp.KEY_TYPE_AES, ks.key_length),))
                for kvn, ks in sorted(state.key_sets.items()) for kid in (1, 2, 3))
        if tag == gp.TAG_CIN:
            return T.tlv(gp.TAG_CIN, psd_id_bytes(ctx.state.psd_id))
        if tag in state.stored_ber:
            return T.tlv(tag, state.stored_ber[tag])
        raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)

    # PUT KEY ------------------------------------------------------------------

    def _put_key(self, ctx: CommandContext, session: IsdSession,
                 command: CommandApdu) -> bytes:
        state = self._state(ctx)
        assert session.kvn is not None and session.dek is not None
        replace_kvn = command.p1
        if command.p2 != 0x81:
            raise StatusError(SW.INCORRECT_P1P2, "a whole key set (KID 1..3) at once")
        try:
            new_kvn, components = gp.parse_put_key_data(command.data)
        except gp.GpError as exc:
            raise StatusError(SW.WRONG_DATA) from exc
        if new_kvn == 0 or len(components) != 3:
            raise StatusError(SW.WRONG_DATA)
        lengths = {c.key_length for c in components}
        if len(lengths) != 1 or lengths.pop() not in (16, 24, 32):
            raise StatusError(SW.WRONG_DATA)
        keys = []
        for comp in components:
            if comp.key_type != gp.KEY_TYPE_AES or len(comp.kcv) != 3:
                raise StatusError(SW.WRONG_DATA)
            try:
                key = decrypt_key_data(session.dek, comp.encrypted, comp.key_length)
            except Scp03Error as exc:
                raise StatusError(SW.WRONG_DATA) from exc
            if not kcv_matches(key, comp.kcv):
                raise StatusError(SW.WRONG_DATA, "KCV mismatch")
            keys.append(key)
        targets = [new_kvn] if replace_kvn == 0 else [replace_kvn, new_kvn]
        if not all(may_put(session.kvn, t) for t in targets):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED)
        if session.mk_locked and any(is_mk_kvn(t) for t in targets):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED,
                              "strict: MK sets change only in an MKRK channel")
        if replace_kvn == 0:
            if new_kvn in state.key_sets:
                raise StatusError(SW.WRONG_DATA, "KVN already in use")
            if len(state.key_sets) >= MAX_KEY_SETS:
                raise StatusError(SW.NOT_ENOUGH_MEMORY)
        else:
            if replace_kvn not in state.key_sets:
                raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)
            if key_set_role(replace_kvn) is not key_set_role(new_kvn):
                raise StatusError(SW.WRONG_DATA, "a replacement keeps the set's role")
            if new_kvn != replace_kvn and new_kvn in state.key_sets:
                raise StatusError(SW.WRONG_DATA, "KVN already in use")
            del state.key_sets[replace_kvn]
        new_set = KeySet(*keys)
        state.key_sets[new_kvn] = new_set
        return gp.put_key_response(new_kvn, new_set.kcvs())

    # DELETE -------------------------------------------------------------------

    def _delete(self, ctx: CommandContext, session: IsdSession, command: CommandApdu) -> bytes:
        state = self._state(ctx)
        assert session.kvn is not None
        if command.p1 != 0x00 or command.p2 not in (0x00, 0x80):
            raise StatusError(SW.INCORRECT_P1P2)
        try:
            kvn, kid, aid = gp.parse_delete_data(command.data)
        except gp.GpError as exc:
            raise StatusError(SW.WRONG_DATA) from exc
        if aid is not None:
            raise StatusError(SW.REFERENCED_DATA_NOT_FOUND, "no deletable application")
        if kvn is None:
            raise StatusError(SW.WRONG_DATA, "keys are deleted by KVN")
        if kvn not in state.key_sets:
            raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)
        if kid is not None:
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "key sets are deleted whole")
        if not may_delete(session.kvn, kvn):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED)
        if session.mk_locked and is_mk_kvn(kvn):
            raise StatusError(SW.SECURITY_STATUS_NOT_SATISFIED,
                              "strict: MK sets change only in an MKRK channel")
        remaining = [k for k in state.key_sets if k != kvn]
        role = key_set_role(kvn)
        if role is KeySetRole.MASTER and not any(is_mk_kvn(k) for k in remaining):
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "last MK set")
        if role is KeySetRole.TRANSPORT and not any(is_mk_kvn(k) for k in remaining):
            raise StatusError(SW.CONDITIONS_NOT_SATISFIED, "no MK set installed yet")
        del state.key_sets[kvn]
        return gp.DELETE_CONFIRMATION

    # GET STATUS ---------------------------------------------------------------

    def _get_status(self, ctx: CommandContext, command: CommandApdu) -> bytes:
        if command.p1 not in (gp.STATUS_ISD, gp.STATUS_APPLICATIONS, gp.STATUS_LOAD_FILES,
                              gp.STATUS_LOAD_FILES_AND_MODULES):
            raise StatusError(SW.INCORRECT_P1P2)
        if not command.p2 & gp.STATUS_P2_TLV or command.p2 & ~0x03:
            raise StatusError(SW.INCORRECT_P1P2, "only the TLV response format")
        try:
            prefix = gp.parse_get_status_data(command.data)
        except gp.GpError as exc:
            raise StatusError(SW.WRONG_DATA) from exc
        if command.p2 & gp.STATUS_P2_NEXT:
            raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)  # everything fits one response
        entries: list[gp.ApplicationStatus] = []
        state = self._state(ctx)
        if command.p1 == gp.STATUS_ISD and self.aid.startswith(prefix):
            entries.append(gp.ApplicationStatus(self.aid, state.life_cycle, ISD_PRIVILEGES))
        elif command.p1 == gp.STATUS_APPLICATIONS:
            for aid in ctx.applets:
                if aid != self.aid and aid.startswith(prefix):
                    info = state.applications.get(aid.hex().upper(), {})
                    entries.append(gp.ApplicationStatus(
                        aid, int(info.get("life_cycle", 0x07)),
                        bytes.fromhex(info.get("privileges", "000000"))))
        if not entries:
            raise StatusError(SW.REFERENCED_DATA_NOT_FOUND)
        return b"".join(e.encode() for e in entries)

    # STORE DATA ---------------------------------------------------------------

    def _store_data(self, ctx: CommandContext, session: IsdSession,
                    command: CommandApdu) -> bytes:
        p1, block = command.p1, command.p2
        structure = p1 & gp.STORE_STRUCTURE_MASK
        if p1 & gp.STORE_ENCRYPTED or structure not in (gp.STORE_DGI, gp.STORE_BER_TLV) \
                or p1 & 0x07:
            self._reset_store(session)
            raise StatusError(SW.INCORRECT_P1P2)
        if block != session.store_next_block:
            self._reset_store(session)
            raise StatusError(SW.INCORRECT_P1P2, "STORE DATA blocks out of sequence")
        session.store_buffer += command.data
        session.store_next_block = block + 1
        if not p1 & gp.STORE_LAST_BLOCK:
            if block == 0xFF:
                self._reset_store(session)
                raise StatusError(SW.WRONG_DATA)
            return b""
        data = bytes(session.store_buffer)
        self._reset_store(session)
        state = self._state(ctx)
        try:
            if structure == gp.STORE_DGI:
                for tag, value in gp.parse_dgis(data):
                    state.stored_dgi[tag] = value
            else:
                for item in T.parse_tlvs(data):
                    if item.tag > 0xFFFF:
                        raise gp.GpError("only one- and two-byte tags can be read back")
                    state.stored_ber[item.tag] = item.value
        except (gp.GpError, T.TlvError) as exc:
            raise StatusError(SW.WRONG_DATA) from exc
        return b""

    @staticmethod
    def _reset_store(session: IsdSession) -> None:
        session.store_buffer = bytearray()
        session.store_next_block = 0

