"""Flow A through a real PC/SC stack: a private pcscd with the vsmartcard reader, the card
as a `cms card virtual` process, `cms card-agent` processes (station, then user PC), the
access server and the proxy as launched by `cms dev up`.

This is the virtual PSD issue's end-to-end check: SCP03 at level 33 with keys held in the
HSM (transport keys), PUT KEY of new key sets (MKRK and MK), then channels opened with the
new key sets (the MKRK set in A2)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.card_keys import provision
from tests.support.launcher import cms, dev_stack
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pcsc = pytest.importorskip("tests.support.pcsc")

pytestmark = [pytest.mark.pcsc, pytest.mark.integration, pytest.mark.timeout(300)]

TRANSPORT_MASTER = bytes.fromhex("A0A1A2A3A4A5A6A7A8A9AAABACADAEAF")


@pytest.fixture(scope="module")
def pcscd() -> Iterator[pcsc.PrivatePcscd]:
    with pcsc.started_or_skip() as daemon:
        yield daemon


def _agent(pcscd, endpoints: Path, role: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cms.cli", "card-agent", "--endpoints", str(endpoints),
         "--identity", "card-agent", "--role", role, "--once", "--give-up-after", "30"],
        capture_output=True, text=True, timeout=120, env=pcscd.client_env(), check=False)


def test_install_then_replace_through_pcscd(pcscd, tmp_path: Path) -> None:
    state = tmp_path / "card.json"
    psd_id = create_card(state, transport_master=TRANSPORT_MASTER).psd_id
    with dev_stack(tmp_path / "stack") as endpoints:
        provision(endpoints, TRANSPORT_MASTER)
        cms("psd", "--endpoints", str(endpoints), "register", psd_id)
        card = subprocess.Popen(
            [sys.executable, "-m", "cms.cli", "card", "virtual", "--state", str(state),
             "--vpcd", pcscd.vpcd_endpoint(0)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            station = _agent(pcscd, endpoints, "station")
            assert station.returncode == 0, station.stdout + station.stderr
            assert "A1.4 cryptogram stored" in station.stdout + station.stderr
            assert set(isd_state(load_state(state)).key_sets) == {0x70, 0x02}
            cms("campaign", "--endpoints", str(endpoints), "start", "--from-version", "2",
                "--to-version", "1", "--psd", psd_id)
            user = _agent(pcscd, endpoints, "user")
            assert user.returncode == 0, user.stdout + user.stderr
            assert "A2.4 secure channel opened with the MKRK key set" in user.stdout + user.stderr
            assert set(isd_state(load_state(state)).key_sets) == {0x70, 0x01}
            shown = cms("psd", "--endpoints", str(endpoints), "show", psd_id).stdout
            assert "active mk=1 mkrk=1" in shown
        finally:
            card.send_signal(signal.SIGTERM)
            card.wait(timeout=20)
