"""Flow A end to end: A1 installation then A2 replacement, through the real access server,
the real proxy (CardKeys: keys held in SoftHSM2), mutual TLS and the card agent's session
code with an in-process virtual card."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from access_server.store import Store
from card_agent.session import AgentInfo, run_session
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from deploy.local import Stack, access_database_url
from tests.support.card_keys import provision
from tests.support.contacts import contact
from tests.support.launcher import dev_stack
from virtual_psd.agent_source import VirtualTransport
from virtual_psd.card import VirtualCard
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRANSPORT_MASTER = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="station")
USER = AgentInfo(role=pb.USER_PC, label="pc")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flow-a")
    with dev_stack(directory) as endpoints_path:
        provision(endpoints_path, TRANSPORT_MASTER)
        yield endpoints_path


def _admin(stack: Path):
    channel = load_endpoints(stack).channel("access_server", "admin")
    return access_pb2_grpc.PsdRegistryStub(channel), access_pb2_grpc.CampaignsStub(channel)


def _session(stack: Path, card: Path, info: AgentInfo):
    return contact(stack, card, info)


def _kvns(card: Path) -> set[int]:
    return set(isd_state(load_state(card)).key_sets)


def _new_card(stack: Path, tmp_path: Path, name: str) -> tuple[Path, str]:
    path = tmp_path / name
    psd_id = create_card(path, transport_master=TRANSPORT_MASTER).psd_id
    registry, _ = _admin(stack)
    registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
    return path, psd_id


def test_a1_installs_mkrk_and_mk_and_retires_the_transport_keys(stack: Path,
                                                                 tmp_path: Path) -> None:
    card, psd_id = _new_card(stack, tmp_path, "a1.json")
    report = _session(stack, card, STATION)
    assert report.done is not None, report.error
    assert report.done.outcome == pb.SessionDone.OK, report.done.message
    assert report.scripts_run == 2                      # probe + one secured script
    assert _kvns(card) == {0x70, 0x02}                  # MKRK + newest MK; FF gone
    steps = "\n".join(report.done.steps)
    assert "A1.4 cryptogram stored" in steps and "A1.8 transport keys retired" in steps
    registry, _ = _admin(stack)
    psd = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert psd.state == apb.PSD_ACTIVE and psd.mk_version == 2 and psd.mkrk_version == 1
    assert psd.has_cryptogram
    # A second station contact has nothing to do.
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.NOTHING_TO_DO


def test_a2_replaces_the_mk_through_the_mkrk_channel_in_two_round_trips(
        stack: Path, tmp_path: Path) -> None:
    card, psd_id = _new_card(stack, tmp_path, "a2.json")
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.OK
    assert _session(stack, card, USER).done.outcome == pb.SessionDone.NOTHING_TO_DO
    _, campaigns = _admin(stack)
    campaign = campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1,
        filter=apb.CampaignFilter(psd_ids=[psd_id])), timeout=30)
    live: list[str] = []
    report = contact(stack, card, USER, on_steps=live.extend)
    assert report.done.outcome == pb.SessionDone.OK, report.done.message
    assert report.scripts_run == 2
    assert _kvns(card) == {0x70, 0x01}
    steps = "\n".join(report.done.steps)
    assert "A2.4 secure channel opened with the MKRK key set" in steps
    # Steps reach the agent as they happen: those up to the opening of the MKRK channel
    # come with the secured script, before the card is changed; the rest with the end.
    assert live == list(report.done.steps[:len(live)])
    assert live[-1].startswith("A2.4 ") and not any(s.startswith("A2.5 ") for s in live)
    registry, _ = _admin(stack)
    psd = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert psd.state == apb.PSD_ACTIVE and psd.mk_version == 1
    done = campaigns.GetCampaign(apb.GetCampaignRequest(campaign_id=campaign.campaign_id),
                                 timeout=30)
    assert (done.done, done.pending) == (1, 0)
    # The contacts' channels went to the proxy as batch calls (channel_opener): alone
    # here, each in a batch of its own, never as a unary OpenSecureChannel.
    audit = [json.loads(line) for line in
             (stack.parent / "audit" / "hsm-proxy.jsonl").read_text().splitlines()]
    opened = [r for r in audit if r["identity"] == "access-server"
              and r["operation"].startswith("OpenSecureChannel")]
    assert opened and {(r["operation"], r["items"], r["outcome"]) for r in opened} == {
        ("OpenSecureChannelBatch", 1, "ok")}


class AlteredAnswers(VirtualTransport):
    """The real card, but the data of its answers to PUT KEY (INS D8) is altered on
    the way back, as a man in the middle or a card returning other KCVs would."""

    def transmit(self, apdu: bytes) -> bytes:
        raw = super().transmit(apdu)
        if len(apdu) > 1 and apdu[1] == 0xD8 and len(raw) > 2:
            return bytes((raw[0] ^ 0x01,)) + raw[1:]
        return raw


def test_an_altered_secured_answer_fails_the_contact_and_the_next_one_finishes(
        stack: Path, tmp_path: Path) -> None:
    """The answers are checked against the ones the HSM foresaw: an altered PUT KEY
    answer fails the contact (the key data reached the card, the server cannot
    vouch for it), the intent stays open, and the next honest contact settles it."""
    card, _ = _new_card(stack, tmp_path, "altered.json")
    channel = load_endpoints(stack).channel("access_server", "card-agent")
    transport = AlteredAnswers(VirtualCard.open(card))
    try:
        report = run_session(transport, channel, STATION, deadline_s=60)
    finally:
        transport.close()
        channel.close()
    assert report.done is not None and report.done.outcome == pb.SessionDone.FAILED
    assert "not the one the HSM foresaw" in report.done.message
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.OK
    assert 0xFF not in _kvns(card) and 0x70 in _kvns(card)


class InitializeUpdateAnswer(VirtualTransport):
    """The real card (its CPLC and key information are genuine), but the answer to
    INITIALIZE UPDATE (INS 50) is recorded, or replaced on the way back by ``forged``: one
    the card gave in an earlier contact (a replay), or bytes no card computed."""

    def __init__(self, card: VirtualCard, forged: bytes | None = None) -> None:
        super().__init__(card)
        self.forged = forged
        self.seen: bytes | None = None

    def transmit(self, apdu: bytes) -> bytes:
        raw = super().transmit(apdu)
        if len(apdu) > 1 and apdu[1] == 0x50:
            self.seen = raw
            if self.forged is not None:
                return self.forged
        return raw


def _contact_through(stack: Path, transport: InitializeUpdateAnswer):
    channel = load_endpoints(stack).channel("access_server", "card-agent")
    try:
        return run_session(transport, channel, USER, deadline_s=60)
    finally:
        transport.close()
        channel.close()


def test_a_card_that_does_not_prove_its_keys_gets_no_replacement_journaled(
        stack: Path, tmp_path: Path) -> None:
    """An agent that presents a real card's CPLC during a campaign, with a replayed or
    garbage INITIALIZE UPDATE answer, fails at the card cryptogram check, and nothing
    of the card changes in the registry: no intent, no state, no history, no contact
    time, no campaign attempt. The honest contact after it replaces the MK."""
    card, psd_id = _new_card(stack, tmp_path, "replayed.json")
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.OK
    recorder = InitializeUpdateAnswer(VirtualCard.open(card))
    assert _contact_through(stack, recorder).done.outcome == pb.SessionDone.NOTHING_TO_DO
    replayed = recorder.seen
    assert replayed is not None and replayed[-2:] == b"\x90\x00" and len(replayed) > 20
    garbage = os.urandom(len(replayed) - 2) + b"\x90\x00"
    registry, campaigns = _admin(stack)
    campaign = campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1,
        filter=apb.CampaignFilter(psd_ids=[psd_id])), timeout=30)
    key_sets = dict(isd_state(load_state(card)).key_sets)

    def registry_view() -> tuple:
        record = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
        history = registry.GetPsdHistory(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
        with Store.from_url(access_database_url(Stack(stack.parent))) as store:
            intent = store.open_intent(psd_id)
            item = store.get_campaign_item(campaign.campaign_id, psd_id)
        return record, list(history.events), intent, item.attempts, item.status

    before = registry_view()
    assert before[0].state == apb.PSD_ACTIVE and before[2] is None and before[3] == 0
    for forged, why in ((replayed, "card cryptogram mismatch"), (garbage, "")):
        report = _contact_through(stack, InitializeUpdateAnswer(VirtualCard.open(card),
                                                                forged=forged))
        assert report.done is not None and report.done.outcome == pb.SessionDone.FAILED
        assert "opening the MKRK channel" in report.done.message and why in report.done.message
        assert report.scripts_run == 1                  # the probe only: nothing secured sent
        assert registry_view() == before
        assert dict(isd_state(load_state(card)).key_sets) == key_sets
    honest = _session(stack, card, USER)
    assert honest.done.outcome == pb.SessionDone.OK, honest.done.message
    assert _kvns(card) == {0x70, 0x01}


class AlteredDeleteAnswer(InitializeUpdateAnswer):
    """The real card, whose answer to DELETE KEY (INS E4) is altered on the way back: the
    card deleted the old MK, the server cannot vouch for it."""

    def transmit(self, apdu: bytes) -> bytes:
        raw = super().transmit(apdu)
        if len(apdu) > 1 and apdu[1] == 0xE4 and len(raw) > 2:
            return bytes((raw[0] ^ 0x01,)) + raw[1:]
        return raw


def test_a_card_that_finished_a_replacement_proves_its_mkrk_before_the_registry_follows(
        stack: Path, tmp_path: Path) -> None:
    card, psd_id = _new_card(stack, tmp_path, "finished.json")
    assert _session(stack, card, STATION).done.outcome == pb.SessionDone.OK
    registry, campaigns = _admin(stack)
    campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1,
        filter=apb.CampaignFilter(psd_ids=[psd_id])), timeout=30)
    altered = AlteredDeleteAnswer(VirtualCard.open(card))
    report = _contact_through(stack, altered)
    assert report.done.outcome == pb.SessionDone.FAILED
    assert "not the one the HSM foresaw" in report.done.message
    assert _kvns(card) == {0x70, 0x01}                  # the card finished all the same
    pending = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert pending.state == apb.PSD_REPLACEMENT_PENDING
    history = list(registry.GetPsdHistory(apb.GetPsdRequest(psd_id=psd_id), timeout=30).events)
    # The card says it holds MK v1 only, but its INITIALIZE UPDATE answer is an old one.
    replay = _contact_through(stack, InitializeUpdateAnswer(VirtualCard.open(card),
                                                            forged=altered.seen))
    assert replay.done.outcome == pb.SessionDone.FAILED
    assert "checking the card's MKRK" in replay.done.message
    assert "card cryptogram mismatch" in replay.done.message
    assert registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30) == pending
    assert list(registry.GetPsdHistory(apb.GetPsdRequest(psd_id=psd_id),
                                       timeout=30).events) == history
    honest = _session(stack, card, USER)
    assert honest.done.outcome == pb.SessionDone.OK and "confirmed" in honest.done.message
    assert any(s.startswith("A2 reconciled") for s in honest.done.steps)
    psd = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert psd.state == apb.PSD_ACTIVE and psd.mk_version == 1
