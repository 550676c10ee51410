"""Cards in PC/SC readers, through card agents, for ``cms provider init-pack --agents``.

The provider serves a card channel (:mod:`cms.runtime.agent_cards`) for the
run; each agent of identity ``card-agent`` that connects (``cms card-agent
--server HOST:PORT --server-identity provider``) brings one card, which is
initialized over the stream with the same steps as an in-process card. A
card is taken only while the pack still needs one, so concurrent agents
never make it larger than asked; agents beyond that hear "nothing to do".
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

from cms.identity import CARD_AGENT
from cms.runtime.agent_cards import AgentCard, AgentCardGone, AgentCardServer
from cms.runtime.tls import TlsFiles
from cms.v1 import card_channel_pb2 as cpb
from provider.initializer import AlreadyInitialized, Answers, CardFailed, CardInitialization
from provider.pack import Certifier, Outcome

INITIALIZED_STEP = "B1 card initialized by the provider"


class _Slots:
    """Cards still to take: reserved when a card's initialization starts, given back when
    the card turns out to be initialized already."""

    def __init__(self, wanted: int) -> None:
        self._free = wanted
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._free <= 0:
                return False
            self._free -= 1
            return True

    def give_back(self) -> None:
        with self._lock:
            self._free += 1


def _runner(card: AgentCard) -> Callable[[list[bytes]], Answers]:
    def run(apdus: list[bytes]) -> Answers:
        try:
            return card.run(apdus)
        except AgentCardGone as exc:
            raise CardFailed(f"the card went away ({exc})") from None
    return run


def _session(card: AgentCard, slots: _Slots, make: Callable[[], CardInitialization],
             certifier: Certifier, root: object, outcomes: queue.Queue) -> cpb.SessionDone:
    if not slots.take():
        return cpb.SessionDone(outcome=cpb.SessionDone.NOTHING_TO_DO,
                               message="the pack has all its cards")
    init = make()
    run = _runner(card)
    try:
        keys = init.until_certificates(run)
        (certificates,) = certifier.certify([keys])
        if isinstance(certificates, CardFailed):
            raise certificates
        row = init.finish(certificates, run, root)  # type: ignore[arg-type]
    except AlreadyInitialized as exc:
        slots.give_back()
        outcomes.put(Outcome(card.name, reason=str(exc), skipped=True))
        return cpb.SessionDone(outcome=cpb.SessionDone.NOTHING_TO_DO, message=str(exc),
                               psd_id=init.psd_id or "")
    except CardFailed as exc:
        init.abandon()
        outcomes.put(Outcome(card.name, reason=str(exc)))
        return cpb.SessionDone(outcome=cpb.SessionDone.FAILED, message=str(exc),
                               psd_id=init.psd_id or "")
    outcomes.put(Outcome(card.name, row=row))
    return cpb.SessionDone(outcome=cpb.SessionDone.OK, psd_id=init.psd_id or "",
                           message=f"card {row.serial} initialized",
                           steps=[f"{INITIALIZED_STEP}: serial {row.serial}"])


def agent_cards(listen: str, tls: TlsFiles, wanted: int,
                make: Callable[[], CardInitialization], certifier: Certifier,
                root: object, *, on_listening: Callable[[str], None] = print,
                timeout: float | None = None) -> Iterator[Outcome]:
    """Outcomes of ``wanted`` cards brought by agents (skipped cards do not count); ends
    early, with what it has, when no card came for ``timeout`` seconds."""
    outcomes: queue.Queue[Outcome] = queue.Queue()
    slots = _Slots(wanted)

    def handle(card: AgentCard) -> cpb.SessionDone:
        return _session(card, slots, make, certifier, root, outcomes)

    with AgentCardServer(listen, tls, frozenset({CARD_AGENT}), handle) as server:
        on_listening(server.address)
        tried = 0
        while tried < wanted:
            try:
                outcome = outcomes.get(timeout=timeout)
            except queue.Empty:
                return
            tried += 0 if outcome.skipped else 1
            yield outcome
