"""The virtual card's persistent memory: a versioned JSON file.

This is the card's EEPROM: key values are in it, in clear, as they would be
in a real chip's protected memory. The file is never logged and is written
with mode 0600. Writes are atomic (temporary file, fsync, rename, fsync of
the directory) so a power loss or a killed process leaves either the old or
the new state, never a mix.

The card's own data (its PSD id and CPLC) sits at the top; each applet keeps
its state in a section of its own under ``applets``, keyed by its AID. A
section stays as read from the file until its applet decodes it
(:meth:`CardState.section`), so this module knows no applet and a card file
carries sections of applets that a given reader does not know, unchanged.

Version 1 files kept the issuer security domain's data at the top level;
they are read as version 2 with that data as the ISD's section, and written
as version 2 at the card's next change.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, Self, TypeVar

from cardcore.psd import ISD_AID

FORMAT: Final = "cms-virtual-psd"
VERSION: Final = 2

# What version 1 kept at the top level and version 2 keeps in the ISD's section.
_V1_ISD_FIELDS: Final = ("key_sets", "sequence_counter", "scp_i", "life_cycle", "strict",
                         "stored_data", "applications")


class StateError(Exception):
    """The state file is missing, unreadable or of an unknown format."""


class AppletState(Protocol):
    """One applet's section of the card's persistent memory.

    The card copies a section for every command that uses it and commits the
    copy only when the command succeeds, so ``copy`` must share nothing
    mutable, and equality must see every field (an unseen change would not be
    written).
    """

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Self: ...

    def copy(self) -> Self: ...

    def __eq__(self, other: object) -> bool: ...


S = TypeVar("S", bound=AppletState)

# A decoded section, or a section as read from the file until its applet asks for it.
Section = AppletState | dict[str, Any]


@dataclass(eq=False)
class CardState:
    """Everything the card keeps across power cycles."""

    psd_id: str
    cplc: bytes
    sections: dict[bytes, Section] = field(default_factory=dict)

    def section(self, aid: bytes, kind: type[S]) -> S:
        """The section of the applet ``aid``, decoded as ``kind`` (once, then kept).

        StateError when the card has no such section or it does not decode.
        """
        held = self.sections.get(aid)
        if isinstance(held, kind):
            return held
        if held is None:
            raise StateError(f"card state has no section for applet {aid.hex().upper()}")
        if not isinstance(held, dict):
            raise StateError(f"section of applet {aid.hex().upper()} is held as "
                             f"{type(held).__name__}, not {kind.__name__}")
        decoded = kind.from_json(held)
        self.sections[aid] = decoded
        return decoded

    def with_sections(self, changed: Mapping[bytes, AppletState]) -> CardState:
        """The state after a command that changed ``changed``; the other sections are shared.

        Sharing is safe: applets change only their working copies, never a
        committed section.
        """
        return CardState(self.psd_id, self.cplc, {**self.sections, **changed})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "psd_id": self.psd_id,
            "cplc": self.cplc.hex().upper(),
            "applets": {aid.hex().upper(): _section_json(s)
                        for aid, s in sorted(self.sections.items())},
        }

    @classmethod
    def from_json(cls, obj: object) -> CardState:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise StateError("not a virtual PSD state file")
        if obj.get("version") == 1:
            obj = _from_version_1(obj)
        if obj.get("version") != VERSION:
            raise StateError(f"unsupported state version {obj.get('version')!r}")
        try:
            applets = obj["applets"]
            if not isinstance(applets, dict) or \
                    not all(isinstance(v, dict) for v in applets.values()):
                raise TypeError("applets must map AIDs to sections")
            return cls(
                psd_id=str(obj["psd_id"]),
                cplc=bytes.fromhex(obj["cplc"]),
                sections={bytes.fromhex(aid): copy.deepcopy(s) for aid, s in applets.items()},
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise StateError(f"malformed state file: {exc}") from exc

    def copy(self) -> CardState:
        """A copy that shares nothing mutable with this state."""
        return CardState(self.psd_id, bytes(self.cplc),
                         {aid: copy.deepcopy(s) if isinstance(s, dict) else s.copy()
                          for aid, s in self.sections.items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CardState):
            return False
        if (self.psd_id, bytes(self.cplc), set(self.sections)) != \
                (other.psd_id, bytes(other.cplc), set(other.sections)):
            return False
        return all(_same_section(s, other.sections[aid]) for aid, s in self.sections.items())

    __hash__ = None  # type: ignore[assignment]


def _section_json(section: Section) -> dict[str, Any]:
    return copy.deepcopy(section) if isinstance(section, dict) else section.to_json()


def _same_section(a: Section, b: Section) -> bool:
    if isinstance(a, dict) or isinstance(b, dict) or type(a) is not type(b):
        return _section_json(a) == _section_json(b)
    return a == b


def _from_version_1(obj: dict[str, Any]) -> dict[str, Any]:
    """A version 1 file read as version 2: its ISD data becomes the ISD's section."""
    isd = {name: obj[name] for name in _V1_ISD_FIELDS if name in obj}
    rest = {name: value for name, value in obj.items() if name not in _V1_ISD_FIELDS}
    return {**rest, "version": VERSION, "applets": {ISD_AID.hex().upper(): isd}}


def load_state(path: str | os.PathLike[str]) -> CardState:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StateError(f"cannot read card state {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise StateError(f"card state {path} is not text") from exc
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
