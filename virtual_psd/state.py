"""The virtual card's persistent memory: a versioned JSON file.

This is the card's EEPROM: key values are in it, in clear, as they would be
in a real chip's protected memory. The file is never logged and is written
with mode 0600. Writes are atomic (temporary file, fsync, rename, fsync of
the directory) so a power loss or a killed process leaves either the old or
the new state, never a mix.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cardcore.kcv import kcv_aes

FORMAT: Final = "cms-virtual-psd"
VERSION: Final = 1


class StateError(Exception):
    """The state file is missing, unreadable or of an unknown format."""


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
class CardState:
    """Everything the card keeps across power cycles."""

    psd_id: str
    cplc: bytes
    key_sets: dict[int, KeySet]
    sequence_counter: int = 0
    scp_i: int = 0x70
    life_cycle: int = 0x0F  # SECURED
    stored_ber: dict[int, bytes] = field(default_factory=dict)
    stored_dgi: dict[int, bytes] = field(default_factory=dict)
    applications: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The security executive's policy (virtual_psd/isd.py): False for the default
    # one; True for a card that manages MK sets only in a channel opened with the
    # MKRK set once it holds one. Set at the factory (``cms card init --strict``).
    strict: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "psd_id": self.psd_id,
            "cplc": self.cplc.hex().upper(),
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
    def from_json(cls, obj: dict[str, Any]) -> CardState:
        if obj.get("format") != FORMAT:
            raise StateError("not a virtual PSD state file")
        if obj.get("version") != VERSION:
            raise StateError(f"unsupported state version {obj.get('version')!r}")
        strict = obj.get("strict", False)
        if not isinstance(strict, bool):
            # A policy flag read as truthy text would make a strict card lax.
            raise StateError("malformed state file: strict must be true or false")
        try:
            stored = obj.get("stored_data", {})
            return cls(
                psd_id=str(obj["psd_id"]),
                cplc=bytes.fromhex(obj["cplc"]),
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

    def copy(self) -> CardState:
        """A working copy: a command changes it, and it is committed only at the end.

        Built field by field (bytes are immutable; the containers and key sets
        are new), not through JSON: the card copies its state for every APDU.
        """
        return CardState(
            psd_id=self.psd_id, cplc=bytes(self.cplc),
            key_sets={kvn: KeySet(ks.enc, ks.mac, ks.dek) for kvn, ks in self.key_sets.items()},
            sequence_counter=self.sequence_counter, scp_i=self.scp_i,
            life_cycle=self.life_cycle, stored_ber=dict(self.stored_ber),
            stored_dgi=dict(self.stored_dgi), applications=copy.deepcopy(self.applications),
            strict=self.strict)

    def _fields(self) -> tuple[Any, ...]:
        return (self.psd_id, bytes(self.cplc), self.key_sets, self.sequence_counter,
                self.scp_i, self.life_cycle, self.stored_ber, self.stored_dgi,
                self.applications, self.strict)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CardState) and self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]


def load_state(path: str | os.PathLike[str]) -> CardState:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError(f"cannot read card state {path}: {exc.strerror}") from exc
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise StateError(f"card state {path} is not JSON") from exc
    return CardState.from_json(obj)


def save_state(path: str | os.PathLike[str], state: CardState) -> None:
    """Write ``state`` atomically and durably."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    data = (json.dumps(state.to_json(), indent=2, sort_keys=True) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
