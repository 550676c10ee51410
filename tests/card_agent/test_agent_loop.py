"""The agent loop's decisions (retry, give up, wait for removal) against a real TLS server."""

from __future__ import annotations

import itertools

import grpc

from card_agent.agent import AgentSettings, CardAgent, ExitStatus
from card_agent.backoff import Backoff
from card_agent.cancel import Cancellation
from card_agent.session import AgentInfo, SessionReport, SessionStatus
from cms.v1 import card_channel_pb2 as pb
from deploy.pki import Pki
from tests.card_agent.cards import ScriptedCard
from tests.card_agent.channel_server import ChannelServer, free_port
from tests.card_agent.conftest import target_for
from tests.card_agent.scripts import command, done_message, script_message

GET_DATA = "80ca9f7f00"


class FakeSource:
    """One card that stays until the test says otherwise; removal stops the agent."""

    description = "fake reader"

    def __init__(self, cancellation: Cancellation, *, present_checks: int | None = None):
        self.cancellation = cancellation
        self.cards: list[ScriptedCard] = []
        self.present_checks = present_checks  # card_present() turns False after this many
        self.removal_waits = 0

    def card_present(self) -> bool:
        if self.present_checks is None:
            return True
        self.present_checks -= 1
        return self.present_checks >= 0

    def wait_for_card(self, cancellation: Cancellation) -> bool:
        return not cancellation.cancelled

    def wait_for_removal(self, cancellation: Cancellation) -> bool:
        self.removal_waits += 1
        self.cancellation.cancel()  # ends the test's agent after its first card
        return False

    def connect(self) -> ScriptedCard:
        card = ScriptedCard()
        self.cards.append(card)
        return card

    def close(self) -> None:
        pass


def quick_backoff() -> Backoff:
    return Backoff(initial_s=0.01, max_s=0.05)


def make_agent(pki: Pki, address: str, *, once: bool, **kw) -> tuple[CardAgent, FakeSource,
                                                                      list[SessionReport]]:
    cancellation = Cancellation()
    source = FakeSource(cancellation, present_checks=kw.pop("present_checks", None))
    reports: list[SessionReport] = []
    target = target_for(pki, address)
    settings = AgentSettings(info=AgentInfo(), server=address, once=once,
                             backoff=quick_backoff(), **kw)
    agent = CardAgent(source, target.open_channel, settings, cancellation,
                      on_session=reports.append)
    return agent, source, reports


def test_retry_later_then_ok_then_waits_for_removal(pki: Pki) -> None:
    attempts = itertools.count(1)

    def conversation(hello, receive, context):
        yield script_message(1, command(GET_DATA))
        receive()
        if next(attempts) == 1:
            yield done_message(pb.SessionDone.RETRY_LATER, retry_after=0)
        else:
            yield done_message(pb.SessionDone.OK, psd_id="42")

    with ChannelServer(pki, conversation) as server:
        agent, source, reports = make_agent(pki, server.address, once=False)
        status = agent.run()
    assert status == ExitStatus.OK  # stopped cleanly (the fake removal stopped it)
    assert [r.outcome_name for r in reports] == ["RETRY_LATER", "OK"]
    assert source.removal_waits == 1
    assert all(card.closed for card in source.cards)


def test_once_gives_up_on_an_unreachable_server(pki: Pki) -> None:
    ticks = itertools.count()
    agent, source, reports = make_agent(pki, f"127.0.0.1:{free_port()}", once=True,
                                        give_up_after_s=3)
    agent.clock = lambda: float(next(ticks))
    assert agent.run() == ExitStatus.UNREACHABLE
    assert len(reports) >= 3  # retried before giving up
    assert all(r.status is SessionStatus.NOT_CONNECTED for r in reports)
    assert all(card.sent == [] for card in source.cards)


def test_once_broken_session_is_not_retried(pki: Pki) -> None:
    def fail(hello, receive, context):
        yield script_message(1, command(GET_DATA))
        receive()
        context.abort(grpc.StatusCode.INTERNAL, "boom")
        yield  # pragma: no cover

    with ChannelServer(pki, fail) as server:
        agent, _source, reports = make_agent(pki, server.address, once=True)
        assert agent.run() == ExitStatus.SESSION_BROKEN
    assert len(reports) == 1 and len(server.record.hellos) == 1


def test_daemon_retries_a_broken_session_on_the_same_card(pki: Pki) -> None:
    attempts = itertools.count(1)

    def flaky(hello, receive, context):
        yield script_message(1, command(GET_DATA))
        receive()
        if next(attempts) == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        yield done_message(pb.SessionDone.OK)

    with ChannelServer(pki, flaky) as server:
        agent, _source, reports = make_agent(pki, server.address, once=False)
        assert agent.run() == ExitStatus.OK
    assert [r.status for r in reports] == [SessionStatus.BROKEN, SessionStatus.DONE]
    assert reports[1].ok


def test_card_pulled_while_waiting_to_retry_ends_the_contact(pki: Pki) -> None:
    def fail(hello, receive, context):
        yield script_message(1, command(GET_DATA))
        receive()
        context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        yield  # pragma: no cover

    with ChannelServer(pki, fail) as server:
        agent, source, reports = make_agent(pki, server.address, once=False, present_checks=0)
        agent.run()
    assert len(reports) == 1  # no second session without the card
    assert source.removal_waits == 1


def test_once_failed_outcome_is_a_failure_status(pki: Pki) -> None:
    def refuse_card(hello, receive, context):
        yield done_message(pb.SessionDone.REFUSED, message="card revoked")

    with ChannelServer(pki, refuse_card) as server:
        agent, _source, reports = make_agent(pki, server.address, once=True)
        assert agent.run() == ExitStatus.SESSION_FAILED
    assert reports[0].done.message == "card revoked"
