"""The README's demo (`cms demo`, run by scripts/demo) end to end in a scratch directory:
key blocks in HSM2, ceremonies, transfer to HSM1, A1 and A2 on a card through PC/SC (or
in-process where this machine cannot run a private pcscd), a campaign over a fleet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cms import keynames
from deploy.pcscd import unavailable_reason
from tests.support.launcher import cms

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_demo_runs_seed_000_end_to_end_and_stops_its_stack(tmp_path: Path) -> None:
    done = cms("demo", "--dir", str(tmp_path), "--cards", "12")
    out = done.stdout
    assert "Traceback" not in done.stderr
    for service in ("hsm_proxy", "key_mgmt", "access_server"):
        assert f"{service}: grpc" in out and "SERVING" in out
    # Key blocks made in HSM2 and moved to HSM1 with the same check values.
    transfers = re.findall(r"\[transfer\] (\S+): wrapped in HSM2, unwrapped in HSM1, "
                           r"KCV (\w{6}) = (\w{6})", out)
    assert {t[0] for t in transfers} >= {"mk/1", "mkrk/1", "cryptogram/1", "mk/2", "mk/3"}
    assert all(t[1] == t[2] for t in transfers)
    assert ("mk/1 in HSM1: class MK_BLOCK, origin TRANSFERRED, sensitive=True "
            "extractable=False modifiable=False") in out
    assert "factory/transport-master combined in access" in out
    # The card: through a real PC/SC reader when this machine can run one.
    if unavailable_reason() is None:
        assert "of a private pcscd (vsmartcard vpcd" in out
    for step in ("A1.4 cryptogram stored", "A1.8 transport keys retired",
                 "A2.4 secure channel opened with the MKRK key set",
                 "A2.5 new MK v2 installed", "A2.6 security executive relocked"):
        assert step in out, step
    assert re.search(r"\[A2\] card \w+: MK v2, MKRK v1", out)
    # The fleet campaign completes and its counts are in the metrics.
    assert "[fleet] installed: {'ok': 12}" in out
    assert re.search(r"MK 2 -> 3 completed: 12/12 done, 0 pending, 0 failed", out)
    assert re.search(r'cms_campaign_cards\{[^}]*state="done"[^}]*\} 12\.0', out)
    assert "stopped " in out and "hsm_proxy" in out.split("stopped ")[-1]
    # The PINs of the tokens it created reach neither its output nor the logs.
    pins = [p.read_text().strip() for p in (tmp_path / "softhsm" / "secrets").glob("*pin")]
    assert len(pins) == 2 * len(keynames.TOKENS) and all(pins)   # user and SO PIN of each
    logs = [f.read_text(errors="replace") for f in (tmp_path / "logs").rglob("*") if f.is_file()]
    assert logs
    for pin in pins:
        assert pin not in out and pin not in done.stderr
        assert not any(pin in text for text in logs)


def test_demo_runs_again_on_the_same_directory(tmp_path: Path) -> None:
    cms("demo", "--dir", str(tmp_path), "--cards", "2", "--no-pcsc")
    again = cms("demo", "--dir", str(tmp_path), "--cards", "2", "--no-pcsc")
    assert "factory/transport-master already in HSM1" in again.stdout
    assert "PC/SC unavailable (--no-pcsc)" in again.stdout
    assert re.search(r"MK 5 -> 6 completed: 2/2 done", again.stdout)


def test_demo_refuses_a_bad_card_count(tmp_path: Path) -> None:
    done = cms("demo", "--dir", str(tmp_path), "--cards", "0", check=False)
    assert done.returncode == 1 and "--cards: 1 to 1000" in done.stderr
    assert not (tmp_path / "endpoints.json").exists()
