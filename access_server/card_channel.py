"""The CardChannel service: one bidirectional stream per card contact.

The agent says hello (its role, and on a user's PC that personalizes a card
issued online, the activation code: ``access_server.user_perso``), then
answers each ``ApduScript`` with a ``ScriptResult``; the server ends with
``SessionDone``. The conversation itself is ``access_server.flows.card_session``;
this servicer only checks who is calling and that each message is the one expected, so an agent that
sends garbage gets INVALID_ARGUMENT and the card's journal is left as it was
(an open intent is finished on the next contact).

Any user PC can open streams, so none may hold the server: the servicer is a
coroutine on the access server's ``grpc.aio`` server, and a stream waiting
for its agent holds no thread. The hello must come within
``hello_timeout_seconds`` and each script's result within
``answer_timeout_seconds``, or the stream ends with DEADLINE_EXCEEDED (the
journal is left as when an agent leaves); streams over the limits of
``stream_limits`` are refused at once with RESOURCE_EXHAUSTED. The flow's
steps call the store and the proxy synchronously: they run in a thread pool,
one step of a contact at a time, and the generator is closed (its
``finally`` releases the card's lease) before the stream's status goes out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter, Gauge

from access_server.flows import FlowContext, SessionGen, card_session
from access_server.stream_limits import Admission, StreamLimits, peer_host
from access_server.user_perso import user_pc_session
from cms.runtime.logs import fields
from cms.runtime.loop_threads import LoopThreads
from cms.runtime.tls import peer_identity
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc

log = logging.getLogger("access_server.card_channel")

AGENT_IDENTITY = "card-agent"
ROLES = frozenset({pb.USER_PC, pb.PERSONALIZATION_STATION})
MAX_RESPONSES = 64
MAX_RESPONSE_DATA = 4096

OPEN_STREAMS = Gauge("cms_access_card_channels_open", "Card channel streams open now")
ENDED_EARLY = Counter(
    "cms_access_card_channels_cut_total",
    "Card channel streams refused at a limit or ended at a timeout, by reason", ["reason"])


@dataclass(frozen=True)
class ChannelTimeouts:
    """How long the server waits for the agent (``card_channel`` settings)."""

    hello_seconds: float = 10.0
    answer_seconds: float = 60.0


class EndStream(Exception):
    """The stream ends with this status, once the flow (if any) is closed."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason        # for ENDED_EARLY, when it is a limit or a timeout


def _check_result(result: pb.ScriptResult, script: pb.ApduScript) -> str | None:
    """Why ``result`` cannot be the answer to ``script``, or None."""
    if result.script_id != script.script_id:
        return f"expected the result of script {script.script_id}, got {result.script_id}"
    if len(result.responses) > min(MAX_RESPONSES, len(script.commands)):
        return (f"script {script.script_id} had {len(script.commands)} commands, "
                f"the result has {len(result.responses)} responses")
    for r in result.responses:
        if len(r.data) > MAX_RESPONSE_DATA or not 0 <= r.sw <= 0xFFFF:
            return "a response is too long or its status word is out of range"
    return None


class FlowSteps:
    """A ``card_session`` generator driven from the event loop, its steps in ``threads``.

    A step handed to a thread runs to its end even if the stream ends
    meanwhile (the agent's result did arrive); ``close`` waits for it, then
    closes the generator in a thread as well, since its ``finally`` writes to
    the store. A generator that returned its SessionDone has nothing to close.
    """

    def __init__(self, session: SessionGen, threads: LoopThreads) -> None:
        self._session = session
        self._threads = threads
        self._running: asyncio.Future | None = None
        self._finished = False

    def _step(self, value: pb.ScriptResult | None) -> pb.ApduScript | pb.SessionDone:
        """One step of the flow (in a thread): the next script, or the SessionDone."""
        try:
            return self._session.send(value)  # type: ignore[arg-type]  # None starts it
        except StopIteration as stop:
            self._finished = True
            return stop.value

    async def advance(self, value: pb.ScriptResult | None) -> pb.ApduScript | pb.SessionDone:
        self._running = self._threads.submit(self._step, value)
        return await asyncio.shield(self._running)

    async def close(self) -> None:
        if self._finished:
            return
        self._finished = True
        # Shielded: a second cancellation (the server stopping) must not leave
        # the generator open with the card's lease taken.
        await asyncio.shield(self._close())

    async def _close(self) -> None:
        if self._running is not None:
            try:
                await self._running
            except Exception:       # the step's failure was the stream's; closing goes on
                log.debug("step failed while the stream ended")
        try:
            closing = self._threads.submit(self._session.close)
        except RuntimeError:        # the threads are gone: the server stopped without waiting
            log.warning("a contact's flow was left open at shutdown; its lease will expire")
            return
        await closing


