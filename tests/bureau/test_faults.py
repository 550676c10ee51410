"""The bureau's fault matrix: a fault at every APDU of one card's injection, then --resume.

One card's injection, when the bureau makes PIN and PUK, is seven APDUs
(SELECT, GET DATA DF00, PERSONALIZE, GET CHALLENGE, SET PIN, GET DATA DF01,
AUTHENTICATE). At each one the first card of a batch of two is pulled before
the command (power loss), loses power during it (tear: the command may have
committed), or the bureau process is killed (SIGKILL, before the command,
from the card's own fault hook). Then the batch is resumed: every card must
be personalized once, by this file, with the PIN and PUK its mailer data
holds, and the results file must agree with the cards. Each case prints
injected (cards holding their payload after the cut), recovered (cards
personalized right only after the resume) and lost (cards not personalized
right after it, or that the results file gets wrong), and lost must be 0.

The third column of the matrix, a card agent killed, is in
``tests/bureau/test_agents.py``: it needs the bureau serving card agents.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cardcore import issuance as I
from cms import perso_format as F
from tests.bureau.test_personalize import PACK, opened, personalize
from tests.bureau.world import World, card_state, copy_cards

pytestmark = pytest.mark.integration

INJECTION_APDUS = 7
FAULTS = {"card pulled": "power-loss@{at}", "power lost during": "tear@{at}",
          "bureau killed": "kill@{at}:self:KILL"}
CARDS = 2


def personalized_right(world: World, path: Path, serial: str, file_serial: bytes,
                       mailing: dict[str, bytes]) -> bool:
    """Whether the card holds this file's payload once, and the codes its mailer data holds."""
    card = card_state(path)
    if card.life_cycle != I.LifeCycle.PERSONALIZED or card.issuance_id != file_serial \
            or card.sequence != 1 or serial not in mailing:
        return False
    return opened(world, mailing[serial], serial) == (card.pin, card.puk)


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("at", range(1, INJECTION_APDUS + 1))
def test_a_fault_at_any_apdu_resumes_to_each_card_personalized_once(
        world: World, perso: Path, templates: dict[str, Path], tmp_path: Path, fault: str,
        at: int) -> None:
    cards = copy_cards(templates, tmp_path / "cards")
    out, state = tmp_path / "out", tmp_path / "state"
    first = sorted(cards)[0]
    plan = FAULTS[fault].format(at=at)
    cut = personalize(world, perso, tmp_path / "cards", out, state, "--card-fault",
                      f"{cards[first].name}={plan}", check=False)
    assert cut.returncode != 0, cut.stdout
    if fault == "bureau killed":
        assert cut.returncode == -9
    injected = {s for s, p in cards.items() if card_state(p).life_cycle ==
                I.LifeCycle.PERSONALIZED}
    resumed = personalize(world, perso, tmp_path / "cards", out, state, "--resume")
    assert "Traceback" not in resumed.stderr
    header = F.read_perso(perso.read_bytes()).header
    mailing = {r.serial: r.mailer_data for r in
               F.read_mailing((out / f"{PACK}{F.MAILING_SUFFIX}").read_bytes()).rows}
    results = {r.serial: r.status for r in
               F.read_results((out / f"{PACK}-results.csv").read_bytes()).rows}
    right = {s for s, p in cards.items()
             if personalized_right(world, p, s, header.file_serial, mailing)
             and results.get(s) == F.Status.PERSONALIZED}
    recovered = right - injected
    lost = set(cards) - right
    print(f"{fault} at APDU {at}: injected {len(injected)}, recovered {len(recovered)}, "
          f"lost {len(lost)}")
    assert not lost, (lost, cut.stdout, resumed.stdout)
    assert set(results) == set(cards)
