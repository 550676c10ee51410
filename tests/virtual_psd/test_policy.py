"""The security executive policy of DESIGN.md §3 (flows A1 and A2 on the card)."""

from __future__ import annotations

import pytest

from cardcore import gp
from cardcore import sw as SW
from cardcore.diversify import StaticKeySet
from tests.virtual_psd.conftest import (
    MK1,
    MK2,
    MKRK,
    TRANSPORT,
    key_versions,
    open_session,
    personalize,
    put_key,
)
from virtual_psd.card import VirtualCard
from virtual_psd.state import load_state

OTHER = StaticKeySet(b"\x51" * 16, b"\x52" * 16, b"\x53" * 16)


def test_initial_personalization(card: VirtualCard) -> None:
    personalize(card)
    assert key_versions(card) == [0x01, 0x70]
    assert sorted(load_state(card.state_path).key_sets) == [0x01, 0x70]
    # The transport keys no longer open anything; MK and MKRK do.
    assert open_session(card, 0x01, MK1).send(gp.get_status_command())[1] == SW.OK
    assert open_session(card, 0x70, MKRK).send(gp.get_status_command())[1] == SW.OK


def test_transport_cannot_be_retired_before_an_mk_exists(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    assert put_key(s, TRANSPORT.dek, MKRK, 0x70)[1] == SW.OK
    assert s.send(gp.delete_key_command(0xFF))[1] == SW.CONDITIONS_NOT_SATISFIED
    assert key_versions(card) == [0x70, 0xFF]


@pytest.mark.parametrize("new_kvn, replace_kvn", [
    (0x02, 0x00),   # add another MK
    (0x01, 0x01),   # replace the MK in place
    (0x02, 0x01),   # replace the MK by a new version
    (0x70, 0x70),   # replace the MKRK
    (0xFF, 0x00),   # bring back a transport set (would bypass the policy)
])
def test_mk_channel_cannot_touch_mk_mkrk_or_transport(card: VirtualCard, new_kvn: int,
                                                      replace_kvn: int) -> None:
    personalize(card)
    s = open_session(card, 0x01, MK1)
    assert put_key(s, MK1.dek, MK2, new_kvn, replace_kvn)[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED
    assert key_versions(card) == [0x01, 0x70]
    # The refusal did not end the session: card management goes on.
    assert s.send(gp.get_status_command())[1] == SW.OK


def test_mk_channel_may_not_delete_mk_or_mkrk_but_may_manage_other_sets(
        card: VirtualCard) -> None:
    personalize(card)
    s = open_session(card, 0x01, MK1)
    assert s.send(gp.delete_key_command(0x01))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert s.send(gp.delete_key_command(0x70))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    data, sw, expected = put_key(s, MK1.dek, OTHER, 0x71)
    assert (sw, data) == (SW.OK, expected)
    assert s.send(gp.delete_key_command(0x71))[1] == SW.OK
    assert key_versions(card) == [0x01, 0x70]


def test_mkrk_channel_replaces_the_mk(card: VirtualCard) -> None:
    """Flow A2: unlock with the MKRK, install the new MK, delete the old one."""
    personalize(card)
    s = open_session(card, 0x70, MKRK)
    data, sw, expected = put_key(s, MKRK.dek, MK2, 0x02)
    assert (sw, data) == (SW.OK, expected)
    assert s.send(gp.delete_key_command(0x01))[1] == SW.OK
    assert key_versions(card) == [0x02, 0x70]
    # The last MK cannot go, whoever asks.
    assert s.send(gp.delete_key_command(0x02))[1] == SW.CONDITIONS_NOT_SATISFIED
    assert open_session(card, 0x02, MK2).send(gp.get_status_command())[1] == SW.OK
    with pytest.raises(Exception, match="6A88"):
        open_session(card, 0x01, MK1)


def test_mkrk_channel_replaces_in_one_command_and_keeps_roles(card: VirtualCard) -> None:
    personalize(card)
    s = open_session(card, 0x70, MKRK)
    assert put_key(s, MKRK.dek, MK2, 0x02, replace_kvn=0x01)[1] == SW.OK
    assert key_versions(card) == [0x02, 0x70]
    # A replacement cannot move a set into another role (MK -> MKRK slot).
    assert put_key(s, MKRK.dek, MK1, 0x70, replace_kvn=0x02)[1] == SW.WRONG_DATA
    # MKRK channel: nothing outside MK sets and its own rotation.
    assert put_key(s, MKRK.dek, OTHER, 0x71)[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert put_key(s, MKRK.dek, OTHER, 0xFF)[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert s.send(gp.delete_key_command(0x70))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    # Rotating the MKRK itself is allowed through the MKRK channel.
    new_mkrk = StaticKeySet(b"\x81" * 16, b"\x82" * 16, b"\x83" * 16)
    assert put_key(s, MKRK.dek, new_mkrk, 0x70, replace_kvn=0x70)[1] == SW.OK
    assert open_session(card, 0x70, new_mkrk).send(gp.get_status_command())[1] == SW.OK


def test_add_at_a_used_kvn_and_card_memory_limit(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    assert put_key(s, TRANSPORT.dek, MK1, 0x01)[1] == SW.OK
    assert put_key(s, TRANSPORT.dek, MK2, 0x01)[1] == SW.WRONG_DATA
    assert put_key(s, TRANSPORT.dek, MK2, 0x05, replace_kvn=0x04)[1] == \
        SW.REFERENCED_DATA_NOT_FOUND
    for kvn in range(0x02, 0x08):
        assert put_key(s, TRANSPORT.dek, MK2, kvn)[1] == SW.OK
    assert put_key(s, TRANSPORT.dek, MK2, 0x08)[1] == SW.NOT_ENOUGH_MEMORY
    assert len(card.state.key_sets) == 8
