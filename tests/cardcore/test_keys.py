"""KCVs, per-card diversification and PSD id conventions.

KCV sources: osmocom pySim tests/unittests/test_globalplatform.py
(SCP03_KCV_Test: C35280 / 013808 / 840DE5) and GlobalPlatformPro
TestPlaintextKeys.java (504A77 for the 40..4F test key).
"""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from cardcore.diversify import (
    KEY_INDEX_DEK,
    KEY_INDEX_ENC,
    KEY_INDEX_MAC,
    derivation_data,
    diversify_key_set_software,
    diversify_software,
)
from cardcore.kcv import kcv_aes, kcv_matches
from cardcore.psd import (
    KeySetRole,
    Kvn,
    cplc_for_psd_id,
    key_set_role,
    mk_kvn,
    psd_id_bytes,
    psd_id_from_cplc,
)
from cardcore.tlv import tlv

h = bytes.fromhex


def test_kcv_vectors() -> None:
    assert kcv_aes(h("000102030405060708090a0b0c0d0e0f")) == h("C35280")
    assert kcv_aes(h("101112131415161718191a1b1c1d1e1f")) == h("013808")
    assert kcv_aes(h("202122232425262728292a2b2c2d2e2f")) == h("840DE5")
    assert kcv_aes(bytes(range(0x40, 0x50))) == h("504A77")
    assert kcv_matches(bytes(range(0x40, 0x50)), h("504A77"))
    assert not kcv_matches(bytes(range(0x40, 0x50)), h("504A78"))
    with pytest.raises(ValueError):
        kcv_aes(bytes(15))


def _independent_ecb(key: bytes, data: bytes) -> bytes:
    # What C_DeriveKey(CKM_AES_ECB_ENCRYPT_DATA) computes, written out directly.
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305
    return enc.update(data) + enc.finalize()


@pytest.mark.parametrize("key_length", [16, 24, 32])
@pytest.mark.parametrize("master_length", [16, 32])
def test_diversification_is_aes_ecb_of_the_derivation_data(key_length: int,
                                                            master_length: int) -> None:
    master = bytes(range(master_length))
    element = h("00112233445566778899")
    for index in (KEY_INDEX_ENC, KEY_INDEX_MAC, KEY_INDEX_DEK):
        d = hashlib.sha256(b"cms-psd-kdf/1" + bytes([len(element)]) + element).digest()
        blocks = [d[:14] + bytes([index, j]) for j in (1, 2)]
        data = blocks[0] if key_length == 16 else blocks[0] + blocks[1]
        assert derivation_data(element, index, key_length) == data
        expected = _independent_ecb(master, data)[:key_length]
        assert diversify_software(master, element, index, key_length) == expected


def test_diversified_keys_differ_by_index_element_and_master() -> None:
    master = bytes(16)
    ks = diversify_key_set_software(master, b"card-1", 16)
    assert len({ks.enc, ks.mac, ks.dek}) == 3
    assert diversify_key_set_software(master, b"card-2", 16).enc != ks.enc
    assert diversify_key_set_software(b"\x01" * 16, b"card-1", 16).enc != ks.enc
    # Key sets never print their keys.
    assert ks.enc.hex() not in repr(ks)


def test_derivation_data_bounds() -> None:
    with pytest.raises(ValueError):
        derivation_data(bytes(256), 1, 16)
    with pytest.raises(ValueError):
        derivation_data(b"x", 1, 20)


def test_psd_id_from_cplc() -> None:
    psd = h("4790" "5040" "1234" "89ABCDEF")  # fabricator, type, batch, serial
    cplc = cplc_for_psd_id(psd)
    assert len(cplc) == 42
    assert cplc[0:2] == h("4790") and cplc[2:4] == h("5040")
    assert cplc[12:16] == h("89ABCDEF") and cplc[16:18] == h("1234")
    assert psd_id_from_cplc(cplc) == "47905040123489ABCDEF"
    assert psd_id_from_cplc(tlv(0x9F7F, cplc)) == "47905040123489ABCDEF"
    assert psd_id_bytes("47905040123489abcdef") == psd
    with pytest.raises(ValueError):
        psd_id_from_cplc(cplc[:41])
    with pytest.raises(ValueError):
        psd_id_bytes("00")


def test_kvn_roles() -> None:
    assert key_set_role(Kvn.TRANSPORT) is KeySetRole.TRANSPORT
    assert key_set_role(Kvn.MKRK) is KeySetRole.MKRK
    assert key_set_role(0x01) is KeySetRole.MASTER
    assert key_set_role(0x6F) is KeySetRole.MASTER
    assert key_set_role(0x71) is KeySetRole.OTHER
    assert mk_kvn(5) == 5
    with pytest.raises(ValueError):
        mk_kvn(0x70)
