"""Every way a card contact can end (access_server/outcomes.py), reached by driving the
contact (``flows.card_session``) with a real store and scripted answers: the card's
answers as the agent reports them, and a stand-in for the proxy's CardKeys that opens a
channel, or fails as the proxy fails. Each ending is checked for its outcome, its reason,
and whether the card was flagged for an operator (only once it proved its keys); the
end-to-end levels and records, with the real proxy and cards, are in
test_flow_a_levels.py. Also: docs/flows.md lists every reason, with its class.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from access_server import outcomes as why
from access_server.channel_opener import OpenError
from access_server.flows import FlowContext, card_session
from access_server.levels import LevelPolicy
from access_server.masters import MasterUnusable
from access_server.store import ItemStatus, PsdState, Store
from cardcore import gp
from cardcore import tlv as T
from cardcore.psd import ISD_AID, cplc_for_psd_id, psd_id_bytes
from cardcore.scp03 import InitializeUpdateResponse
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_keys_pb2 as kpb

REPO = Path(__file__).resolve().parents[2]
PSD = "47905040123400000001"
ACTOR = "card-agent:test"
OK = 0x9000
STATION, USER = pb.PERSONALIZATION_STATION, pb.USER_PC


# -- what the card answers ------------------------------------------------------------

def _iu(kvn: int, i: int = 0x70, scp: int = 0x03) -> bytes:
    data = InitializeUpdateResponse(psd_id_bytes(PSD), kvn, 0x03, i, os.urandom(8),
                                    os.urandom(8), b"\x00\x00\x07" if i & 0x10 else None)
    raw = bytearray(data.encode())
    raw[11] = scp
    return bytes(raw)


def _key_information(kvns: set[int]) -> bytes:
    return gp.encode_key_information(gp.KeyInfo(kid, kvn, ((0x88, 16),))
                                     for kvn in sorted(kvns) for kid in (1, 2, 3))


def probe(kvns: set[int], *, i: int = 0x70, iu: bytes | None = None, iu_sw: int = OK,
          answers: int = 4, select_sw: int = OK, cplc: bytes | None = None,
          outcome: int | None = None) -> pb.ScriptResult:
    """Script 1's result: SELECT, CPLC, key information, INITIALIZE UPDATE (first
    ``answers`` of them answered), as the agent reports it."""
    kvn = 0xFF if 0xFF in kvns else 0x70
    responses = [
        pb.ApduResponse(data=gp.select_response(ISD_AID) if select_sw == OK else b"",
                        sw=select_sw),
        pb.ApduResponse(data=cplc if cplc is not None
                        else T.tlv(0x9F7F, cplc_for_psd_id(psd_id_bytes(PSD))), sw=OK),
        pb.ApduResponse(data=_key_information(kvns), sw=OK),
        pb.ApduResponse(data=(iu if iu is not None else _iu(kvn, i)) if iu_sw == OK else b"",
                        sw=iu_sw),
    ][:answers]
    if select_sw != OK:
        responses = responses[:1]
    if outcome is None:
        outcome = (pb.SCRIPT_COMPLETED if all(r.sw == OK for r in responses)
                   and len(responses) == 4 else pb.SCRIPT_UNEXPECTED_STATUS)
    return pb.ScriptResult(script_id=1, outcome=outcome, responses=responses)


def secured(*answers: tuple[bytes, int], outcome: int | None = None) -> pb.ScriptResult:
    """Script 2's result: the card's answers (data, status word)."""
    if outcome is None:
        outcome = (pb.SCRIPT_COMPLETED if all(sw == OK for _, sw in answers)
                   else pb.SCRIPT_UNEXPECTED_STATUS)
    return pb.ScriptResult(script_id=2, outcome=outcome, responses=[
        pb.ApduResponse(data=data, sw=sw) for data, sw in answers])


# -- the proxy ------------------------------------------------------------------------

PUT_ANSWER = b"\x70" + bytes(9)


class FakeCardKeys:
    """CardKeys.OpenSecureChannel as the flows see it: each request is kept; the channel
    opens (EXTERNAL AUTHENTICATE foreseen as a bare 9000, each PUT KEY as its KVN and
    check values, a DELETE as its confirmation, no R-MAC), or ``fail`` is raised."""

    def __init__(self, fail: tuple[grpc.StatusCode, str] | None = None,
                 on_open: Callable[[], None] | None = None) -> None:
        self.fail = fail
        self.on_open = on_open
        self.requests: list[kpb.OpenSecureChannelRequest] = []

    def OpenSecureChannel(self, request: kpb.OpenSecureChannelRequest, *,
                          timeout: float) -> kpb.OpenSecureChannelResponse:
        self.requests.append(request)
        if self.on_open is not None:
            self.on_open()
        if self.fail is not None:
            raise OpenError(*self.fail)
        opened = kpb.OpenSecureChannelResponse(commands=[kpb.WrappedCommand(
            apdu=bytes((0x84, 0x82, request.security_level, 0x00, 0x10)) + bytes(16),
            expected_response=b"\x90\x00")])
        for index, command in enumerate(request.commands, start=1):
            if command.HasField("put_key_set"):
                opened.commands.add(apdu=bytes((0x84, 0xD8, 0x00, 0x81, 0x01, 0x00)),
                                    expected_put_key_response=PUT_ANSWER,
                                    expected_response=PUT_ANSWER + b"\x90\x00")
                opened.put_keys.add(index=index, new_kvn=command.put_key_set.new_kvn)
                if command.put_key_set.key_set.HasField("new_random"):
                    opened.cryptograms.add(position=index, cryptogram=os.urandom(256))
            else:
                opened.commands.add(apdu=bytes(command.apdu), expected_response=b"\x00\x90\x00")
        return opened


# -- the cases ------------------------------------------------------------------------

def _blank(store: Store) -> None:
    store.register_psds([PSD], "admin")


def _active(store: Store, mk: int = 2) -> None:
    _blank(store)
    intent = store.begin_install(PSD, cryptogram=os.urandom(256),
                                 cryptogram_key_label="cryptogram/1", mkrk_version=1,
                                 mk_version=mk, actor="admin")
    store.complete_install(PSD, intent.intent_id, "admin")


def _in_campaign(store: Store) -> None:
    _active(store)
    store.start_campaign("v2 to v3", 2, 3, actor="admin")


def _flagged(store: Store) -> None:
    _in_campaign(store)
    store.flag_attention(PSD, reason="card_refused", detail="6A84 at PUT KEY", actor="admin")


def _revoked(store: Store) -> None:
    _active(store)
    store.revoke(PSD, "lost", "admin")


def _leased_elsewhere(store: Store) -> None:
    _blank(store)
    store.acquire_lease(PSD, "card-agent:another-station", 120)


def _unusable(kind: str, version: int) -> None:
    raise MasterUnusable(f"{kind.upper()} v{version} is not usable: not transferred")


@dataclass
class Case:
    reason: why.Reason
    role: int
    setup: Callable[[Store], None]
    results: list[pb.ScriptResult]
    fail: tuple[grpc.StatusCode, str] | None = None
    minimum: int = 0x03
    message: str = ""
    proxy_calls: int | None = None
    require_usable: Callable[[str, int], None] | None = None
    moves_registry: bool = False


A1_CARD = {0xFF}
A2_CARD = {0x70, 0x02}
A1_SCRIPT = secured((b"", OK), (PUT_ANSWER, OK), (PUT_ANSWER, OK), (b"\x00", OK))

CASES = [
    # retry later
    Case(why.CARD_ABSENT, STATION, _blank,
         [probe(A1_CARD, answers=1, outcome=pb.SCRIPT_CARD_REMOVED)], message="went away"),
    Case(why.CARD_ABSENT, USER, _in_campaign,
         [probe(A2_CARD, answers=3, outcome=pb.SCRIPT_READER_ERROR)],
         message="before the MKRK key set answered"),
    Case(why.CARD_ABSENT, STATION, _blank,
         [probe(A1_CARD), secured((b"", OK), outcome=pb.SCRIPT_CARD_REMOVED)],
         message="the next contact finishes it"),
    Case(why.CARD_ABSENT, STATION, _blank, [probe(A1_CARD), secured((b"", 0x6985))],
         message="lost the session before EXTERNAL AUTHENTICATE"),
    Case(why.CARD_BUSY, STATION, _leased_elsewhere, [probe(A1_CARD)], proxy_calls=0),
    Case(why.UNAVAILABLE, USER, _in_campaign, [probe(A2_CARD)],
         fail=(grpc.StatusCode.UNAVAILABLE, "connection refused")),
    Case(why.REGISTRY_MOVED, USER, _in_campaign, [probe(A2_CARD)], moves_registry=True),
    # needs an operator, recorded on the card
    Case(why.SECURITY_LEVEL, STATION, _blank, [probe(A1_CARD, i=0x10)], minimum=0x13,
         proxy_calls=1, message="announces i=10 (pseudo-random challenge, no R-MAC, no "
         "R-ENCRYPTION): it offers at most level 03 (C-MAC, C-DECRYPTION), and its channel "
         "must have at least 13 (C-MAC, C-DECRYPTION, R-MAC) "
         "(card_channel.minimum_security_level=13, card_channel.security_level=highest)"),
    Case(why.SECURITY_LEVEL, USER, _in_campaign, [probe(A2_CARD, i=0x30)], minimum=0x33,
         proxy_calls=1, message="nothing was written to the card"),
    Case(why.CARD_REFUSED, STATION, _blank,
         [probe(A1_CARD), secured((b"", OK), (b"", 0x6A84))],
         message="refused PUT KEY (KVN 70) (6A84 not enough memory), secured command 2 of 4"),
    Case(why.CARD_REFUSED, USER, _in_campaign, [probe(A2_CARD), secured((b"", 0x6A86))],
         message="refused EXTERNAL AUTHENTICATE at level 33"),
    Case(why.KEY_VERSIONS, USER, _in_campaign, [probe({0x70, 0x01, 0x02})], proxy_calls=1,
         message="holds MK key versions 01, 02, the registry says v2"),
    Case(why.CARD_CHALLENGE, USER, _in_campaign, [probe(A2_CARD)],
         fail=(grpc.StatusCode.FAILED_PRECONDITION, "card challenge mismatch: card "
               "challenge does not come from its sequence counter and AID A000000151000000")),
    # needs an operator, not recorded
    Case(why.PROBE_REFUSED, STATION, _blank, [probe(A1_CARD, select_sw=0x6A82)],
         message="refused at SELECT (6A82"),
    Case(why.PROBE_REFUSED, USER, _in_campaign, [probe(A2_CARD, iu_sw=0x6985)],
         message="did not answer INITIALIZE UPDATE (6985"),
    Case(why.PROBE_MALFORMED, STATION, _blank, [probe(A1_CARD, cplc=b"\x9f\x7f\x03abc")],
         message="CPLC is malformed"),
    Case(why.PROBE_MALFORMED, USER, _in_campaign, [probe(A2_CARD, iu=_iu(0x70)[:20])],
         message="INITIALIZE UPDATE answer is malformed"),
    Case(why.SCP_VERSION, USER, _in_campaign, [probe(A2_CARD, iu=_iu(0x70, scp=0x02))],
         message="answered INITIALIZE UPDATE with SCP02"),
    Case(why.SCP_VERSION, STATION, _blank, [probe(A1_CARD, iu=_iu(0x30))],
         message="with key version 30, not FF"),
    Case(why.KEY_SET_MISSING, USER, _in_campaign, [probe({0x02}, iu_sw=0x6A88)],
         message="the card has no such key set"),
    Case(why.KEY_SET_MISSING, STATION, _blank, [probe({0x30}, iu_sw=0x6A88)],
         message="has no transport keys"),
    Case(why.CARD_CRYPTOGRAM, USER, _in_campaign, [probe(A2_CARD)],
         fail=(grpc.StatusCode.FAILED_PRECONDITION,
               "card cryptogram mismatch: wrong key set or not this card")),
    Case(why.ANSWER_MISMATCH, STATION, _blank,
         [probe(A1_CARD), secured((b"", OK), (b"\x71" + bytes(9), OK))],
         message="not the one the HSM foresaw"),
    Case(why.PROXY_REFUSED, USER, _in_campaign, [probe(A2_CARD)],
         fail=(grpc.StatusCode.PERMISSION_DENIED, "access-server may not call "
               "OpenSecureChannelBatch")),
    Case(why.HSM_KEY_MISSING, STATION, _blank, [probe(A1_CARD)],
         fail=(grpc.StatusCode.NOT_FOUND, "access/mk/2 not found")),
    Case(why.PROXY_ERROR, STATION, _blank, [probe(A1_CARD)],
         fail=(grpc.StatusCode.INTERNAL, "internal error (KeyError)")),
    Case(why.MASTER_UNUSABLE, USER, _in_campaign, [probe(A2_CARD)], proxy_calls=0,
         require_usable=_unusable, message="MK v3 is not usable"),
    Case(why.REGISTRY_REFUSED, STATION, _active, [probe(A1_CARD)],
         message="installation starts from blank"),
    Case(why.AGENT_ERROR, STATION, _blank,
         [probe(A1_CARD, answers=0, outcome=pb.SCRIPT_BAD_SCRIPT)], message="no answer"),
    Case(why.AGENT_ERROR, STATION, _blank,
         [probe(A1_CARD), secured((b"", OK), outcome=pb.SCRIPT_BAD_SCRIPT)],
         message="SCRIPT_BAD_SCRIPT"),
    # refused
    Case(why.NOT_REGISTERED, STATION, lambda store: None, [probe(A1_CARD)],
         message="not registered"),
    Case(why.REVOKED, USER, _revoked, [probe(A2_CARD)], proxy_calls=0),
    Case(why.NEEDS_ATTENTION, USER, _flagged, [probe(A2_CARD)], proxy_calls=0,
         message="needs attention since"),
]


def _name(case: Case) -> str:
    return f"{case.reason.code}-{'station' if case.role == STATION else 'pc'}"


@pytest.fixture
def store(tmp_path: Path):
    with Store.from_url(f"sqlite:///{tmp_path / 'access.db'}") as opened:
        yield opened


def _drive(store: Store, case: Case) -> tuple[pb.SessionDone, list[pb.ApduScript],
                                              FakeCardKeys]:
    on_open = None
    if case.moves_registry:
        def on_open() -> None:      # an operator's change while the card proves its keys
            store.reconcile(PSD, state=PsdState.ACTIVE, mk_version=2, mkrk_version=1,
                            event="probe", detail="checked", actor="admin")
    proxy = FakeCardKeys(case.fail, on_open)
    ctx = FlowContext(store=store, card_keys=proxy, install_versions=lambda: (2, 1, 1),
                      actor=ACTOR, lease_holder=ACTOR, require_usable=case.require_usable,
                      levels=LevelPolicy(minimum=case.minimum))
    session = card_session(ctx, case.role)
    scripts = [next(session)]
    for result in case.results:
        try:
            scripts.append(session.send(result))
        except StopIteration as stop:
            return stop.value, scripts, proxy
    raise AssertionError(f"the contact asked for script {len(scripts) + 1}")


def test_the_cases_reach_every_reason() -> None:
    reached = {case.reason.code for case in CASES}
    assert reached | {why.DONE.code, why.NOTHING_TO_DO.code} == set(why.REASONS)


@pytest.mark.parametrize("case", CASES, ids=_name)
def test_each_ending_has_its_outcome_reason_and_record(store: Store, case: Case) -> None:
    case.setup(store)
    registered = case.reason is not why.NOT_REGISTERED
    before = store.get_psd(PSD) if registered else None
    history = store.history(PSD) if registered else []

    done, scripts, proxy = _drive(store, case)

    assert (done.outcome, done.reason) == (case.reason.outcome, case.reason.code), done.message
    assert case.message in done.message
    if case.proxy_calls is not None:
        assert len(proxy.requests) == case.proxy_calls
    if not proxy.requests:
        assert len(scripts) == 1                        # no secured script without a channel
    if not registered:
        return
    after = store.get_psd(PSD)
    assert after.lease_holder != ACTOR                  # no contact keeps the card
    if case.reason.recorded:
        assert after.attention == case.reason.code
        assert after.attention_detail and after.attention_detail in done.message
        assert "recorded: the card needs attention" in done.message
        assert store.history(PSD)[-1].event == "needs_attention"
        assert proxy.requests, "recorded before the card proved its keys"
        assert store.campaign_work_for(PSD) is None
        for campaign in store.list_campaigns():
            item = store.get_campaign_item(campaign.campaign_id, PSD)
            assert item.status is ItemStatus.FAILED and item.last_error == done.message.split(
                "; recorded:")[0]
    elif case.reason is not why.NEEDS_ATTENTION:
        assert after.attention is None
    if case.role == USER and not case.reason.recorded and not case.moves_registry:
        # A user PC's contact that ends so writes nothing at all to the registry.
        assert after == before and store.history(PSD) == history


def test_below_the_minimum_the_card_proves_its_keys_and_gets_no_script(store: Store) -> None:
    case = next(c for c in CASES if c.reason is why.SECURITY_LEVEL and c.role == STATION)
    case.setup(store)
    done, scripts, proxy = _drive(store, case)
    assert done.reason == "security_level"
    assert len(scripts) == 1                            # the probe only
    (proof,) = proxy.requests
    assert (proof.kvn, proof.security_level, len(proof.commands)) == (0xFF, 0x03, 0)
    assert proof.predict_responses and proof.aid == ISD_AID
    assert proof.key_set.diversified.master_label == "factory/transport-master"
    assert store.get_psd(PSD).state is PsdState.BLANK   # no installation journaled


@pytest.mark.parametrize("scp_i, cap, level", [
    (0x10, None, 0x03), (0x30, None, 0x13), (0x70, None, 0x33), (0x70, 0x13, 0x13)])
def test_the_channel_is_asked_at_the_level_chosen_for_the_card(
        store: Store, scp_i: int, cap: int | None, level: int) -> None:
    _blank(store)
    proxy = FakeCardKeys()
    ctx = FlowContext(store=store, card_keys=proxy, install_versions=lambda: (2, 1, 1),
                      actor=ACTOR, lease_holder=ACTOR, levels=LevelPolicy(cap=cap))
    session = card_session(ctx, STATION)
    next(session)
    script = session.send(probe(A1_CARD, i=scp_i))
    assert script.script_id == 2 and script.commands[0].apdu[2] == level
    assert [r.security_level for r in proxy.requests] == [level]
    try:
        session.send(A1_SCRIPT)
    except StopIteration as stop:
        done = stop.value
    assert done.reason == "done", done.message
    assert f"SCP03, level {level:02X}" in "\n".join(done.steps)


def test_the_docs_table_lists_every_reason_with_its_class() -> None:
    text = (REPO / "docs" / "flows.md").read_text()
    table = text[text.index("<!-- outcome-table -->"):]
    rows = {}
    for line in table.splitlines():
        found = re.match(r"\| `(\w+)` \| (\w+) \| ([a-z ]+) \| (yes|no) \|", line)
        if found:
            rows[found.group(1)] = found.groups()[1:]
    assert set(rows) == set(why.REASONS)
    for code, (outcome, next_, recorded) in rows.items():
        reason = why.REASONS[code]
        assert outcome == pb.SessionDone.Outcome.Name(reason.outcome), code
        assert next_ == (reason.next.value if reason.outcome not in (
            pb.SessionDone.OK, pb.SessionDone.NOTHING_TO_DO) else "none"), code
        assert recorded == ("yes" if reason.recorded else "no"), code
