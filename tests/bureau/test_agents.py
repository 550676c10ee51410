"""``cms bureau personalize --agents``: cards brought by card agents, and agents killed.

Each card is a virtual card behind a real card agent process (``cms
card-agent --virtual``) that dials the bureau's card channel over mutual TLS
and must find the bureau's identity in its certificate. A batch is
personalized through agents as through a card directory; then the agent of
the first card is killed (SIGKILL, from the card's fault hook) at each APDU
of its injection, the second card's agent finishes its card, the bureau is
stopped (SIGTERM: it writes what it has), and the batch resumed through a
new agent: every card personalized once, with its mailer data's codes, and
the results agreeing. Each case prints injected / recovered / lost.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cardcore import issuance as I
from cms import perso_format as F
from tests.bureau.test_faults import INJECTION_APDUS, personalized_right
from tests.bureau.world import BUREAU, World, card_state, copy_cards
from tests.support.hsm_proxy import REPO

pytestmark = pytest.mark.integration

PACK = "A-2026-01"
CARDS = 2
CMS = [sys.executable, "-m", "cms.cli"]
WAIT = "120"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


class BureauRun:
    """``cms bureau personalize --agents`` in the background, its address read from its
    first line."""

    def __init__(self, world: World, perso: Path, out: Path, state: Path, *extra: str):
        self.proc = subprocess.Popen(
            [*CMS, "bureau", "--endpoints", str(world.endpoints), "--bureau", BUREAU, "--state",
             str(state), "personalize", str(perso), "--issuer-cert", str(world.issuer_cert),
             "--mailer-key", str(world.mailer_pem), "--out", str(out), "--agents",
             "--agent-wait", WAIT, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=REPO, env=_env())
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert first.startswith("listening on "), first + self.proc.stderr.read()
        self.address = first.split()[2].rstrip(":")

    def agent(self, world: World, card: Path, *fault: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*CMS, "card-agent", "--endpoints", str(world.endpoints), "--server", self.address,
             "--server-identity", "bureau", "--role", "station", "--once", "--virtual",
             str(card), *fault], capture_output=True, text=True, cwd=REPO, env=_env(),
            timeout=120, check=False)

    def finish(self, stop: bool = False) -> tuple[int, str]:
        if stop:
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        assert "Traceback" not in err, err
        return self.proc.returncode, out


def test_a_batch_through_card_agents(world: World, perso: Path, templates: dict[str, Path],
                                     tmp_path: Path) -> None:
    cards = copy_cards(templates, tmp_path / "cards")
    run = BureauRun(world, perso, tmp_path / "out", tmp_path / "state")
    try:
        for path in cards.values():
            agent = run.agent(world, path)
            assert agent.returncode == 0, agent.stdout + agent.stderr
        code, out = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert code == 0, out
    results = F.read_results((tmp_path / "out" / f"{PACK}-results.csv").read_bytes()).rows
    assert {(r.serial, r.status) for r in results} == {
        (s, F.Status.PERSONALIZED) for s in cards}
    assert all(card_state(p).life_cycle == I.LifeCycle.PERSONALIZED for p in cards.values())


@pytest.mark.parametrize("at", range(1, INJECTION_APDUS + 1))
def test_an_agent_killed_at_any_apdu_resumes_to_each_card_personalized_once(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path,
        at: int) -> None:
    cards = copy_cards(templates, tmp_path / "cards")
    out, state = tmp_path / "out", tmp_path / "state"
    first, second = sorted(cards)
    run = BureauRun(world, perso, out, state)
    try:
        killed = run.agent(world, cards[first], "--virtual-fault", f"kill@{at}:self:KILL")
        assert killed.returncode == -9, killed.stdout + killed.stderr
        assert run.agent(world, cards[second]).returncode == 0
        code, cut = run.finish(stop=True)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    assert code == 1 and "went away" in cut, cut
    injected = {s for s, p in cards.items()
                if card_state(p).life_cycle == I.LifeCycle.PERSONALIZED}
    resumed = BureauRun(world, perso, out, state, "--resume")
    try:
        assert resumed.agent(world, cards[first]).returncode == 0
        code, again = resumed.finish()
    finally:
        if resumed.proc.poll() is None:
            resumed.proc.kill()
    assert code == 0, again
    header = F.read_perso(perso.read_bytes()).header
    mailing = {r.serial: r.mailer_data for r in
               F.read_mailing((out / f"{PACK}{F.MAILING_SUFFIX}").read_bytes()).rows}
    results = {r.serial: r.status for r in
               F.read_results((out / f"{PACK}-results.csv").read_bytes()).rows}
    right = {s for s, p in cards.items()
             if personalized_right(world, p, s, header.file_serial, mailing)
             and results.get(s) == F.Status.PERSONALIZED}
    lost = set(cards) - right
    print(f"agent killed at APDU {at}: injected {len(injected)}, recovered "
          f"{len(right - injected)}, lost {len(lost)}")
    assert not lost, (lost, cut, again)
