"""One card contact: a CardChannel.Connect stream from hello to SessionDone.

``SessionProtocol`` holds the conversation without doing any I/O (hello out,
a ScriptResult for each ApduScript in, SessionDone ends it), so the same logic
runs under two drivers:

- ``run_session``: a blocking gRPC stream, what the command-line agent uses;
- ``run_session_async``: a ``grpc.aio`` stream, for running many agents with
  in-process virtual cards in one event loop (the fleet benchmark).

Both take the card transport and the channel from the caller, so neither
needs the CLI, a reader or a certificate file. A session never raises for a
network or card failure: it returns a ``SessionReport`` saying how it ended,
which is what the agent loop needs to decide between retrying, waiting for
the next card and exiting.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from card_agent import AGENT_VERSION
from card_agent.cancel import Cancellation
from card_agent.runner import run_script
from card_agent.transport import CardTransport
from cms.identity import is_identity_refusal
from cms.runtime.logs import fields
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc as pb_grpc

log = logging.getLogger("card_agent.session")

# A whole card contact: long enough for on-card key generation in a script,
# short enough that a stuck server cannot hold the agent (and the card) forever.
DEFAULT_SESSION_DEADLINE_S = 300.0
# After SessionDone the agent half-closes and lets the server finish its side;
# a server that does not within this time is cut off (the work is done anyway).
DONE_GRACE_S = 5.0

# Status codes that say "this server will not take the stream" rather than
# "the server could not be reached": retrying at once would not help.
REFUSAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
})

ROLE_NAMES = {"user": pb.USER_PC, "station": pb.PERSONALIZATION_STATION}
SUCCESS_OUTCOMES = frozenset({pb.SessionDone.OK, pb.SessionDone.NOTHING_TO_DO})

Metadata = Sequence[tuple[str, str]]
StepsHook = Callable[[list[str]], None]
"""Called with the seed steps that arrive with a script, before the script runs."""


@dataclass(frozen=True)
class AgentInfo:
    """What the agent says about itself in AgentHello."""

    role: int = pb.USER_PC
    label: str = ""
    version: str = AGENT_VERSION
    # The user's activation code of an online issuance: a secret, out of repr and logs.
    activation_code: str = field(default="", repr=False)


class SessionStatus(enum.Enum):
    """How a session ended, from the agent's side of the stream."""

    # The server sent SessionDone (whatever its outcome).
    DONE = "done"
    # No message came from the server and nothing was sent to the card:
    # safe to try again (server down, network, TLS handshake).
    NOT_CONNECTED = "not-connected"
    # The server refused the stream before the session began (authentication,
    # authorization, no such service): a configuration problem.
    REFUSED = "refused"
    # The stream failed after the session had begun; the server reconciles
    # the card on its next contact.
    BROKEN = "broken"
    # A stop was requested.
    CANCELLED = "cancelled"


