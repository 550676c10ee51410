"""Builders for card channel messages in tests."""

from __future__ import annotations

from cms.v1 import card_channel_pb2 as pb


def command(apdu: bytes | str, *expect: tuple[int, int] | int,
            sensitive: bool = False) -> pb.ScriptCommand:
    raw = bytes.fromhex(apdu) if isinstance(apdu, str) else apdu
    statuses = []
    for item in expect:
        value, mask = item if isinstance(item, tuple) else (item, 0)
        statuses.append(pb.ExpectedStatus(value=value, mask=mask))
    return pb.ScriptCommand(apdu=raw, expect=statuses, sensitive=sensitive)


def script(script_id: int, *commands: pb.ScriptCommand) -> pb.ApduScript:
    return pb.ApduScript(script_id=script_id, commands=list(commands))


def script_message(script_id: int, *commands: pb.ScriptCommand) -> pb.ServerMessage:
    return pb.ServerMessage(script=script(script_id, *commands))


def done_message(outcome: int = pb.SessionDone.OK, *, message: str = "",
                 psd_id: str = "", steps: tuple[str, ...] = (),
                 retry_after: int = 0) -> pb.ServerMessage:
    return pb.ServerMessage(done=pb.SessionDone(
        outcome=outcome, message=message, psd_id=psd_id, steps=list(steps),
        retry_after_seconds=retry_after))
