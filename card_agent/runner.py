"""Runs one APDU script on a card: the agent's whole job, without any networking.

The server sends several commands with the status words it accepts, so a key
replacement needs few round trips. The runner sends them in order, stops at
the first unexpected status word (later commands depend on the earlier ones,
and on a secure channel a failed command ends the session anyway), and says
exactly how far it got, so the server can reconcile the card's state.

Nothing is sent when any command of the script is malformed: a script the
agent cannot parse is a server bug, and running half of it would leave the
card in a state nobody planned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from card_agent.transport import CardRemovedError, CardTransport, ReaderError
from cardcore.apdu import ApduError, CommandApdu, parse_command, parse_response
from cardcore.sw import SW
from cms.runtime.logs import fields
from cms.v1 import card_channel_pb2 as pb

log = logging.getLogger("card_agent.runner")

SW_MAX = 0xFFFF
# A zero mask in an expected status means "compare all 16 bits".
FULL_MASK = 0xFFFF


class BadScriptError(ValueError):
    """A script command the agent refuses to send; ``index`` says which."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"command {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass(frozen=True)
class PreparedCommand:
    """A validated script command: parsed APDU, accepted statuses and sensitivity."""

    apdu: bytes
    parsed: CommandApdu
    expect: tuple[tuple[int, int], ...]
    sensitive: bool

    def accepts(self, sw: int) -> bool:
        if not self.expect:
            return sw == SW.OK
        return any(status_matches(sw, value, mask) for value, mask in self.expect)


def prepare_script(commands: Sequence[pb.ScriptCommand]) -> list[PreparedCommand]:
    """Validate every command of a script before any is sent; raise BadScriptError."""
    prepared = []
    for index, command in enumerate(commands):
        try:
            parsed = parse_command(command.apdu)
        except ApduError as exc:
            raise BadScriptError(index, str(exc)) from None
        expect = []
        for status in command.expect:
            if status.value > SW_MAX or status.mask > SW_MAX:
                raise BadScriptError(
                    index, f"expected status {status.value:#x}/{status.mask:#x} exceeds 16 bits")
            expect.append((status.value, status.mask))
        prepared.append(PreparedCommand(bytes(command.apdu), parsed, tuple(expect),
                                        command.sensitive))
    return prepared


def run_script(transport: CardTransport, script: pb.ApduScript) -> pb.ScriptResult:
    """Run ``script`` on ``transport`` and describe what happened as a ScriptResult.

    Never raises for card, reader or script problems: each becomes an outcome
    the server can act on.
    """
    result = pb.ScriptResult(script_id=script.script_id)
    try:
        commands = prepare_script(script.commands)
    except BadScriptError as exc:
        return _finish(result, pb.SCRIPT_BAD_SCRIPT, exc.index, str(exc))
    for index, command in enumerate(commands):
        outcome = _run_command(transport, script.script_id, index, command, result)
        if outcome is not None:
            return outcome
    return _finish(result, pb.SCRIPT_COMPLETED, 0, "")


def _run_command(transport: CardTransport, script_id: int, index: int,
                 command: PreparedCommand, result: pb.ScriptResult) -> pb.ScriptResult | None:
    """Send one command; return the final result when the script must stop here."""
    # Checked first: rendering APDUs costs CPU that a fleet of in-process agents notices.
    debug = log.isEnabledFor(logging.DEBUG)
    if debug:
        log.debug("apdu command", extra=fields(
            script_id=script_id, index=index, sensitive=command.sensitive,
            apdu=describe_command(command.parsed, sensitive=command.sensitive)))
    try:
        data, sw = parse_response(transport.transmit(command.apdu))
    except CardRemovedError as exc:
        return _finish(result, pb.SCRIPT_CARD_REMOVED, index, f"command {index}: {exc}")
    except (ReaderError, ApduError) as exc:
        return _finish(result, pb.SCRIPT_READER_ERROR, index, f"command {index}: {exc}")
    except Exception as exc:
        # A transport bug must not take the session down with it; the type is
        # enough to find it, and the message could carry bytes we must not log.
        return _finish(result, pb.SCRIPT_READER_ERROR, index,
                       f"command {index}: transport failure ({type(exc).__name__})")
    result.responses.append(pb.ApduResponse(data=data, sw=sw))
    if debug:
        log.debug("apdu response", extra=fields(
            script_id=script_id, index=index, sensitive=command.sensitive,
            response=describe_response(data, sw, sensitive=command.sensitive)))
    if command.accepts(sw):
        return None
    return _finish(result, pb.SCRIPT_UNEXPECTED_STATUS, index,
                   f"command {index} ({command.parsed.header.hex()}): "
                   f"status {sw:04x} not expected")


def status_matches(sw: int, value: int, mask: int) -> bool:
    """The card channel's rule: ``(sw & mask) == (value & mask)``, a zero mask being 0xFFFF."""
    m = mask or FULL_MASK
    return (sw & m) == (value & m)


def describe_command(cmd: CommandApdu, *, sensitive: bool) -> str:
    """A log rendering: header and lengths always; the data only when not sensitive."""
    text = f"{cmd.header.hex()} lc={len(cmd.data)}"
    if cmd.ne is not None:
        text += f" le={cmd.ne}"
    if cmd.data and not sensitive:
        text += f" data={cmd.data.hex()}"
    return text


def describe_response(data: bytes, sw: int, *, sensitive: bool) -> str:
    text = f"sw={sw:04x} len={len(data)}"
    if data and not sensitive:
        text += f" data={data.hex()}"
    return text


def _finish(result: pb.ScriptResult, outcome: int, stopped_at: int,
            message: str) -> pb.ScriptResult:
    result.outcome = outcome
    result.stopped_at = stopped_at
    result.message = message
    level = logging.INFO if outcome == pb.SCRIPT_COMPLETED else logging.WARNING
    log.log(level, "script finished", extra=fields(
        script_id=result.script_id, outcome=pb.ScriptOutcome.Name(outcome),
        responses=len(result.responses), stopped_at=stopped_at, detail=message))
    return result
