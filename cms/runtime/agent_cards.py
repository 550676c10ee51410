"""A local tool's card channel: card agents connect, and the tool drives each card.

Some jobs run on an operator's machine for as long as they take, not as a
service: the provider system initializing a pack of cards in PC/SC readers
(``cms provider init-pack --agents``), a personalization bureau injecting
cards. Such a tool serves the ``CardChannel`` service the agents already
speak (``cms card-agent --server HOST:PORT --server-identity IDENTITY``),
with mutual TLS under its own server certificate, for the duration of the
job. Each accepted agent's card becomes an :class:`AgentCard` handed to the
tool's ``handle`` function in a thread of its own: ``run(apdus)`` sends one
APDU script and returns the card's answers; what ``handle`` returns is the
agent's SessionDone. Agents of identities not in ``allowed`` are refused.

This module knows nothing of what the scripts do, so any tool above it can
reuse it; it stands on the floor (grpc, the generated ``cms.v1``, the TLS
helpers) only.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc

from cms.runtime.tls import TlsFiles, peer_identity, server_credentials
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc as pb_grpc

log = logging.getLogger("cms.agent_cards")

OK = 0x9000
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
STOP_GRACE_S = 5.0
CARD_GONE = frozenset({pb.SCRIPT_CARD_REMOVED, pb.SCRIPT_READER_ERROR})


class AgentCardGone(Exception):
    """The card, its reader or its agent went away during a script."""


class AgentCard:
    """One agent's card for the duration of its session."""

    def __init__(self, identity: str, hello: pb.AgentHello,
                 requests: Iterator[pb.AgentMessage], outbox: queue.Queue) -> None:
        self.identity = identity
        self.hello = hello
        self._requests = requests
        self._outbox = outbox
        self._script_id = 0

    @property
    def name(self) -> str:
        who = self.hello.agent_label or self.identity
        return f"{who} ({self.hello.reader})" if self.hello.reader else who

    def run(self, apdus: Sequence[bytes], steps: Sequence[str] = ()) -> list[tuple[bytes, int]]:
        """Send ``apdus`` as one script (each expecting 9000); the answers up to the first
        other one. AgentCardGone when the card or the agent went away."""
        self._script_id += 1
        self._outbox.put(pb.ServerMessage(script=pb.ApduScript(
            script_id=self._script_id, steps=list(steps), commands=[
                pb.ScriptCommand(apdu=apdu, sensitive=True,
                                 expect=[pb.ExpectedStatus(value=OK, mask=0xFFFF)])
                for apdu in apdus])))
        try:
            message = next(self._requests)
        except StopIteration:
            raise AgentCardGone("the agent closed the stream") from None
        except grpc.RpcError as exc:
            raise AgentCardGone(f"the agent's stream broke ({exc})") from None
        if not message.HasField("result") or message.result.script_id != self._script_id:
            raise AgentCardGone("the agent answered out of turn")
        result = message.result
        if result.outcome in CARD_GONE:
            raise AgentCardGone(result.message or "the card went away")
        if result.outcome == pb.SCRIPT_BAD_SCRIPT:
            raise AgentCardGone(f"the agent refused the script: {result.message}")
        return [(bytes(r.data), r.sw) for r in result.responses]


Handle = Callable[[AgentCard], pb.SessionDone]


class _Servicer(pb_grpc.CardChannelServicer):
    def __init__(self, handle: Handle, allowed: frozenset[str]) -> None:
        self._handle = handle
        self._allowed = allowed

    def Connect(self, request_iterator: Iterator[pb.AgentMessage],
                context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        identity = peer_identity(context)
        if identity not in self._allowed:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"identity {identity or '(none)'} may not connect a card here "
                          f"(allowed: {', '.join(sorted(self._allowed))})")
        try:
            first = next(request_iterator)
        except StopIteration:
            return
        if not first.HasField("hello"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message is a hello")
        outbox: queue.Queue[pb.ServerMessage] = queue.Queue()
        card = AgentCard(str(identity), first.hello, request_iterator, outbox)
        threading.Thread(target=self._drive, args=(card, outbox), daemon=True,
                         name="agent-card").start()
        while True:
            message = outbox.get()
            yield message
            if message.HasField("done"):
                return

    def _drive(self, card: AgentCard, outbox: queue.Queue) -> None:
        try:
            done = self._handle(card)
        except Exception as exc:          # the tool's bug must still end the agent's session
            log.exception("card session failed")
            done = pb.SessionDone(outcome=pb.SessionDone.FAILED,
                                  message=f"{type(exc).__name__}: {exc}")
        outbox.put(pb.ServerMessage(done=done))


class AgentCardServer:
    """CardChannel on ``listen`` (HOST:PORT; port 0 picks one) while the tool runs."""

    def __init__(self, listen: str, tls: TlsFiles, allowed: frozenset[str], handle: Handle,
                 *, max_sessions: int = 16) -> None:
        self._server: Any = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_sessions, thread_name_prefix="agents"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        pb_grpc.add_CardChannelServicer_to_server(_Servicer(handle, allowed), self._server)
        host = listen.rpartition(":")[0]
        try:
            self.port = self._server.add_secure_port(listen, server_credentials(tls))
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {listen}")
        self.address = f"{host}:{self.port}"

    def __enter__(self) -> AgentCardServer:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(STOP_GRACE_S).wait()
