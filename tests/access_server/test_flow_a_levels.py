"""Flow A at the security level each card offers, and what a card below the minimum gets:
A1 and A2 on virtual cards whose SCP03 "i" is 10, 30 and 70 (`cms card init --scp-i`),
through the real access server and proxy (keys in SoftHSM2), the card agent's session
code, and the operator's `cms psd` / `cms campaign` commands and metrics."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from card_agent.session import AgentInfo, SessionReport, run_session
from cardcore.ins import Ins
from cardcore.kcv import kcv_aes
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc
from cms.v1 import card_channel_pb2 as pb
from tests.support.card_keys import provision
from tests.support.launcher import cms, dev_stack
from tests.support.reconfigure import restart_with
from virtual_psd.agent_source import VirtualTransport
from virtual_psd.card import VirtualCard
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

TRANSPORT_MASTER = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
STATION = AgentInfo(role=pb.PERSONALIZATION_STATION, label="station")
USER = AgentInfo(role=pb.USER_PC, label="pc")


class Minimum:
    """The access server's card_channel.minimum_security_level, restarted only on a change."""

    def __init__(self, stack: Path) -> None:
        self.stack = stack
        self.current = "03"

    def set(self, level: str) -> None:
        if level != self.current:
            restart_with(self.stack.parent, "access_server",
                         {"card_channel": {"minimum_security_level": level}})
            self.current = level


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("flow-a-levels")
    with dev_stack(directory) as endpoints_path:
        provision(endpoints_path, TRANSPORT_MASTER)
        yield endpoints_path


@pytest.fixture(scope="module")
def minimum(stack: Path) -> Minimum:
    return Minimum(stack)


def _admin(stack: Path):
    channel = load_endpoints(stack).channel("access_server", "admin")
    return access_pb2_grpc.PsdRegistryStub(channel), access_pb2_grpc.CampaignsStub(channel)


def _new_card(stack: Path, tmp_path: Path, name: str, scp_i: str) -> tuple[Path, str]:
    """A factory-fresh card made as an operator makes one, announcing ``scp_i``."""
    path = tmp_path / f"{name}.json"
    made = cms("card", "init", "--state", str(path), "--transport-master-hex",
               TRANSPORT_MASTER.hex(), "--scp-i", scp_i)
    psd_id = load_state(path).psd_id
    assert f'"scp_i": "{scp_i.upper()}"' in made.stdout
    cms("psd", "--endpoints", str(stack), "register", psd_id)
    return path, psd_id


class Recording(VirtualTransport):
    """The real card; every command and answer is kept, and ``i_as`` (if given) replaces
    the "i" of its INITIALIZE UPDATE answers on the way back, as a lying card would."""

    def __init__(self, card: VirtualCard, i_as: int | None = None,
                 alter_put_key: bool = False) -> None:
        super().__init__(card)
        self.i_as = i_as
        self.alter_put_key = alter_put_key
        self.exchanges: list[tuple[bytes, bytes]] = []

    def transmit(self, apdu: bytes) -> bytes:
        raw = super().transmit(apdu)
        if self.i_as is not None and apdu[1] == Ins.INITIALIZE_UPDATE and len(raw) > 15:
            raw = raw[:12] + bytes((self.i_as,)) + raw[13:]
        if self.alter_put_key and apdu[1] == Ins.PUT_KEY and len(raw) > 2:
            raw = bytes((raw[0] ^ 0x01,)) + raw[1:]
        self.exchanges.append((apdu, raw))
        return raw

    def answers_to(self, ins: int) -> list[bytes]:
        return [raw for apdu, raw in self.exchanges if apdu[1] == ins]

    def levels(self) -> list[int]:
        return [apdu[2] for apdu, _ in self.exchanges if apdu[1] == Ins.EXTERNAL_AUTHENTICATE]


def _contact(stack: Path, card: Path, info: AgentInfo, **recording) -> tuple[SessionReport,
                                                                             Recording]:
    channel = load_endpoints(stack).channel("access_server", "card-agent")
    transport = Recording(VirtualCard.open(card), **recording)
    try:
        report = run_session(transport, channel, info, deadline_s=60)
    finally:
        transport.close()
        channel.close()
    assert report.done is not None, report.error
    return report, transport


def _metric(stack: Path, name: str, **labels: str) -> float:
    url = load_endpoints(stack).metrics_url("access_server")
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (local test stack)
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _put_key_answer_length(level: int) -> int:
    """KVN and three check values, then (with R-MAC) an R-MAC; R-ENC pads to a block."""
    body = 16 if level & 0x20 else 10
    return body + (8 if level & 0x10 else 0) + 2


