"""The virtual card through a real PC/SC stack: a private pcscd with the
vsmartcard vpcd reader (tests/support/pcsc.py), pyscard as the client.

Slot 0 of the reader holds an in-process card served by a thread; slot 1 is
used by ``cms card virtual`` running as its own process.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cardcore import gp, host
from cardcore.diversify import StaticKeySet
from cardcore.psd import psd_id_from_cplc
from cardcore.sw import SW
from tests.support.pcsc import PrivatePcscd, transmit_fn
from tests.virtual_psd.conftest import PSD_ID, TRANSPORT, put_key, send
from virtual_psd.card import ATR, VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.vpcd import VpcdCard, run

pytestmark = pytest.mark.pcsc


@pytest.fixture(scope="module")
def served_card(private_pcscd: PrivatePcscd, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[VirtualCard, VpcdCard]]:
    path = tmp_path_factory.mktemp("pcsc") / "card.json"
    create_card(path, psd_id=PSD_ID)
    card = VirtualCard.open(path)
    server = run(card, "127.0.0.1", private_pcscd.vpcd_port)
    private_pcscd.wait_for_card(True)
    yield card, server
    server.stop()


@contextlib.contextmanager
def connected(daemon: PrivatePcscd, slot: int = 0) -> Iterator[Any]:
    conn = daemon.connect(slot=slot)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.disconnect()
        with contextlib.suppress(Exception):
            conn.release()


def test_reader_atr_and_apdus(private_pcscd: PrivatePcscd, served_card: Any) -> None:
    assert private_pcscd.reader_name in private_pcscd.readers()
    with connected(private_pcscd) as conn:
        assert bytes(conn.getATR()) == ATR
        transmit = transmit_fn(conn)
        assert send(transmit, gp.select_command())[1] == SW.OK
        data, sw = send(transmit, gp.get_data_command(0x9F7F))
        assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
        assert send(transmit, bytes.fromhex("80CA9F7F0500"))[1] == SW.WRONG_LENGTH


def test_scp03_level_33_through_pcsc(private_pcscd: PrivatePcscd, served_card: Any) -> None:
    card, _ = served_card
    new = StaticKeySet(b"\x61" * 32, b"\x62" * 32, b"\x63" * 32)
    with connected(private_pcscd) as conn:
        transmit = transmit_fn(conn)
        s = host.open_session(transmit, kvn=0xFF, keys=TRANSPORT, security_level=0x33)
        data, sw, expected = put_key(s, TRANSPORT.dek, new, 0x32)
        assert (sw, data) == (SW.OK, expected)
        s2 = host.open_session(transmit, kvn=0x32, keys=new, security_level=0x33)
        data, sw = s2.send(gp.get_data_command(0x9F7F))
        assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
        assert s2.send(gp.get_status_command())[1] == SW.OK
    assert 0x32 in isd_state(card.state).key_sets


def test_yubikit_scp03_through_pcsc(private_pcscd: PrivatePcscd, served_card: Any) -> None:
    """yubikey-manager's own SCP03 host, over pyscard and pcscd, against the card."""
    from yubikit.core.smartcard.scp import KeyRef, Scp03KeyParams, StaticKeys
    from yubikit.securitydomain import SecurityDomainSession

    from tests.virtual_psd.yubikit_support import TransmitConnection

    card, _ = served_card
    with connected(private_pcscd) as conn:
        session = SecurityDomainSession(TransmitConnection(transmit_fn(conn)))
        session.authenticate(Scp03KeyParams(KeyRef(0x01, 0xFF), StaticKeys.default()))
        assert psd_id_from_cplc(session.get_data(0x9F7F)) == PSD_ID
        new = StaticKeys(b"\x41" * 16, b"\x42" * 16, b"\x43" * 16)
        session.put_key(KeyRef(0x01, 0x31), new)  # raises unless the KCVs match
        session.authenticate(Scp03KeyParams(KeyRef(0x01, 0x31), new))
        session.store_data(bytes.fromhex("5F2003414243"))
        assert session.get_data(0x5F20) == bytes.fromhex("5F2003414243")
        session.authenticate(Scp03KeyParams(KeyRef(0x01, 0xFF), StaticKeys.default()))
        session.delete_key(kvn=0x31)
    isd = isd_state(card.state)
    assert 0x31 not in isd.key_sets and isd.stored_ber[0x5F20] == b"ABC"


def test_cli_card_power_loss_over_vpcd(private_pcscd: PrivatePcscd, tmp_path: Path) -> None:
    """``cms card virtual`` on slot 1: an injected power loss removes the card,
    which comes back with its state reloaded from the file."""
    from smartcard.Exceptions import CardConnectionException

    state = tmp_path / "cli-card.json"
    cms = [sys.executable, "-m", "cms.cli"]
    init = subprocess.run([*cms, "card", "init", "--state", str(state), "--transport-keys",
                           "default", "--psd-id", "00000000000000C0FFEE"],
                          capture_output=True, text=True, check=False, timeout=60)
    assert init.returncode == 0, init.stderr
    assert '"psd_id": "00000000000000C0FFEE"' in init.stdout
    proc = subprocess.Popen([*cms, "card", "virtual", "--state", str(state), "--vpcd",
                             private_pcscd.vpcd_endpoint(1), "--faults", "tear@3"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with connected(private_pcscd, slot=1) as conn:
            transmit = transmit_fn(conn)
            assert send(transmit, gp.select_command())[1] == SW.OK            # APDU 1
            data, _ = send(transmit, gp.initialize_update_command(0xFF, bytes(8)))  # 2
            assert gp.parse_initialize_update_response(data).sequence_counter == b"\0\0\0"
            with pytest.raises(CardConnectionException):
                send(transmit, gp.initialize_update_command(0xFF, bytes(8)))     # 3: torn
        private_pcscd.wait_for_card(True, slot=1, timeout=15)
        with connected(private_pcscd, slot=1) as conn:
            transmit = transmit_fn(conn)
            data, sw = send(transmit, gp.initialize_update_command(0xFF, bytes(8)))
            # The torn INITIALIZE UPDATE was committed: its counter value is used up.
            assert sw == SW.OK
            assert gp.parse_initialize_update_response(data).sequence_counter == b"\0\0\2"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "lost power during APDU 3" in out
    show = subprocess.run([*cms, "card", "show", "--state", str(state)], capture_output=True,
                          text=True, check=True, timeout=60)
    assert '"sequence_counter": 3' in show.stdout and "4041" not in show.stdout


def test_card_comes_back_after_pcscd_restarts(private_pcscd: PrivatePcscd,
                                              served_card: Any) -> None:
    _, server = served_card
    insertions = server.insertions
    private_pcscd.restart()
    private_pcscd.wait_for_reader()
    private_pcscd.wait_for_card(True, timeout=15)
    with connected(private_pcscd) as conn:
        data, sw = send(transmit_fn(conn), gp.get_data_command(0x9F7F))
        assert sw == SW.OK and psd_id_from_cplc(data) == PSD_ID
    assert server.insertions > insertions
