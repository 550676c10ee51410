"""The agent loop: wait for a card, run a session per card contact, retry, repeat.

Policy lives here, mechanism below: the session says how a stream ended, the
card source says whether a card is present, and this loop decides.

- Server unreachable before anything reached the card: back off (exponential,
  with jitter) and try again while the card stays; with ``once`` give up after
  ``give_up_after_s``.
- Stream broken mid-session: the session failed; with ``once`` that is the
  exit status, otherwise try again after a backoff while the card stays (the
  server reconciles the card's state on the next contact).
- SessionDone RETRY_LATER: wait as told and try again while the card stays.
- Any other SessionDone: wait for the card to be removed.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from card_agent.backoff import Backoff
from card_agent.cancel import Cancellation
from card_agent.session import (
    DEFAULT_SESSION_DEADLINE_S,
    AgentInfo,
    SessionReport,
    SessionStatus,
    StepsHook,
    run_session,
)
from card_agent.transport import CardRemovedError, CardTransport, ReaderError
from cms.identity import is_identity_refusal
from cms.runtime.logs import fields
from cms.v1 import card_channel_pb2 as pb

log = logging.getLogger("card_agent.agent")


class ExitStatus(enum.IntEnum):
    """Exit statuses of ``cms card-agent`` (documented in its --help)."""

    OK = 0
    ERROR = 1               # bad configuration or input
    SESSION_FAILED = 3      # SessionDone other than OK / NOTHING_TO_DO
    SESSION_BROKEN = 4      # the stream or the card failed mid-session
    UNREACHABLE = 5         # the server could not be reached in time
    REFUSED = 6             # the server refused the stream (authentication, service)
    READER = 7              # no reader, or the reader / PC/SC service failed
    STOPPED = 8             # stopped by a signal before the session finished


class CardSource(Protocol):
    """Where cards come from: a PC/SC reader, or the virtual card."""

    @property
    def description(self) -> str: ...

    def card_present(self) -> bool: ...

    def wait_for_card(self, cancellation: Cancellation) -> bool: ...

    def wait_for_removal(self, cancellation: Cancellation) -> bool: ...

    def connect(self) -> CardTransport: ...

    def reopen(self) -> None:
        """Re-establish the link to the reader service after a ReaderError."""

    def close(self) -> None: ...


ChannelFactory = Callable[[], grpc.Channel]
SessionHook = Callable[[SessionReport], None]


@dataclass
class AgentSettings:
    info: AgentInfo = field(default_factory=AgentInfo)
    server: str = ""
    once: bool = False
    session_deadline_s: float = DEFAULT_SESSION_DEADLINE_S
    # How long to keep retrying a server that cannot be reached (None: forever).
    give_up_after_s: float | None = None
    backoff: Backoff = field(default_factory=Backoff)


class CardAgent:
    """Runs sessions for the cards of one source against one access server."""

    def __init__(self, source: CardSource, channel_factory: ChannelFactory,
                 settings: AgentSettings, cancellation: Cancellation | None = None,
                 on_session: SessionHook | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_steps: StepsHook | None = None):
        self.source = source
        self.channel_factory = channel_factory
        self.settings = settings
        self.cancellation = cancellation or Cancellation()
        self.on_session = on_session
        self.on_steps = on_steps
        self.clock = clock
        # Why the last card contact failed, for the one-line summary of the CLI.
        self.last_error = ""

    def run(self) -> ExitStatus:
        """Serve cards until stopped (or, with ``once``, one card); the exit status.

        Without ``once`` a reader failure (pcscd restarted, reader unplugged)
        is waited out with a backoff; with ``once`` it is the exit status.
        """
        log.info("agent started", extra=fields(
            source=self.source.description, server=self.settings.server,
            role=pb.AgentRole.Name(self.settings.info.role), once=self.settings.once))
        reader_backoff = Backoff(max_s=self.settings.backoff.max_s)
        while not self.cancellation.cancelled:
            try:
                status = self._serve_cards()
            except ReaderError as exc:
                self.last_error = f"reader failed: {exc}"
                if self.settings.once:
                    log.error("reader failed", extra=fields(
                        source=self.source.description, error=str(exc)))
                    return ExitStatus.READER
                delay = reader_backoff.next_delay()
                log.warning("reader failed, retrying", extra=fields(
                    source=self.source.description, error=str(exc), in_s=round(delay, 2)))
                if self.cancellation.sleep(delay):
                    break
                if self._reopen_source():
                    reader_backoff.reset()
                continue
            if status is not None:
                return status
        log.info("agent stopped")
        return ExitStatus.STOPPED if self.settings.once else ExitStatus.OK

    def _serve_cards(self) -> ExitStatus | None:
        """Card after card until stopped; with ``once`` the first card's status."""
        while not self.cancellation.cancelled:
            log.info("waiting for a card", extra=fields(source=self.source.description))
            if not self.source.wait_for_card(self.cancellation):
                break
            status = self.serve_card()
            if self.settings.once:
                return status
            log.info("waiting for the card to be removed",
                     extra=fields(source=self.source.description))
            if not self.source.wait_for_removal(self.cancellation):
                break
        return None

    def _reopen_source(self) -> bool:
        try:
            self.source.reopen()
        except ReaderError as exc:
            log.warning("reader still unavailable", extra=fields(
                source=self.source.description, error=str(exc)))
            return False
        log.info("reader available again", extra=fields(source=self.source.description))
        return True

    def serve_card(self) -> ExitStatus:
        """Sessions with the card now present until one ends in a way that settles it."""
        backoff = self.settings.backoff
        backoff.reset()
        unreachable_since: float | None = None
        while not self.cancellation.cancelled:
            report = self._one_session()
            if report is None:
                return ExitStatus.SESSION_BROKEN
            if self.on_session is not None:
                self.on_session(report)
            if report.status is not SessionStatus.NOT_CONNECTED:
                unreachable_since = None
            decision = self._decide(report)
            if isinstance(decision, ExitStatus):
                return decision
            if report.status is SessionStatus.NOT_CONNECTED:
                now = self.clock()
                unreachable_since = unreachable_since if unreachable_since is not None else now
                give_up = self.settings.give_up_after_s
                if give_up is not None and now - unreachable_since >= give_up:
                    self.last_error = (f"access server {self.settings.server} unreachable "
                                       f"({report.error})")
                    log.error("giving up: access server unreachable", extra=fields(
                        server=self.settings.server, waited_s=round(now - unreachable_since, 1),
                        error=report.error))
                    return ExitStatus.UNREACHABLE
            delay = decision if decision is not None else backoff.next_delay()
            log.warning("retrying", extra=fields(
                reason=report.outcome_name.lower(), in_s=round(delay, 2),
                server=self.settings.server, error=report.error))
            if self.cancellation.sleep(delay):
                break
            if not self._card_still_there():
                return ExitStatus.SESSION_BROKEN
        return ExitStatus.STOPPED

    def _one_session(self) -> SessionReport | None:
        """Connect the card and run one session; None when the card is gone already."""
        try:
            transport = self.source.connect()
        except CardRemovedError as exc:
            self.last_error = f"card gone before the session: {exc}"
            log.warning("card gone before the session", extra=fields(error=str(exc)))
            return None
        channel = self.channel_factory()
        try:
            log.info("session starting", extra=fields(
                reader=transport.reader_name, atr=bytes(transport.atr).hex(),
                server=self.settings.server))
            return run_session(transport, channel, self.settings.info,
                               deadline_s=self.settings.session_deadline_s,
                               cancellation=self.cancellation, on_steps=self.on_steps)
        finally:
            channel.close()
            _close_quietly(transport)

    def _decide(self, report: SessionReport) -> ExitStatus | float | None:
        """Exit status when this card is settled, else the delay before the next try
        (None: use the backoff)."""
        once = self.settings.once
        if report.status is SessionStatus.DONE:
            assert report.done is not None
            _log_done(report)
            if report.done.outcome == pb.SessionDone.RETRY_LATER and not once:
                return float(report.done.retry_after_seconds) or None
            if report.ok:
                return ExitStatus.OK
            self.last_error = f"session ended {report.outcome_name}: {report.done.message}"
            return ExitStatus.SESSION_FAILED
        if report.status is SessionStatus.CANCELLED:
            log.info("session cancelled", extra=fields(scripts_run=report.scripts_run))
            return ExitStatus.STOPPED
        if report.status is SessionStatus.NOT_CONNECTED:
            return None
        if report.status is SessionStatus.REFUSED:
            if is_identity_refusal(report.error):
                self.last_error = report.error          # the agent refused the server
                log.error("server identity not proven", extra=fields(
                    server=self.settings.server, error=report.error))
            else:
                self.last_error = f"access server refused the session ({report.error})"
                log.error("access server refused the session", extra=fields(
                    server=self.settings.server, error=report.error))
            return ExitStatus.REFUSED if once else self.settings.backoff.max_s
        self.last_error = f"session failed: stream broken ({report.error})"
        log.error("session failed: stream broken", extra=fields(
            server=self.settings.server, scripts_run=report.scripts_run, error=report.error))
        return ExitStatus.SESSION_BROKEN if once else None

    def _card_still_there(self) -> bool:
        present = self.source.card_present()
        if not present:
            log.info("card removed while waiting to retry")
        return present


def _log_done(report: SessionReport) -> None:
    done = report.done
    assert done is not None
    level = logging.INFO if report.ok else logging.WARNING
    log.log(level, "session done", extra=fields(
        outcome=report.outcome_name, reason=done.reason, message=done.message,
        psd_id=done.psd_id,
        steps=list(done.steps), scripts_run=report.scripts_run,
        retry_after_s=done.retry_after_seconds))


def _close_quietly(transport: CardTransport) -> None:
    try:
        transport.close()
    except Exception as exc:  # closing a card that went away may fail; nothing to do
        log.debug("closing the card failed", extra=fields(error=type(exc).__name__))