@pytest.mark.parametrize("scp_i, level", [("10", 0x03), ("30", 0x13), ("70", 0x33)])
def test_a1_and_a2_open_at_the_highest_level_the_card_offers(
        stack: Path, minimum: Minimum, tmp_path: Path, scp_i: str, level: int) -> None:
    minimum.set("03")
    card, psd_id = _new_card(stack, tmp_path, f"i{scp_i}", scp_i)

    installed, seen = _contact(stack, card, STATION)

    assert installed.done.outcome == pb.SessionDone.OK, installed.done.message
    assert installed.done.reason == "done"
    assert seen.levels() == [level]
    answers = seen.answers_to(Ins.PUT_KEY)
    assert [len(a) for a in answers] == [_put_key_answer_length(level)] * 2
    keys = isd_state(load_state(card)).key_sets
    assert set(keys) == {0x70, 0x02}
    if not level & 0x10:
        # No R-MAC: the card's plain answer, KVN and the check values of the keys it holds,
        # is what the HSM foresaw (the contact compared them).
        mk = keys[0x02]
        assert answers[1] == (b"\x02" + b"".join(kcv_aes(k) for k in (mk.enc, mk.mac, mk.dek))
                              + b"\x90\x00")
    assert f"(SCP03, level {level:02X})" in "\n".join(installed.done.steps)

    _, campaigns = _admin(stack)
    campaign = campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1, filter=apb.CampaignFilter(psd_ids=[psd_id])),
        timeout=30)
    replaced, seen = _contact(stack, card, USER)

    assert replaced.done.outcome == pb.SessionDone.OK, replaced.done.message
    assert seen.levels() == [level]
    assert [len(a) for a in seen.answers_to(Ins.PUT_KEY)] == [_put_key_answer_length(level)]
    assert set(isd_state(load_state(card)).key_sets) == {0x70, 0x01}
    done = campaigns.GetCampaign(apb.GetCampaignRequest(campaign_id=campaign.campaign_id),
                                 timeout=30)
    assert (done.done, done.pending, done.failed) == (1, 0, 0)


def test_without_r_mac_an_altered_answer_still_fails_the_contact(
        stack: Path, minimum: Minimum, tmp_path: Path) -> None:
    minimum.set("03")
    card, _ = _new_card(stack, tmp_path, "altered", "10")
    altered, seen = _contact(stack, card, STATION, alter_put_key=True)
    assert seen.levels() == [0x03]
    assert (altered.done.outcome, altered.done.reason) == (pb.SessionDone.FAILED,
                                                           "answer_mismatch")
    honest, _ = _contact(stack, card, STATION)
    assert honest.done.outcome == pb.SessionDone.OK, honest.done.message
    assert set(isd_state(load_state(card)).key_sets) == {0x70, 0x02}


def test_a1_below_the_minimum_ends_for_good_until_an_operator_acts(
        stack: Path, minimum: Minimum, tmp_path: Path) -> None:
    card, psd_id = _new_card(stack, tmp_path, "weak-a1", "10")
    key_sets = dict(isd_state(load_state(card)).key_sets)
    minimum.set("13")
    ep = str(stack)

    report, seen = _contact(stack, card, STATION)

    done = report.done
    assert (done.outcome, done.reason) == (pb.SessionDone.FAILED, "security_level")
    for words in ("i=10 (pseudo-random challenge, no R-MAC, no R-ENCRYPTION)",
                  "at most level 03", "at least 13", "card_channel.minimum_security_level=13",
                  "nothing was written to the card", "cms psd clear-attention"):
        assert words in done.message, done.message
    assert report.scripts_run == 1 and seen.levels() == []    # no EXTERNAL AUTHENTICATE
    assert dict(isd_state(load_state(card)).key_sets) == key_sets         # FF only, as it came
    shown = cms("psd", "--endpoints", ep, "show", psd_id).stdout
    assert "blank" in shown and "needs_attention=security_level" in shown
    assert "i=10" in shown and "cms psd clear-attention" in shown
    assert "needs_attention" in cms("psd", "--endpoints", ep, "history", psd_id).stdout
    listed = cms("psd", "--endpoints", ep, "list", "--needs-attention").stdout
    assert psd_id in listed
    assert _metric(stack, "cms_psd_attention", reason="security_level") >= 1
    assert _metric(stack, "cms_access_contacts_total", outcome="FAILED",
                   reason="security_level", next="needs an operator") >= 1

    again, seen = _contact(stack, card, STATION)                # not retried
    assert (again.done.outcome, again.done.reason) == (pb.SessionDone.REFUSED,
                                                       "needs_attention")
    assert again.scripts_run == 1 and seen.levels() == []

    # Cleared without fixing the cause: the next contact finds it again.
    cms("psd", "--endpoints", ep, "clear-attention", psd_id, "--note", "looked at it")
    assert _contact(stack, card, STATION)[0].done.reason == "security_level"
    # The operator accepts such cards: a lower minimum, then the flag cleared.
    minimum.set("03")
    cleared = cms("psd", "--endpoints", ep, "clear-attention", psd_id, "--note",
                  "minimum back to 03 for this batch").stdout
    assert "needs_attention" not in cleared
    installed, seen = _contact(stack, card, STATION)
    assert installed.done.outcome == pb.SessionDone.OK, installed.done.message
    assert seen.levels() == [0x03] and set(isd_state(load_state(card)).key_sets) == {0x70, 0x02}
    history = cms("psd", "--endpoints", ep, "history", psd_id).stdout
    assert "attention_cleared" in history and "minimum back to 03" in history
    bad = cms("psd", "--endpoints", ep, "clear-attention", psd_id, "--note", "x", check=False)
    assert bad.returncode != 0 and "does not need attention" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr


