"""Fixtures for the virtual PSD tests: a fresh card on disk, host sessions,
and (for the PC/SC tests) the private pcscd of tests/support/pcsc.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cardcore import gp, host
from cardcore.apdu import parse_response
from cardcore.diversify import StaticKeySet
from cardcore.psd import GP_DEFAULT_KEY
from tests.support.pcsc import pcscd_fixture
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state

PSD_ID = "4790504012340000ABCD"
TRANSPORT = StaticKeySet(GP_DEFAULT_KEY, GP_DEFAULT_KEY, GP_DEFAULT_KEY)
MKRK = StaticKeySet(b"\x71" * 16, b"\x72" * 16, b"\x73" * 16)
MK1 = StaticKeySet(b"\x11" * 16, b"\x12" * 16, b"\x13" * 16)
MK2 = StaticKeySet(b"\x21" * 16, b"\x22" * 16, b"\x23" * 16)

private_pcscd = pcscd_fixture()


@pytest.fixture
def state_path(tmp_path: Path) -> Path:
    path = tmp_path / "card.json"
    create_card(path, psd_id=PSD_ID)
    return path


@pytest.fixture
def card(state_path: Path) -> VirtualCard:
    c = VirtualCard.open(state_path)
    c.power_on()
    return c


def send(card: VirtualCard | Callable[[bytes], bytes], apdu: bytes) -> tuple[bytes, int]:
    transmit = card.transmit if isinstance(card, VirtualCard) else card
    return parse_response(transmit(apdu))


def open_session(card: VirtualCard, kvn: int, keys: StaticKeySet,
                 level: int = 0x33) -> host.SecureSession:
    return host.open_session(card.transmit, kvn=kvn, keys=keys, security_level=level)


def put_key(session: host.SecureSession, dek: bytes, new: StaticKeySet, new_kvn: int,
            replace_kvn: int = 0) -> tuple[bytes, int, bytes]:
    """PUT KEY through a session; returns (data, sw, expected response)."""
    cmd, expected = host.put_key_set_command(dek, new, new_kvn, replace_kvn)
    data, sw = session.send(cmd)
    return data, sw, expected


def personalize(card: VirtualCard) -> None:
    """Flow A1 on the card: MKRK at 70, MK at 01, transport FF retired."""
    s = open_session(card, 0xFF, TRANSPORT)
    for new, kvn in ((MKRK, 0x70), (MK1, 0x01)):
        data, sw, expected = put_key(s, TRANSPORT.dek, new, kvn)
        assert (sw, data) == (0x9000, expected)
    assert s.send(gp.delete_key_command(0xFF))[1] == 0x9000


def key_versions(card: VirtualCard) -> list[int]:
    return sorted(isd_state(card.state).key_sets)
