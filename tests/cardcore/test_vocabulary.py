"""The card vocabulary keeps its wire values, and the parts a light client reads
import nothing but the standard library (psd too: light parts read a card's id and
the roles of its key sets)."""

from __future__ import annotations

import subprocess
import sys

from cardcore import gp
from cardcore.ins import Ins
from cardcore.psd import MK_KVNS, KeySetRole, Kvn, key_set_role
from cardcore.scp03 import SCP_ID
from cardcore.sw import SW


def test_status_words_are_their_wire_values() -> None:
    assert SW.OK == 0x9000
    assert SW.SECURITY_STATUS_NOT_SATISFIED == 0x6982
    assert SW.OK.to_bytes(2, "big") == b"\x90\x00"
    assert f"{SW.WRONG_DATA:04X}" == "6A80"
    assert SW.describe(0x6A88) == "6A88 referenced data not found"
    assert SW.describe(0x6110) == "6110 16 more bytes available"
    assert SW.is_success(0x6110) and not SW.is_success(SW.WRONG_DATA)
    assert SW.is_protected(0x6310) and not SW.is_protected(SW.WRONG_LENGTH)


def test_instruction_bytes_are_the_ones_the_builders_send() -> None:
    assert gp.select_command()[1] == Ins.SELECT == 0xA4
    assert gp.get_data_command(gp.TAG_CPLC)[1] == Ins.GET_DATA == 0xCA
    assert gp.initialize_update_command(Kvn.MKRK, bytes(8))[1] == Ins.INITIALIZE_UPDATE == 0x50
    assert gp.delete_key_command(Kvn.TRANSPORT)[1] == Ins.DELETE == 0xE4
    assert (Ins.EXTERNAL_AUTHENTICATE, Ins.PUT_KEY, Ins.GET_STATUS, Ins.STORE_DATA,
            Ins.GET_RESPONSE) == (0x82, 0xD8, 0xF2, 0xE2, 0xC0)


def test_key_version_numbers_by_role() -> None:
    assert (Kvn.TRANSPORT, Kvn.MKRK, Kvn.MK_MIN, Kvn.MK_MAX) == (0xFF, 0x70, 0x01, 0x6F)
    assert MK_KVNS == range(0x01, 0x70)
    assert gp.initialize_update_command(Kvn.MKRK, bytes(8))[2] == 0x70
    assert key_set_role(Kvn.MK_MAX) is KeySetRole.MASTER
    assert key_set_role(Kvn.MK_MAX + 1) is KeySetRole.MKRK
    assert SCP_ID == 0x03


def test_light_modules_import_only_the_standard_library() -> None:
    code = ("import sys; import cardcore.sw, cardcore.ins, cardcore.apdu, cardcore.psd; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('cryptography', 'cms', 'grpc'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