class CardChannelServicer(card_channel_pb2_grpc.CardChannelServicer):
    """CardChannel.Connect on the aio server (see the module docstring)."""

    def __init__(self, make_context: Callable[[str], FlowContext],
                 allow_without_certificate: bool, *, threads: LoopThreads,
                 timeouts: ChannelTimeouts, limits: StreamLimits) -> None:
        self.make_context = make_context
        self.allow_without_certificate = allow_without_certificate
        self.threads = threads
        self.timeouts = timeouts
        self.admission = Admission(limits)
        self._streams = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            identity = self._identity(context)
            host = peer_host(context.peer())
            refusal = self.admission.admit(identity, host)
            if refusal is not None:
                raise EndStream(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal, "stream_limit")
            self._opened()
            try:
                await self._converse(context, identity)
            finally:
                self.admission.release(identity, host)
                self._closed()
        except EndStream as end:
            if end.reason is not None:
                ENDED_EARLY.labels(end.reason).inc()
            await context.abort(end.code, end.message)

    def _identity(self, context: grpc.aio.ServicerContext) -> str | None:
        identity = peer_identity(context)
        if identity is None and not self.allow_without_certificate:
            raise EndStream(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if identity is not None and identity != AGENT_IDENTITY:
            raise EndStream(grpc.StatusCode.PERMISSION_DENIED,
                            f"identity {identity} may not open card channels")
        return identity

    @contextlib.asynccontextmanager
    async def _agent_within(self, seconds: float, what: str,
                            setting: str) -> AsyncIterator[None]:
        """What the agent must do (take a message, send one) within ``seconds``;
        EndStream with DEADLINE_EXCEEDED naming ``setting`` otherwise."""
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            raise EndStream(grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no {what} within {seconds:g} s (card_channel.{setting})",
                            setting) from None

    async def _converse(self, context: grpc.aio.ServicerContext, identity: str | None) -> None:
        async with self._agent_within(self.timeouts.hello_seconds, "hello",
                                      "hello_timeout_seconds"):
            first = await context.read()
        if first is grpc.aio.EOF or not first.HasField("hello"):
            raise EndStream(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        hello = first.hello
        if hello.role not in ROLES:
            raise EndStream(grpc.StatusCode.INVALID_ARGUMENT,
                            "hello.role must be USER_PC or PERSONALIZATION_STATION")
        if hello.activation_code and hello.role != pb.USER_PC:
            raise EndStream(grpc.StatusCode.INVALID_ARGUMENT,
                            "an activation code comes only from a user's PC (role USER_PC)")
        actor = f"{identity or 'agent'}:{hello.agent_label[:40] or context.peer()}"
        ctx = self.make_context(actor)
        # With an activation code the contact is flow B's online personalization, not
        # flow A's work; the code goes to the flow only, never to a log.
        session = (user_pc_session(ctx, hello.activation_code) if hello.activation_code
                   else card_session(ctx, hello.role))
        steps = FlowSteps(session, self.threads)
        try:
            await self._relay(context, ctx, steps, actor)
        finally:
            await steps.close()

    async def _relay(self, context: grpc.aio.ServicerContext, ctx: FlowContext,
                     steps: FlowSteps, actor: str) -> None:
        """Scripts out, results in, until the flow returns its SessionDone."""
        outcome = await steps.advance(None)
        shown = 0
        while isinstance(outcome, pb.ApduScript):
            script = outcome
            # The steps taken before this script go out with it, as they happen.
            script.steps.extend(ctx.steps[shown:])
            shown = len(ctx.steps)
            # The agent's side from here: taking the script (a peer that does not
            # read holds a write) and sending its result.
            async with self._agent_within(self.timeouts.answer_seconds,
                                          f"result of script {script.script_id}",
                                          "answer_timeout_seconds"):
                await context.write(pb.ServerMessage(script=script))
                message = await context.read()
            if message is grpc.aio.EOF:
                log.info("agent left mid-session", extra=fields(actor=actor))
                return
            problem = (_check_result(message.result, script) if message.HasField("result")
                       else "expected a script result")
            if problem is not None:
                raise EndStream(grpc.StatusCode.INVALID_ARGUMENT, problem)
            outcome = await steps.advance(message.result)
        log.info("session done", extra=fields(
            psd_id=outcome.psd_id, outcome=pb.SessionDone.Outcome.Name(outcome.outcome)))
        async with self._agent_within(self.timeouts.answer_seconds,
                                      "SessionDone taken by the agent",
                                      "answer_timeout_seconds"):
            await context.write(pb.ServerMessage(done=outcome))

    # -- open streams, for metrics and shutdown ------------------------------
    def _opened(self) -> None:
        self._streams += 1
        OPEN_STREAMS.inc()
        self._idle.clear()

    def _closed(self) -> None:
        self._streams -= 1
        OPEN_STREAMS.dec()
        if self._streams == 0:
            self._idle.set()

    async def wait_closed(self, timeout: float) -> bool:
        """Until every admitted stream has ended (its flow closed); False after ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True
