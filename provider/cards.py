"""In-process virtual cards for ``cms provider init-pack``: a directory of card state files.

The virtual card is a part of its own (``virtual_psd``): its modules are
found by name when virtual cards are asked for, as the card agent finds them
for ``--virtual``, so the provider system has no import edge to it. The
cards found in the directory are tried first (those already initialized are
reported and skipped); missing ones are made as the card factory makes them,
with transport keys diversified from its transport master and the PSD id.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from provider.pack import CardLink

VIRTUAL_SOURCE = "virtual_psd.agent_source"
VIRTUAL_FACTORY = "virtual_psd.factory"
STATE_SUFFIX = ".json"
PSD_ID_BYTES = 10


class CardSourceError(Exception):
    """Virtual cards cannot be had as asked (reported as one line)."""


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise CardSourceError(f"the virtual card is not available ({exc}); install "
                              "'cms[card]' or use --agents") from None


def _link(source: ModuleType, path: Path, fault: str | None = None) -> CardLink:
    try:
        transport = source.VirtualTransport(source.open_virtual_card(path, fault))
    except source.VirtualCardError as exc:
        raise CardSourceError(str(exc)) from None
    return CardLink(path.name, transport.transmit, transport.close)


def existing_cards(card_dir: Path) -> list[Path]:
    return sorted(card_dir.glob(f"*{STATE_SUFFIX}")) if card_dir.is_dir() else []


def new_card(card_dir: Path, transport_master: bytes) -> Path:
    """A factory-fresh card's state file in ``card_dir``, named by its PSD id."""
    factory = _module(VIRTUAL_FACTORY)
    psd_id = secrets.token_bytes(PSD_ID_BYTES).hex().upper()
    path = card_dir / f"{psd_id}{STATE_SUFFIX}"
    try:
        factory.create_card(path, psd_id=psd_id, transport_master=transport_master)
    except (OSError, ValueError) as exc:
        raise CardSourceError(f"cannot make a virtual card in {card_dir}: {exc}") from None
    return path


def virtual_cards(card_dir: Path, transport_master: bytes | None,
                  faults: dict[str, str] | None = None) -> Iterator[CardLink]:
    """The cards of ``card_dir``, then new ones while a transport master is given.

    ``faults`` maps a state file's name to a fault plan (``virtual_psd.faults``), for
    tests of cards that lose power midway.
    """
    source = _module(VIRTUAL_SOURCE)
    plans = faults or {}
    for path in existing_cards(card_dir):
        yield _link(source, path, plans.get(path.name))
    while transport_master is not None:
        path = new_card(card_dir, transport_master)
        yield _link(source, path, plans.get(path.name))
