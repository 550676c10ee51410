"""The security executive policy of docs/flows.md (flows A1 and A2 on the card), default
and strict."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cardcore import gp
from cardcore.diversify import StaticKeySet
from cardcore.psd import ISD_AID
from cardcore.sw import SW
from tests.virtual_psd.conftest import (
    MK1,
    MK2,
    MKRK,
    PSD_ID,
    TRANSPORT,
    key_versions,
    open_session,
    personalize,
    put_key,
)
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import StateError, load_state

OTHER = StaticKeySet(b"\x51" * 16, b"\x52" * 16, b"\x53" * 16)


def test_initial_personalization(card: VirtualCard) -> None:
    personalize(card)
    assert key_versions(card) == [0x01, 0x70]
    assert sorted(isd_state(load_state(card.state_path)).key_sets) == [0x01, 0x70]
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
    assert len(isd_state(card.state).key_sets) == 8


# -- the strict security executive (cms card init --strict) ----------------------------

@pytest.fixture
def strict_card(tmp_path: Path) -> VirtualCard:
    path = tmp_path / "strict.json"
    create_card(path, psd_id=PSD_ID, strict=True)
    c = VirtualCard.open(path)
    c.power_on()
    return c


def _installation_broken_after(card: VirtualCard, *kvns: int) -> None:
    """Flow A1's secured script cut short: the transport channel put ``kvns`` and the
    card lost its channel there (the transport keys stay)."""
    s = open_session(card, 0xFF, TRANSPORT)
    for kvn in kvns:
        new = MKRK if kvn == 0x70 else MK1
        assert put_key(s, TRANSPORT.dek, new, kvn)[1] == SW.OK
    card.reset()


def test_a_strict_card_takes_the_whole_installation_in_one_transport_channel(
        strict_card: VirtualCard) -> None:
    """What a channel may do is fixed when it opens: the personalization channel of a
    fresh card registers the MKRK and installs the first MK after it."""
    assert isd_state(strict_card.state).strict
    assert isd_state(load_state(strict_card.state_path)).strict
    personalize(strict_card)
    assert key_versions(strict_card) == [0x01, 0x70]


@pytest.mark.parametrize("strict", [False, True])
def test_only_a_strict_card_refuses_the_mk_in_a_transport_channel_once_it_holds_the_mkrk(
        tmp_path: Path, strict: bool) -> None:
    path = tmp_path / "card.json"
    create_card(path, psd_id=PSD_ID, strict=strict)
    card = VirtualCard.open(path)
    card.power_on()
    _installation_broken_after(card, 0x70)
    s = open_session(card, 0xFF, TRANSPORT)
    sw = put_key(s, TRANSPORT.dek, MK1, 0x01)[1]
    if strict:
        assert sw == SW.SECURITY_STATUS_NOT_SATISFIED
        assert key_versions(card) == [0x70, 0xFF]
        assert sorted(isd_state(load_state(path)).key_sets) == [0x70, 0xFF]
    else:
        assert sw == SW.OK                      # the default policy, unchanged
        assert key_versions(card) == [0x01, 0x70, 0xFF]


def test_a_strict_card_refuses_every_mk_change_outside_the_mkrk_channel(
        strict_card: VirtualCard) -> None:
    _installation_broken_after(strict_card, 0x70, 0x01)
    s = open_session(strict_card, 0xFF, TRANSPORT)
    for new_kvn, replace_kvn in ((0x01, 0x01), (0x02, 0x00), (0x02, 0x01)):
        assert put_key(s, TRANSPORT.dek, MK2, new_kvn, replace_kvn)[1] == \
            SW.SECURITY_STATUS_NOT_SATISFIED
    assert s.send(gp.delete_key_command(0x01))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert key_versions(strict_card) == [0x01, 0x70, 0xFF]
    assert isd_state(strict_card.state).key_sets[0x01].enc == MK1.enc
    # The refusals did not end the channel, and what is not an MK set is still the
    # transport channel's: the MKRK may be rotated, the transport set retired.
    new_mkrk = StaticKeySet(b"\x81" * 16, b"\x82" * 16, b"\x83" * 16)
    assert put_key(s, TRANSPORT.dek, new_mkrk, 0x70, replace_kvn=0x70)[1] == SW.OK
    assert s.send(gp.delete_key_command(0xFF))[1] == SW.OK
    assert key_versions(strict_card) == [0x01, 0x70]


def test_a_strict_card_changes_mk_sets_in_the_mkrk_channel(strict_card: VirtualCard) -> None:
    """How an installation broken after the MKRK finishes: the MK through the MKRK
    channel; the transport set (which an MKRK channel may not delete, on any card)
    through a transport channel after it."""
    _installation_broken_after(strict_card, 0x70)
    s = open_session(strict_card, 0x70, MKRK)
    data, sw, expected = put_key(s, MKRK.dek, MK1, 0x01)
    assert (sw, data) == (SW.OK, expected)
    data, sw, expected = put_key(s, MKRK.dek, MK1, 0x01, replace_kvn=0x01)
    assert (sw, data) == (SW.OK, expected)
    assert s.send(gp.delete_key_command(0xFF))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert open_session(strict_card, 0xFF, TRANSPORT).send(
        gp.delete_key_command(0xFF))[1] == SW.OK
    assert key_versions(strict_card) == [0x01, 0x70]
    # Flow A2 on the strict card: new MK in, old MK out, through the MKRK channel only.
    s = open_session(strict_card, 0x70, MKRK)
    assert put_key(s, MKRK.dek, MK2, 0x02)[1] == SW.OK
    assert s.send(gp.delete_key_command(0x01))[1] == SW.OK
    assert key_versions(strict_card) == [0x02, 0x70]


def test_the_policy_is_kept_in_the_state_file_and_set_by_cms_card_init(
        tmp_path: Path) -> None:
    path = tmp_path / "cli.json"
    init = subprocess.run([sys.executable, "-m", "cms.cli", "card", "init", "--state",
                           str(path), "--transport-keys", "default", "--strict"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert init.returncode == 0, init.stderr
    assert json.loads(init.stdout)["policy"] == "strict"
    isd_section = json.loads(path.read_text())["applets"][ISD_AID.hex().upper()]
    assert isd_section["strict"] is True
    assert isd_state(VirtualCard.open(path).state).strict
    create_card(tmp_path / "default.json")
    assert isd_state(load_state(tmp_path / "default.json")).strict is False
    # A file whose flag is not a boolean is refused rather than read as lax or strict.
    obj = json.loads(path.read_text())
    obj["applets"][ISD_AID.hex().upper()]["strict"] = "yes"
    path.write_text(json.dumps(obj))
    with pytest.raises(StateError, match="strict"):
        isd_state(load_state(path))
    with pytest.raises(StateError, match="strict"):
        VirtualCard.open(path)
