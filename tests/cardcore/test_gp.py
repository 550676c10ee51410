"""GlobalPlatform command builders and response parsers."""

from __future__ import annotations

import pytest

from cardcore import gp
from cardcore.apdu import parse_command
from cardcore.kcv import kcv_aes
from cardcore.scp03 import decrypt_key_data, encrypt_key_data
from cardcore.tlv import tlv

h = bytes.fromhex
DEK = bytes(range(0x20, 0x30))


def test_select_and_get_data_commands() -> None:
    assert gp.select_command(h("A000000151000000")) == h("00A4040008A00000015100000000")
    assert gp.select_command() == h("00A4040000")
    assert gp.get_data_command(0x9F7F) == h("80CA9F7F00")
    assert gp.get_data_command(0xE0) == h("80CA00E000")
    assert gp.initialize_update_command(0x30, h("b13e5f938fc108c4")) == \
        h("8050300008b13e5f938fc108c400")  # as in pySim's AES128-11 exchange
    fci = gp.select_response(h("A000000151000000"))
    assert gp.parse_select_response(fci) == h("A000000151000000")


@pytest.mark.parametrize("key_length", [16, 24, 32])
def test_put_key_round_trip(key_length: int) -> None:
    keys = [bytes([i]) * key_length for i in (1, 2, 3)]
    comps = [gp.KeyComponent(encrypt_key_data(DEK, k), key_length, kcv_aes(k)) for k in keys]
    raw = gp.put_key_command(0x02, comps, replace_kvn=0x01)
    cmd = parse_command(raw)
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2) == (0x80, 0xD8, 0x01, 0x81)
    new_kvn, parsed = gp.parse_put_key_data(cmd.data)
    assert new_kvn == 0x02
    assert [decrypt_key_data(DEK, c.encrypted, c.key_length) for c in parsed] == keys
    assert [c.kcv for c in parsed] == [kcv_aes(k) for k in keys]
    # Amendment D layout: 88 | len | clear key length | encrypted | 03 | KCV.
    first = cmd.data[1:]
    padded = 16 * -(-key_length // 16)
    assert first[0] == 0x88 and first[1] == 1 + padded and first[2] == key_length
    assert first[3 + padded] == 3


def test_put_key_accepts_the_bare_encrypted_form() -> None:
    # Some hosts (e.g. yubikit) send "88 10 <encrypted key>" without a clear length.
    key = bytes(range(16))
    data = b"\x05" + b"\x88\x10" + encrypt_key_data(DEK, key) + b"\x03" + kcv_aes(key)
    kvn, (comp,) = gp.parse_put_key_data(data)
    assert kvn == 5 and comp.key_length == 16
    assert decrypt_key_data(DEK, comp.encrypted, 16) == key


@pytest.mark.parametrize("data", [
    "", "01", "0188", "018811", "0188111000", "01881110" + "00" * 16,
    "01880F" + "00" * 15 + "03AABBCC", "01881110" + "00" * 16 + "03AABB",
    "01FF0100",
])
def test_put_key_malformed_data(data: str) -> None:
    with pytest.raises(gp.GpError):
        gp.parse_put_key_data(h(data))


def test_put_key_response() -> None:
    assert gp.parse_put_key_response(h("70AAAAAABBBBBBCCCCCC")) == (
        0x70, [h("AAAAAA"), h("BBBBBB"), h("CCCCCC")])
    with pytest.raises(gp.GpError):
        gp.parse_put_key_response(h("70AAAA"))


def test_delete_key() -> None:
    raw = gp.delete_key_command(0x01)
    assert raw == h("80E4000003D2010100")
    assert gp.parse_delete_data(parse_command(raw).data) == (0x01, None, None)
    assert gp.parse_delete_data(h("D00101D20170")) == (0x70, 1, None)
    with pytest.raises(gp.GpError):
        gp.parse_delete_data(h("D2020101"))
    with pytest.raises(gp.GpError):
        gp.parse_delete_data(b"")


def test_key_information_with_and_without_wrapper() -> None:
    infos = [gp.KeyInfo(kid, kvn, ((0x88, 16),)) for kvn in (0x01, 0x70) for kid in (1, 2, 3)]
    raw = gp.encode_key_information(infos)
    assert raw[0] == 0xE0
    assert gp.parse_key_information(raw) == infos
    assert gp.parse_key_information(raw[2:]) == infos
    assert sorted(gp.key_versions(infos)) == [0x01, 0x70]


def test_card_data_announces_scp03() -> None:
    raw = gp.encode_card_data(0x70)
    assert gp.parse_card_data_scp(raw) == [(0x03, 0x70)]


def test_get_status() -> None:
    assert gp.get_status_command() == h("80F28002024F0000")
    entry = gp.ApplicationStatus(h("A000000151000000"), 0x0F, h("9EFE80"))
    assert gp.parse_get_status_response(entry.encode()) == [entry]
    with pytest.raises(gp.GpError):
        gp.parse_get_status_response(tlv(0xE3, tlv(0x4F, b"\x01" * 5)))


def test_store_data_blocks_and_dgis() -> None:
    payload = b"".join(gp.encode_dgi(0x0100 + i, bytes([i]) * 100) for i in range(5))
    blocks = [parse_command(b) for b in gp.store_data_commands(payload, structure=gp.STORE_DGI)]
    assert [b.p2 for b in blocks] == list(range(len(blocks)))
    assert all(not b.p1 & 0x80 for b in blocks[:-1]) and blocks[-1].p1 & 0x80
    assert all(len(b.data) <= 0xEF for b in blocks)
    joined = b"".join(b.data for b in blocks)
    assert gp.parse_dgis(joined) == [(0x0100 + i, bytes([i]) * 100) for i in range(5)]
    assert gp.parse_dgis(gp.encode_dgi(0x8000, bytes(300)))[0][1] == bytes(300)
    with pytest.raises(gp.GpError):
        gp.parse_dgis(h("010105AABB"))
