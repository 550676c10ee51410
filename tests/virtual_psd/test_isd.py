"""Conformance of the virtual ISD: GlobalPlatform commands and SCP03 enforcement."""

from __future__ import annotations

import random

import pytest

from cardcore import gp, host
from cardcore.apdu import parse_response
from cardcore.diversify import StaticKeySet
from cardcore.issuance import ISSUANCE_AID
from cardcore.psd import ISD_AID, psd_id_from_cplc
from cardcore.scp03 import HostChannel
from cardcore.sw import SW
from cardcore.tlv import parse_single, tlv
from tests.virtual_psd.conftest import (
    PSD_ID,
    TRANSPORT,
    open_session,
    put_key,
    send,
)
from virtual_psd.card import ATR, CardNotPowered, VirtualCard
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

h = bytes.fromhex


def test_atr_and_power(card: VirtualCard) -> None:
    assert card.atr == ATR and ATR[0] == 0x3B
    tck = 0
    for b in ATR[1:]:
        tck ^= b
    assert tck == 0  # TCK makes the XOR of T0..TCK zero
    card.power_off()
    with pytest.raises(CardNotPowered):
        card.transmit(gp.select_command())
    assert card.power_on() == ATR


def test_select(card: VirtualCard) -> None:
    data, sw = send(card, gp.select_command(ISD_AID))
    assert sw == SW.OK and gp.parse_select_response(data) == ISD_AID
    assert send(card, gp.select_command())[1] == SW.OK  # default selection
    assert send(card, gp.select_command(ISD_AID[:5]))[1] == SW.OK  # partial AID
    assert send(card, gp.select_command(h("A0000000031010")))[1] == SW.FILE_NOT_FOUND
    assert send(card, h("00A4000C023F00"))[1] == SW.INCORRECT_P1P2


def test_get_data(card: VirtualCard) -> None:
    data, sw = send(card, gp.get_data_command(0x9F7F))
    assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
    data, sw = send(card, gp.get_data_command(0x66))
    assert gp.parse_card_data_scp(data) == [(0x03, 0x70)]
    data, _ = send(card, gp.get_data_command(0xE0))
    infos = gp.parse_key_information(data)
    assert {(i.kid, i.kvn) for i in infos} == {(1, 0xFF), (2, 0xFF), (3, 0xFF)}
    assert all(i.components == ((0x88, 16),) for i in infos)
    assert send(card, gp.get_data_command(0x5F50))[1] == SW.REFERENCED_DATA_NOT_FOUND


def test_initialize_update(card: VirtualCard) -> None:
    assert send(card, gp.initialize_update_command(0x30, bytes(8)))[1] == \
        SW.REFERENCED_DATA_NOT_FOUND
    data, sw = send(card, gp.initialize_update_command(0, bytes(8)))
    assert sw == SW.OK
    first = gp.parse_initialize_update_response(data)
    assert first.kvn == 0xFF and first.i == 0x70
    assert first.key_diversification_data == h(PSD_ID)
    second = gp.parse_initialize_update_response(
        send(card, gp.initialize_update_command(0xFF, bytes(8)))[0])
    # The sequence counter moves on (and is persisted), so challenges never repeat.
    assert int.from_bytes(second.sequence_counter, "big") == \
        int.from_bytes(first.sequence_counter, "big") + 1
    assert second.card_challenge != first.card_challenge
    assert isd_state(load_state(card.state_path)).sequence_counter == 2
    assert send(card, h("8050FF0007" + "00" * 7))[1] == SW.WRONG_LENGTH