def test_a2_below_the_minimum_fails_its_campaign_item_until_an_operator_acts(
        stack: Path, minimum: Minimum, tmp_path: Path) -> None:
    minimum.set("03")
    weak, weak_id = _new_card(stack, tmp_path, "weak-a2", "30")
    strong, strong_id = _new_card(stack, tmp_path, "strong-a2", "70")
    for card in (weak, strong):
        assert _contact(stack, card, STATION)[0].done.outcome == pb.SessionDone.OK
    _, campaigns = _admin(stack)
    campaign = campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1,
        filter=apb.CampaignFilter(psd_ids=[weak_id, strong_id])), timeout=30)
    minimum.set("33")
    key_sets = dict(isd_state(load_state(weak)).key_sets)
    ep = str(stack)

    report, seen = _contact(stack, weak, USER)

    assert (report.done.outcome, report.done.reason) == (pb.SessionDone.FAILED,
                                                         "security_level")
    assert "i=30" in report.done.message and "at least 33" in report.done.message
    assert seen.levels() == [] and dict(isd_state(load_state(weak)).key_sets) == key_sets
    request = apb.GetCampaignRequest(campaign_id=campaign.campaign_id)
    progress = campaigns.GetCampaign(request, timeout=30)
    assert (progress.pending, progress.failed, progress.done) == (1, 1, 0)
    status = cms("campaign", "--endpoints", ep, "status", campaign.campaign_id).stdout
    assert "1 pending, 1 failed (needs attention)" in status
    assert f"{weak_id} needs attention: PSD {weak_id} announces i=30" in status
    assert _metric(stack, "cms_campaign_cards", campaign=campaign.campaign_id,
                   state="failed") == 1
    assert _metric(stack, "cms_campaign_cards", campaign=campaign.campaign_id,
                   state="pending") == 1

    # Not retried: the campaign passes the card by, and counts no attempt.
    again, seen = _contact(stack, weak, USER)
    assert again.done.reason == "needs_attention" and seen.levels() == []
    strong_done, seen = _contact(stack, strong, USER)
    assert strong_done.done.outcome == pb.SessionDone.OK and seen.levels() == [0x33]

    minimum.set("13")
    cms("psd", "--endpoints", ep, "clear-attention", weak_id, "--note",
        "R-MAC without R-ENCRYPTION is enough for this card type")
    assert campaigns.GetCampaign(request, timeout=30).pending == 1
    replaced, seen = _contact(stack, weak, USER)
    assert replaced.done.outcome == pb.SessionDone.OK, replaced.done.message
    assert seen.levels() == [0x13] and set(isd_state(load_state(weak)).key_sets) == {0x70, 0x01}
    final = campaigns.GetCampaign(request, timeout=30)
    assert (final.done, final.pending, final.failed, final.state) == (
        2, 0, 0, apb.CAMPAIGN_COMPLETED)


def test_a_card_refusing_the_level_its_i_announced_is_recorded_not_retried(
        stack: Path, minimum: Minimum, tmp_path: Path) -> None:
    """The issue as a card vendor met it, from the other side: a card answers EXTERNAL
    AUTHENTICATE at a level it announced with 6A86. Every contact would end so; the
    first one flags the card, and the next ones leave it alone."""
    minimum.set("03")
    card, psd_id = _new_card(stack, tmp_path, "liar", "10")
    key_sets = dict(isd_state(load_state(card)).key_sets)

    report, seen = _contact(stack, card, STATION, i_as=0x70)

    assert seen.levels() == [0x33]
    assert (report.done.outcome, report.done.reason) == (pb.SessionDone.FAILED,
                                                         "card_refused")
    assert "refused EXTERNAL AUTHENTICATE at level 33" in report.done.message
    assert "6A86" in report.done.message
    assert dict(isd_state(load_state(card)).key_sets) == key_sets
    registry, _ = _admin(stack)
    psd = registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert psd.attention == "card_refused" and "6A86" in psd.attention_detail
    again, seen = _contact(stack, card, STATION, i_as=0x70)
    assert again.done.reason == "needs_attention" and seen.levels() == []
