"""The README's demo (`cms demo`, run by scripts/demo) end to end in a scratch directory:
key blocks in HSM2, ceremonies, transfer to HSM1, A1 and A2 on a card through PC/SC (or
in-process where this machine cannot run a private pcscd), a campaign over a fleet,
seed 004's B1-B2: a pack of user devices initialized by the provider (one through PC/SC)
and imported into the issuer's stock, and B3-B5: users, an issuance to the bureau, the
mailing house's letters, the results, a signature behind the PIN of a letter, the two
authentications, and a card personalized on its user's PC."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cms import keynames
from deploy.demo import letter_codes
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
    # B1-B2: the issuer key and the provider root made, three user devices initialized (one
    # over PC/SC, in a pack of its own), both packs imported, a second import refused.
    assert "[B1.1] issuer system: private issuer key issuer/1 generated in the issuer HSM" in out
    assert "[B1.2] provider system: root key made in its HSM" in out
    devices = re.findall(r"\[B1\.4\] user device (\S+): device key pair RSA-2048 and issuer "
                         r"authentication key pair P-256 generated on the card", out)
    assert len(set(devices)) == 4
    imported = re.findall(r"\[B2\.3\] issuer system: pack (\S+) verified .*: (\d) cards? "
                          r"added to the stock", out)
    if unavailable_reason() is None:
        assert "card agent that dials the provider's card channel" in out
        assert "B1 card initialized by the provider: serial" in out
        assert [n for _, n in imported] == ["1", "3"]
    else:
        assert [n for _, n in imported] == ["4"]
    assert re.search(r"total +4 +0 +0 +0 +0", out)
    assert f"[B2.5] the same pack again: pack {imported[0][0]} already imported" in out
    assert re.search(r'cms_stock_cards\{pack="[^"]+",state="in_stock"\} [123]\.0', out)
    assert f"cms_packs_imported {len(imported)}.0" in out
    # B3-B4: four users, three cards to the bureau, their letters, the results back.
    assert len(re.findall(r"\[B3\.3\] user \d+ \(.*\): derivation element \d+", out)) == 4
    assert "issuer issued 3 card(s), file serial" in out
    assert "bureau batch B-" in out and "3 of 3 card(s) final, 3 personalized" in out
    if unavailable_reason() is None:
        assert "card agent that dials the bureau's card channel" in out
        assert len(re.findall(r"agent\(station\) session OK: card \S+ personalized", out)) == 3
    assert "mailer 3 card(s), 6 letters" in out
    assert re.search(r"results of \w+ from demo-bureau: 3 personalized, 0 failed", out)
    # B5: a signature behind the PIN of the letter, verified with the issuer's user key.
    for step in ("[B5.1] card ", "[B5.2] AUTHENTICATE: card ", "[B5.3] VERIFY ISSUER: "):
        assert step in out, step
    # The card issued online, personalized on its user's PC with the activation code.
    assert re.search(r"session OK psd=(\S+): card \1 personalized; the PIN and PUK come by "
                     r"letter", out)
    assert "[B4.7] the user's PC: card " in out
    # The mailing house's signed dispatch confirmation, imported after the results.
    assert re.search(r"dispatch of \w+ from demo-post: the letters of [1-9]\d* card\(s\) "
                     r"sent, the cards shipped", out)
    assert "[B4.6] issuer system: the mailing house's signed dispatch confirmation" in out
    pins = letter_codes(next((tmp_path / "letters").iterdir()))
    assert len(pins) == 4 and len(list((tmp_path / "letters").rglob("*.pdf"))) == 8
    assert not any(pin.decode() in out for pin in pins.values())
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
    # The issuer key and the provider root are reused; a new pack joins the first in stock.
    assert "issuer key issuer/1 already in the issuer HSM" in again.stdout
    assert "[B1.2] provider system: root key already in its HSM" in again.stdout
    assert "[B1.3] PC/SC not used (--no-pcsc): all 4 user devices in process" in again.stdout
    # The first run's cards: three shipped (results and dispatch in), one issued online.
    assert re.search(r"total +4 +0 +1 +3 +0 +0", again.stdout)
    assert "cms_packs_imported 2.0" in again.stdout
    # New users and cards each run; the seed, the KEK and the partners' keys are reused.
    assert "bureau bureau demo-bureau is:" in again.stdout
    assert re.search(r"results of \w+ from demo-bureau: 3 personalized, 0 failed",
                     again.stdout)
    assert re.search(r"dispatch of \w+ from demo-post: the letters of 3 card\(s\) sent",
                     again.stdout)
    assert "[B5.3] VERIFY ISSUER: " in again.stdout and "[B4.7] the user's PC: " in again.stdout


def test_demo_refuses_a_bad_card_count(tmp_path: Path) -> None:
    done = cms("demo", "--dir", str(tmp_path), "--cards", "0", check=False)
    assert done.returncode == 1 and "--cards: 1 to 1000" in done.stderr
    done = cms("demo", "--dir", str(tmp_path), "--pack-cards", "0", check=False)
    assert done.returncode == 1 and "--pack-cards: 4 to 100" in done.stderr
    assert not (tmp_path / "endpoints.json").exists()
