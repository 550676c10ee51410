"""The CardChannel service: one bidirectional stream per card contact.

The agent says hello (its role), then answers each ``ApduScript`` with a
``ScriptResult``; the server ends with ``SessionDone``. The conversation
itself is ``access_server.flows.card_session``; this servicer only checks
who is calling and that each message is the one expected, so an agent that
sends garbage gets INVALID_ARGUMENT and the card's journal is left as it was
(an open intent is finished on the next contact).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import grpc

from access_server.flows import FlowContext, card_session
from cms.runtime.logs import fields
from cms.runtime.tls import peer_identity
from cms.v1 import card_channel_pb2 as pb
from cms.v1 import card_channel_pb2_grpc

log = logging.getLogger("access_server.card_channel")

AGENT_IDENTITY = "card-agent"
ROLES = frozenset({pb.USER_PC, pb.PERSONALIZATION_STATION})
MAX_RESPONSES = 64
MAX_RESPONSE_DATA = 4096


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


class CardChannelServicer(card_channel_pb2_grpc.CardChannelServicer):
    def __init__(self, make_context: Callable[[str], FlowContext],
                 allow_without_certificate: bool) -> None:
        self.make_context = make_context
        self.allow_without_certificate = allow_without_certificate

    def Connect(self, request_iterator: Iterator[pb.AgentMessage],
                context: grpc.ServicerContext) -> Iterator[pb.ServerMessage]:
        identity = peer_identity(context)
        if identity is None and not self.allow_without_certificate:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        if identity is not None and identity != AGENT_IDENTITY:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"identity {identity} may not open card channels")
        first = next(request_iterator, None)
        if first is None or not first.HasField("hello"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be hello")
        hello = first.hello
        if hello.role not in ROLES:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "hello.role must be USER_PC or PERSONALIZATION_STATION")
        actor = f"{identity or 'agent'}:{hello.agent_label[:40] or context.peer()}"
        ctx = self.make_context(actor)
        session = card_session(ctx, hello.role)
        script = next(session)
        shown = 0
        while True:
            # The steps taken before this script go out with it, as they happen.
            script.steps.extend(ctx.steps[shown:])
            shown = len(ctx.steps)
            yield pb.ServerMessage(script=script)
            message = next(request_iterator, None)
            if message is None:
                session.close()
                log.info("agent left mid-session", extra=fields(actor=actor))
                return
            problem = (_check_result(message.result, script) if message.HasField("result")
                       else "expected a script result")
            if problem is not None:
                session.close()
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            try:
                script = session.send(message.result)
            except StopIteration as stop:
                done = stop.value
                log.info("session done", extra=fields(
                    psd_id=done.psd_id, outcome=pb.SessionDone.Outcome.Name(done.outcome)))
                yield pb.ServerMessage(done=done)
                return