@dataclass
class SessionReport:
    """The end of a session: status, the server's SessionDone if any, and what ran."""

    status: SessionStatus
    done: pb.SessionDone | None = None
    scripts_run: int = 0
    messages_received: int = 0
    error: str = ""
    code: grpc.StatusCode | None = None
    results: list[pb.ScriptResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """The server finished with OK or NOTHING_TO_DO."""
        return self.done is not None and self.done.outcome in SUCCESS_OUTCOMES

    @property
    def outcome_name(self) -> str:
        if self.done is not None:
            return pb.SessionDone.Outcome.Name(self.done.outcome)
        return self.status.name


class SessionProtocol:
    """The agent's half of the card channel, without I/O.

    Feed it each ServerMessage; it runs scripts on the transport and returns the
    AgentMessage to send back (None when there is nothing to send).
    """

    def __init__(self, transport: CardTransport, info: AgentInfo,
                 on_steps: StepsHook | None = None):
        self.transport = transport
        self.info = info
        self.on_steps = on_steps
        self.done: pb.SessionDone | None = None
        self.results: list[pb.ScriptResult] = []
        self.messages_received = 0

    def hello(self) -> pb.AgentMessage:
        return pb.AgentMessage(hello=pb.AgentHello(
            agent_version=self.info.version, role=self.info.role,
            reader=self.transport.reader_name, atr=bytes(self.transport.atr),
            agent_label=self.info.label, activation_code=self.info.activation_code))

    def on_message(self, message: pb.ServerMessage) -> pb.AgentMessage | None:
        self.messages_received += 1
        kind = message.WhichOneof("msg")
        if kind == "script":
            if self.done is not None:
                log.warning("script after SessionDone ignored",
                            extra=fields(script_id=message.script.script_id))
                return None
            log.info("script received", extra=fields(
                script_id=message.script.script_id, commands=len(message.script.commands)))
            if message.script.steps and self.on_steps is not None:
                self.on_steps(list(message.script.steps))
            result = run_script(self.transport, message.script)
            self.results.append(result)
            return pb.AgentMessage(result=result)
        if kind == "done":
            self.done = message.done
            return None
        # A message kind from a newer server: nothing we can answer.
        log.warning("unknown server message ignored")
        return None

    def report_done(self) -> SessionReport:
        assert self.done is not None
        return self._report(SessionStatus.DONE)

    def report_failure(self, code: grpc.StatusCode | None, details: str, *,
                       cancelled: bool = False) -> SessionReport:
        if cancelled:
            status = SessionStatus.CANCELLED
        elif self.messages_received or self.results:
            status = SessionStatus.BROKEN
        elif code in REFUSAL_CODES or is_identity_refusal(details):
            # A server that is not the access server stays so: no retry helps.
            status = SessionStatus.REFUSED
        else:
            status = SessionStatus.NOT_CONNECTED
        text = f"{code.name}: {details}" if code is not None else details
        return self._report(status, error=text, code=code)

    def _report(self, status: SessionStatus, *, error: str = "",
                code: grpc.StatusCode | None = None) -> SessionReport:
        return SessionReport(status=status, done=self.done, scripts_run=len(self.results),
                             messages_received=self.messages_received, error=error,
                             code=code, results=list(self.results))


_END_OF_REQUESTS = object()


def _requests(outbox: queue.SimpleQueue) -> Iterator[pb.AgentMessage]:
    while True:
        item = outbox.get()
        if item is _END_OF_REQUESTS:
            return
        yield item


def run_session(transport: CardTransport, channel: grpc.Channel, info: AgentInfo, *,
                deadline_s: float = DEFAULT_SESSION_DEADLINE_S,
                cancellation: Cancellation | None = None,
                metadata: Metadata | None = None,
                on_steps: StepsHook | None = None) -> SessionReport:
    """Run one session over a blocking gRPC channel; never raises for stream failures.

    The caller owns ``channel`` and ``transport`` (neither is closed here), so
    many sessions can share one channel. ``cancellation`` cancels the stream
    from another thread or a signal handler.
    """
    protocol = SessionProtocol(transport, info, on_steps)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    outbox.put(protocol.hello())
    stub = pb_grpc.CardChannelStub(channel)
    call = stub.Connect(_requests(outbox), timeout=deadline_s, metadata=metadata,
                        wait_for_ready=False)
    unregister = cancellation.register(call.cancel) if cancellation else None
    try:
        for message in call:
            reply = protocol.on_message(message)
            if reply is not None:
                outbox.put(reply)
            if protocol.done is not None:
                break
        if protocol.done is None:
            return protocol.report_failure(
                None, "the server ended the stream without SessionDone")
        outbox.put(_END_OF_REQUESTS)
        _drain(call, call.cancel)
        return protocol.report_done()
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return protocol.report_failure(
            code, details or "", cancelled=bool(cancellation and cancellation.cancelled))
    finally:
        outbox.put(_END_OF_REQUESTS)
        if unregister is not None:
            unregister()


def _drain(call: Iterator[pb.ServerMessage], cancel: Callable[[], object]) -> None:
    """Let the server close its side after SessionDone; what it says then changes nothing."""
    timer = threading.Timer(DONE_GRACE_S, cancel)
    timer.daemon = True
    timer.start()
    try:
        for _ in call:
            log.warning("server message after SessionDone ignored")
    except grpc.RpcError as exc:
        if hasattr(exc, "code") and exc.code() != grpc.StatusCode.OK:
            log.debug("stream closed after SessionDone", extra=fields(code=exc.code().name))
    finally:
        timer.cancel()


async def _drain_async(call: grpc.aio.StreamStreamCall) -> None:
    while await call.read() is not grpc.aio.EOF:
        log.warning("server message after SessionDone ignored")


async def run_session_async(transport: CardTransport, channel: grpc.aio.Channel,
                            info: AgentInfo, *,
                            deadline_s: float = DEFAULT_SESSION_DEADLINE_S,
                            metadata: Metadata | None = None,
                            on_steps: StepsHook | None = None) -> SessionReport:
    """``run_session`` over a ``grpc.aio`` channel; cancel the task to stop it.

    The transport is called synchronously from the event loop: right for
    in-process virtual cards, whose commands take microseconds of CPU.
    """
    protocol = SessionProtocol(transport, info, on_steps)
    stub = pb_grpc.CardChannelStub(channel)
    call = stub.Connect(timeout=deadline_s, metadata=metadata, wait_for_ready=False)
    try:
        await call.write(protocol.hello())
        while protocol.done is None:
            message = await call.read()
            if message is grpc.aio.EOF:
                return protocol.report_failure(
                    None, "the server ended the stream without SessionDone")
            reply = protocol.on_message(message)
            if reply is not None:
                await call.write(reply)
        await call.done_writing()
        try:
            await asyncio.wait_for(_drain_async(call), DONE_GRACE_S)
        except TimeoutError:
            call.cancel()
        return protocol.report_done()
    except grpc.aio.AioRpcError as exc:
        if protocol.done is not None:
            return protocol.report_done()
        return protocol.report_failure(exc.code(), exc.details() or "")
    except asyncio.CancelledError:
        call.cancel()
        raise
    except Exception as exc:
        # Writing to a call the server already ended raises without a status;
        # the call's own status says what happened.
        if protocol.done is not None:
            return protocol.report_done()
        code = await call.code() if call.done() else None
        details = await call.details() if call.done() else f"{type(exc).__name__}: {exc}"
        return protocol.report_failure(code, details or "")
