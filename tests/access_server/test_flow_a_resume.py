"""A1 resumed from every partial state an installation can leave, on a default card and on
a strict one (its security executive changes MK sets only in an MKRK channel once it holds
the MKRK set), through the real access server and proxy with in-process virtual cards.

A1's secured script puts the MKRK at 70, then the MK at its KVN, then deletes the
transport keys at FF; a power loss stops it before a command (nothing of it happens) or
tears one (it happened, its answer was lost). The cryptogram and the intent are journaled
before that script goes out. The next station contact must finish from whatever the card
holds, and HSM1 must then reproduce the card's MK and MKRK sets.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from access_server.store import Store
from card_agent.session import AgentInfo, SessionReport
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from deploy.local import Stack, access_database_url
from tests.support.card_keys import provision, reproduces_card_keys
from tests.support.contacts import contact
from tests.support.launcher import dev_stack
from virtual_psd.factory import create_card
from virtual_psd.faults import FaultPlan
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRANSPORT_MASTER = bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="station")
MK = 0x02           # the newest MK version provision() makes: what A1 installs
FULL = {0x70, MK}

# The first contact's APDUs: SELECT, CPLC, key information, INITIALIZE UPDATE FF |
# EXTERNAL AUTHENTICATE, PUT MKRK, PUT MK, DELETE FF. name: (fault, card after it,
# intent journaled, scripts the resume takes).
PARTIAL = {
    "nothing, not journaled": ("power-loss@4", {0xFF}, False, 2),
    "nothing, journaled": ("power-loss@6", {0xFF}, True, 2),
    "MKRK": ("tear@6", {0xFF, 0x70}, True, 4),
    "MKRK and MK": ("tear@7", {0xFF, 0x70, MK}, True, 4),
    "MKRK and MK, transport keys gone": ("tear@8", FULL, True, 1),
}
# The resume of a card holding the MKRK: the probe (4 APDUs) | INITIALIZE UPDATE 70 |
# EXTERNAL AUTHENTICATE, PUT MK, INITIALIZE UPDATE FF | EXTERNAL AUTHENTICATE, DELETE FF.
RESUME_APDUS = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flow-a-resume")
    with dev_stack(directory) as endpoints_path:
        provision(endpoints_path, TRANSPORT_MASTER)
        yield endpoints_path


def _new_card(stack: Path, tmp_path: Path, name: str, *, strict: bool) -> tuple[Path, str]:
    path = tmp_path / f"{name}.json"
    psd_id = create_card(path, transport_master=TRANSPORT_MASTER, strict=strict).psd_id
    channel = load_endpoints(stack).channel("access_server", "admin")
    try:
        access_pb2_grpc.PsdRegistryStub(channel).RegisterPsds(
            apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
    finally:
        channel.close()
    return path, psd_id


def _kvns(card: Path) -> set[int]:
    return set(isd_state(load_state(card)).key_sets)


def _station(stack: Path, card: Path, faults: str | None = None) -> SessionReport:
    return contact(stack, card, STATION, faults=FaultPlan.parse(faults))


def _store(stack: Path) -> Store:
    return Store.from_url(access_database_url(Stack(stack.parent)))


def _installed(stack: Path, card: Path, psd_id: str) -> bool:
    """The registry says active at MK v2 and MKRK v1, the card holds exactly those, and
    HSM1 opens a channel with each from the PSD id and the stored cryptogram."""
    with _store(stack) as store:
        record = store.get_psd(psd_id)
        intent = store.open_intent(psd_id)
        cryptogram = store.get_cryptogram(psd_id)
    return (record.state.value == "active" and record.mk_version == MK
            and record.mkrk_version == 1 and intent is None and _kvns(card) == FULL
            and reproduces_card_keys(stack, card, psd_id, mk_version=MK,
                                     cryptogram=cryptogram.ciphertext,
                                     cryptogram_label=cryptogram.key_label))


@pytest.mark.parametrize("strict", [False, True], ids=["default-card", "strict-card"])
@pytest.mark.parametrize("state", list(PARTIAL))
def test_a1_resumes_from_every_partial_state(stack: Path, tmp_path: Path, state: str,
                                             strict: bool) -> None:
    fault, held, journaled, scripts = PARTIAL[state]
    card, psd_id = _new_card(stack, tmp_path, f"{state}-{strict}".replace(" ", "-"),
                             strict=strict)
    broken = _station(stack, card, fault)
    assert broken.done is None or broken.done.outcome != pb.SessionDone.OK
    assert _kvns(card) == held
    with _store(stack) as store:
        assert (store.open_intent(psd_id) is not None) is journaled
    resumed = _station(stack, card)
    assert resumed.done is not None, resumed.error
    assert resumed.done.outcome == pb.SessionDone.OK, resumed.done.message
    assert resumed.scripts_run == scripts
    steps = "\n".join(resumed.done.steps)
    through_mkrk = "A1.6 secure channel opened with the card's MKRK key set" in steps
    assert through_mkrk is (scripts == 4)
    if through_mkrk:
        assert "A1.8 transport keys retired" in steps
    assert _installed(stack, card, psd_id)


@pytest.mark.parametrize("kind", ["power-loss", "tear"])
@pytest.mark.parametrize("k", range(1, RESUME_APDUS + 1))
def test_a_resume_through_the_mkrk_channel_broken_anywhere_is_finished_later(
        stack: Path, tmp_path: Path, k: int, kind: str) -> None:
    """The resume's own scripts leave only states it finishes from (on a strict card)."""
    card, psd_id = _new_card(stack, tmp_path, f"resume-{k}-{kind}", strict=True)
    _station(stack, card, "tear@6")                           # the card holds the MKRK
    assert _kvns(card) == {0xFF, 0x70}
    broken = _station(stack, card, f"{kind}@{k}")
    assert broken.done is None or broken.done.outcome != pb.SessionDone.OK
    for _ in range(3):
        done = _station(stack, card).done
        if done is not None and done.outcome == pb.SessionDone.OK:
            break
    assert done is not None and done.outcome == pb.SessionDone.OK, done
    assert _installed(stack, card, psd_id)


def test_an_mkrk_no_intent_explains_is_replaced_and_the_strict_card_finished_through_it(
        stack: Path, tmp_path: Path) -> None:
    """An operator abandoned the intent of an installation whose MKRK the card had taken:
    A1 starts over. Its transport channel replaces only that MKRK (its new cryptogram
    journaled first), since the strict card would refuse an MK there (it held an MKRK when
    the channel opened); the MK then goes in through the new MKRK's channel and a last
    transport channel deletes the transport keys, all in the one contact."""
    card, psd_id = _new_card(stack, tmp_path, "abandoned", strict=True)
    _station(stack, card, "tear@6")
    with _store(stack) as store:
        intent = store.open_intent(psd_id)
        assert intent is not None
        store.abandon_intent(psd_id, intent.intent_id, "operator's mistake", "admin")
        old = store.get_cryptogram(psd_id).ciphertext
    assert _kvns(card) == {0xFF, 0x70}
    done = _station(stack, card)
    assert done.done.outcome == pb.SessionDone.OK, done.done.message
    assert done.scripts_run == 5        # probe, MKRK put, INITIALIZE UPDATE, MK, delete
    steps = "\n".join(done.done.steps)
    assert "the MKRK no intent explained replaced" in steps
    assert "A1.6 secure channel opened with the card's MKRK key set" in steps
    with _store(stack) as store:
        assert store.open_intent(psd_id) is None
        assert store.get_cryptogram(psd_id).ciphertext != old
    assert _installed(stack, card, psd_id)