def test_wrong_host_cryptogram_is_refused(card: VirtualCard) -> None:
    challenge = bytes(8)
    data, _ = send(card, gp.initialize_update_command(0xFF, challenge))
    wrong = b"\x01" * 16
    # Make a channel with the right card cryptogram check skipped: derive as a host
    # that holds the wrong keys but forges nothing else.
    from cardcore.scp03 import CardChannel, InitializeUpdateResponse, external_authenticate

    iu = InitializeUpdateResponse.parse(data)
    fake, _ = CardChannel.begin(wrong, wrong, challenge, iu.card_challenge)
    ext_auth, channel = external_authenticate(fake.keys, challenge, iu.card_challenge, 0x33)
    assert send(card, ext_auth)[1] == 0x6300  # host cryptogram failed
    assert send(card, channel.wrap(gp.get_status_command()))[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED


def test_external_authenticate_needs_initialize_update(card: VirtualCard) -> None:
    assert send(card, h("8482330010" + "00" * 16))[1] == SW.CONDITIONS_NOT_SATISFIED


def test_secured_commands_refused_outside_a_channel(card: VirtualCard) -> None:
    cmd, _ = host.put_key_set_command(
        TRANSPORT.dek, StaticKeySet(b"\x01" * 16, b"\x02" * 16, b"\x03" * 16), 0x30)
    for apdu in (cmd, gp.delete_key_command(0xFF), gp.get_status_command(),
                 gp.store_data_commands(h("5F200101"))[0], h("84F28002024F0000")):
        assert send(card, apdu)[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert sorted(isd_state(card.state).key_sets) == [0xFF]


def test_put_key_returns_kcvs_and_the_new_set_authenticates(card: VirtualCard) -> None:
    for key_length, kvn in ((16, 0x30), (24, 0x31), (32, 0x32)):
        new = StaticKeySet(*(bytes([kvn, i]) * (key_length // 2) for i in (1, 2, 3)))
        s = open_session(card, 0xFF, TRANSPORT)
        data, sw, expected = put_key(s, TRANSPORT.dek, new, kvn)
        assert sw == SW.OK and data == expected
        assert gp.parse_put_key_response(data)[0] == kvn
        s2 = open_session(card, kvn, new)
        assert s2.send(gp.get_status_command())[1] == SW.OK
    assert sorted(isd_state(load_state(card.state_path)).key_sets) == [0x30, 0x31, 0x32, 0xFF]


def test_put_key_with_a_bad_kcv_is_refused(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    cmd, _ = host.put_key_set_command(
        TRANSPORT.dek, StaticKeySet(b"\x01" * 16, b"\x02" * 16, b"\x03" * 16), 0x30)
    raw = bytearray(cmd)
    raw[-2] ^= 0xFF  # last KCV byte (before Le)
    assert s.send(bytes(raw))[1] == SW.WRONG_DATA
    # Encrypted under the wrong DEK: decrypts to another key, KCV mismatch.
    cmd, _ = host.put_key_set_command(
        bytes(16), StaticKeySet(b"\x01" * 16, b"\x02" * 16, b"\x03" * 16), 0x30)
    assert s.send(cmd)[1] == SW.WRONG_DATA
    assert sorted(isd_state(card.state).key_sets) == [0xFF]


def test_altered_mac_ends_the_session(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    wrapped = bytearray(s.channel.wrap(gp.get_status_command()))
    wrapped[-2] ^= 0x01  # a MAC byte
    assert send(card, bytes(wrapped))[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    # The session is gone: even a correctly wrapped next command is refused.
    fresh = s.channel.copy()
    fresh.resync(s.channel.checkpoint())
    assert send(card, fresh.wrap(gp.get_status_command()))[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED


def test_replayed_command_is_refused(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    wrapped = s.channel.wrap(gp.get_status_command())
    assert send(card, wrapped)[1] == SW.OK
    assert send(card, wrapped)[1] == SW.SECURITY_STATUS_NOT_SATISFIED


def test_plain_secured_command_inside_a_session_is_refused(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT, level=0x01)
    assert send(card, gp.get_status_command())[1] == SW.SECURITY_STATUS_NOT_SATISFIED
    assert s.send(gp.get_status_command())[1] == SW.SECURITY_STATUS_NOT_SATISFIED


def test_security_level_is_honoured(card: VirtualCard) -> None:
    # Level 01: C-MAC only, the response comes back in clear without R-MAC.
    s = open_session(card, 0xFF, TRANSPORT, level=0x01)
    raw = card.transmit(s.channel.wrap(gp.get_data_command(0x9F7F)))
    assert parse_single(raw[:-2]).tag == 0x9F7F
    # Level 33: the same response is encrypted and MACed.
    s = open_session(card, 0xFF, TRANSPORT, level=0x33)
    raw = card.transmit(s.channel.wrap(gp.get_data_command(0x9F7F)))
    assert h(PSD_ID)[:4] not in raw
    assert psd_id_from_cplc(s.channel.unwrap(raw)[0]) == PSD_ID
    # Level 03 requires encrypted command data: a correctly MACed clear payload fails.
    s = open_session(card, 0xFF, TRANSPORT, level=0x03)
    clear = HostChannel(s.channel._keys, 0x01, checkpoint=s.channel.checkpoint())
    assert send(card, clear.wrap(h("80E29000045F200101")))[1] == \
        SW.SECURITY_STATUS_NOT_SATISFIED


def test_selecting_the_isd_ends_the_session(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    assert send(card, gp.select_command(ISD_AID))[1] == SW.OK
    assert s.send(gp.get_status_command())[1] == SW.SECURITY_STATUS_NOT_SATISFIED


def test_get_status(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    data, sw = s.send(gp.get_status_command())
    assert sw == SW.OK
    (entry,) = gp.parse_get_status_response(data)
    assert entry.aid == ISD_AID and entry.life_cycle == 0x0F
    # Every card holds the issuance applet beside the ISD, selectable (07).
    data, sw = s.send(gp.get_status_command(gp.STATUS_APPLICATIONS))
    assert sw == SW.OK
    assert [(e.aid, e.life_cycle) for e in gp.parse_get_status_response(data)] == \
        [(ISSUANCE_AID, 0x07)]
    assert s.send(gp.get_status_command(gp.STATUS_APPLICATIONS, b"\xA0"))[1] == \
        SW.REFERENCED_DATA_NOT_FOUND


def test_store_data_is_kept_and_readable(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    payload = b"".join(bytes.fromhex(f"5F2{i}") + b"\x40" + bytes([i]) * 64 for i in range(8))
    for block in gp.store_data_commands(payload):
        assert s.send(block)[1] == SW.OK
    data, sw = s.send(gp.get_data_command(0x5F23))
    assert sw == SW.OK and parse_single(data).value == b"\x03" * 64
    dgis = gp.encode_dgi(0x0101, b"\xAA" * 10)
    assert s.send(gp.store_data_commands(dgis, structure=gp.STORE_DGI)[0])[1] == SW.OK
    stored = isd_state(load_state(card.state_path))
    assert stored.stored_dgi[0x0101] == b"\xAA" * 10 and 0x5F27 in stored.stored_ber
    # Out-of-sequence block number and truncated TLV are refused.
    assert s.send(h("80E2900104") + h("5F200101"))[1] == SW.INCORRECT_P1P2
    assert s.send(h("80E2900003") + h("5F2005"))[1] == SW.WRONG_DATA


@pytest.mark.parametrize("apdu, sw", [
    ("80CA9F7F0500", SW.WRONG_LENGTH),          # Lc says 5, nothing follows
    ("80CA", SW.WRONG_LENGTH),                  # shorter than a header
    ("80FF000000", SW.INS_NOT_SUPPORTED),
    ("A0CA9F7F00", SW.CLA_NOT_SUPPORTED),
    ("81CA9F7F00", SW.LOGICAL_CHANNEL_NOT_SUPPORTED),
    ("90CA9F7F00", SW.CHAINING_NOT_SUPPORTED),
    ("8050FF0000", SW.WRONG_LENGTH),            # INITIALIZE UPDATE without challenge
    ("8050FF01080000000000000000", SW.INCORRECT_P1P2),
    ("00A40400" + "11" + "00" * 17, SW.WRONG_DATA),  # AID too long
])
def test_malformed_commands_get_status_words(card: VirtualCard, apdu: str, sw: int) -> None:
    assert send(card, h(apdu))[1] == sw


def test_malformed_secured_data_gets_status_words(card: VirtualCard) -> None:
    s = open_session(card, 0xFF, TRANSPORT)
    assert s.send(h("80D800810330" + "8811"))[1] == SW.WRONG_DATA     # truncated key
    assert s.send(h("80D8008100"))[1] == SW.WRONG_DATA                # no data at all
    assert s.send(h("80D8000101" + "30"))[1] == SW.INCORRECT_P1P2     # not a whole set
    assert s.send(h("80E4000003D20201"))[1] == SW.WRONG_DATA          # truncated TLV
    assert s.send(h("80E4000003D20130"))[1] == SW.REFERENCED_DATA_NOT_FOUND
    assert s.send(h("80F2800202" + "4F05"))[1] == SW.WRONG_DATA       # truncated 4F
    assert s.send(h("80F28001024F00"))[1] == SW.INCORRECT_P1P2        # legacy format
    # The session survived all of these (their MACs were right).
    assert s.send(gp.get_status_command())[1] == SW.OK


def test_random_garbage_never_crashes_the_card(card: VirtualCard) -> None:
    rng = random.Random(1234)
    s = open_session(card, 0xFF, TRANSPORT)
    for _ in range(400):
        n = rng.choice([0, 1, 3, 4, 5, 6, 7, 9, 20, 300])
        raw = bytes(rng.getrandbits(8) for _ in range(n))
        if rng.random() < 0.5 and n >= 4:
            raw = bytes([rng.choice([0x00, 0x80, 0x84])]) + raw[1:]
        resp = card.transmit(raw)
        assert len(resp) >= 2
        assert parse_response(resp)[1] != SW.NO_PRECISE_DIAGNOSIS
    assert sorted(isd_state(card.state).key_sets) == [0xFF]
    del s


def test_application_registry(card: VirtualCard) -> None:
    class Echo:
        aid = h("F0000000CA01")
        selected = 0

        def read_section(self, state):
            pass

        def select(self, ctx, command):
            self.selected += 1
            return b""

        def deselect(self, ctx):
            pass

        def process(self, ctx, command):
            return command.data[::-1], SW.OK

    app = Echo()
    card.register(app)
    assert send(card, gp.select_command(app.aid))[1] == SW.OK and app.selected == 1
    assert send(card, h("8001000003010203")) == (h("030201"), SW.OK)
    assert send(card, gp.select_command(h("F0000000CA02")))[1] == SW.FILE_NOT_FOUND


def test_yubikit_in_process(card: VirtualCard) -> None:
    """yubikit's SecurityDomainSession (independent host code) against the card."""
    from yubikit.core.smartcard.scp import KeyRef, Scp03KeyParams, StaticKeys
    from yubikit.securitydomain import SecurityDomainSession

    from tests.virtual_psd.yubikit_support import TransmitConnection

    session = SecurityDomainSession(TransmitConnection(card.transmit))
    session.authenticate(Scp03KeyParams(KeyRef(0x01, 0xFF), StaticKeys.default()))
    assert psd_id_from_cplc(session.get_data(0x9F7F)) == PSD_ID
    new = StaticKeys(b"\x31" * 16, b"\x32" * 16, b"\x33" * 16)
    session.put_key(KeyRef(0x01, 0x30), new)  # yubikit checks the returned KCVs
    session.authenticate(Scp03KeyParams(KeyRef(0x01, 0x30), new))
    assert gp.parse_card_data_scp(session.get_data(0x66)) == [(0x03, 0x70)]
    assert 0x30 in isd_state(card.state).key_sets


def test_card_keys_are_never_in_reprs(card: VirtualCard) -> None:
    text = repr(card.state) + repr(isd_state(card.state).key_sets[0xFF])
    assert TRANSPORT.enc.hex() not in text


def test_s16_card(tmp_path) -> None:
    from virtual_psd.factory import create_card

    path = tmp_path / "s16.json"
    create_card(path, psd_id=PSD_ID, scp_i=0x71)
    card = VirtualCard.open(path)
    card.power_on()
    # S16 takes a 16-byte host challenge and answers with 16-byte values.
    assert send(card, gp.initialize_update_command(0xFF, bytes(8)))[1] == SW.WRONG_LENGTH
    s = host.open_session(card.transmit, kvn=0xFF, keys=TRANSPORT, host_challenge=bytes(16))
    assert s.channel.mac_length == 16
    data, sw = s.send(gp.get_data_command(0x9F7F))
    assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID


def _card_with_i(tmp_path, scp_i: int) -> VirtualCard:
    from virtual_psd.factory import create_card

    path = tmp_path / f"card-{scp_i:02x}.json"
    create_card(path, psd_id=PSD_ID, scp_i=scp_i)
    card = VirtualCard.open(path)
    card.power_on()
    return card


@pytest.mark.parametrize("scp_i", [0x10, 0x30, 0x60, 0x70])
def test_the_card_accepts_exactly_the_levels_its_i_offers(tmp_path, scp_i: int) -> None:
    from cardcore.scp03 import offered_security_levels

    card = _card_with_i(tmp_path, scp_i)
    for level in (0x01, 0x03, 0x11, 0x13, 0x33):
        if level in offered_security_levels(scp_i):
            s = open_session(card, 0xFF, TRANSPORT, level=level)
            data, sw = s.send(gp.get_data_command(0x9F7F))
            assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
        else:
            with pytest.raises(host.CardStatusError) as refused:
                open_session(card, 0xFF, TRANSPORT, level=level)
            assert refused.value.sw == SW.INCORRECT_P1P2


def test_without_r_mac_the_answers_carry_no_mac(tmp_path) -> None:
    card = _card_with_i(tmp_path, 0x10)
    s = open_session(card, 0xFF, TRANSPORT, level=0x03)
    raw = card.transmit(s.channel.wrap(gp.get_data_command(0x9F7F)))
    # The plain CPLC and the status word, nothing after them: no R-MAC at level 03.
    assert raw == tlv(gp.TAG_CPLC, card.state.cplc) + b"\x90\x00"


def test_a_random_challenge_card_sends_no_sequence_counter(tmp_path) -> None:
    card = _card_with_i(tmp_path, 0x60)
    first = gp.parse_initialize_update_response(
        send(card, gp.initialize_update_command(0xFF, bytes(8)))[0])
    second = gp.parse_initialize_update_response(
        send(card, gp.initialize_update_command(0xFF, bytes(8)))[0])
    assert first.i == 0x60 and first.sequence_counter is None
    assert first.card_challenge != second.card_challenge
    assert isd_state(load_state(card.state_path)).sequence_counter == 0
    s = open_session(card, 0xFF, TRANSPORT, level=0x33)
    assert s.send(gp.get_data_command(0x9F7F))[1] == SW.OK


def test_undefined_i_values_make_no_card(tmp_path) -> None:
    from virtual_psd.factory import create_card

    with pytest.raises(ValueError, match="without R-MAC"):
        create_card(tmp_path / "bad.json", psd_id=PSD_ID, scp_i=0x40)
    assert not (tmp_path / "bad.json").exists()
