"""Cards in PC/SC readers, through card agents, for ``cms bureau personalize --agents``.

The bureau serves a card channel (:mod:`cms.runtime.agent_cards`) for the
run; each agent of identity ``card-agent`` that connects (``cms card-agent
--server HOST:PORT --server-identity bureau``) brings one card, driven over
the stream by the same sequence as an in-process card, one APDU per script
(PERSONALIZE's 6A89 and SET PIN's 6985 are answers the bureau reads, not
failures). A card or an agent gone midway leaves the card at its journaled
step, as a pulled card does.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

from bureau.inject import CardGone, Outcome, Result, Transmit
from cms.identity import CARD_AGENT
from cms.runtime.agent_cards import AgentCard, AgentCardGone, AgentCardServer
from cms.runtime.tls import TlsFiles
from cms.v1 import card_channel_pb2 as cpb

Gone = tuple[str, str]
"""(card name, why) of a card that went away."""


def agent_transmit(card: AgentCard) -> Transmit:
    """One APDU as a script of its own; CardGone when the card or its agent went away."""
    def transmit(apdu: bytes) -> bytes:
        try:
            answers = card.run([apdu])
        except AgentCardGone as exc:
            raise CardGone(str(exc)) from None
        if len(answers) != 1:
            raise CardGone("the agent answered no response")
        data, sw = answers[0]
        return data + sw.to_bytes(2, "big")
    return transmit


def _done(outcome: Outcome) -> cpb.SessionDone:
    text = outcome.result.value + (f": {outcome.reason}" if outcome.reason else "")
    code = cpb.SessionDone.FAILED if outcome.result is Result.FAILED else cpb.SessionDone.OK
    return cpb.SessionDone(outcome=code, message=f"card {outcome.serial or '?'} {text}")


def agent_cards(listen: str, tls: TlsFiles, personalize: Callable[[str, Transmit], Outcome],
                *, finished: Callable[[], bool], on_listening: Callable[[str], None] = print,
                timeout: float | None = None) -> Iterator[Outcome | Gone]:
    """What came of each card agents brought, until ``finished()`` says the batch is whole
    or no card came for ``timeout`` seconds."""
    outcomes: queue.Queue[Outcome | Gone] = queue.Queue()

    def handle(card: AgentCard) -> cpb.SessionDone:
        try:
            outcome = personalize(card.name, agent_transmit(card))
        except CardGone as exc:
            outcomes.put((card.name, str(exc)))
            return cpb.SessionDone(outcome=cpb.SessionDone.FAILED,
                                   message=f"the card went away ({exc}): present it again")
        outcomes.put(outcome)
        return _done(outcome)

    with AgentCardServer(listen, tls, frozenset({CARD_AGENT}), handle) as server:
        on_listening(server.address)
        while not finished():
            try:
                yield outcomes.get(timeout=timeout)
            except queue.Empty:
                return
