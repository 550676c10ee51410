"""``cms card-agent``: relay APDU scripts between a card reader and the access server.

Only argparse is imported at module level: ``cms --help`` loads every
package's ``cli`` module, and the agent must start on a PC that has nothing
but grpcio, protobuf and pyscard.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cms.identity import ACCESS_SERVER

if TYPE_CHECKING:
    from card_agent.agent import CardSource
    from card_agent.cancel import Cancellation
    from card_agent.connection import ServerTarget
    from card_agent.session import SessionReport

PROG = "cms card-agent"
DEFAULT_GIVE_UP_ONCE_S = 60.0
EXIT_GRACE_S = 10.0
"""After its last card the agent process ends within this, whatever gRPC's teardown does."""
LOG_LEVELS = ("debug", "info", "warning", "error")
ACTIVATION_CODE_ENV = "CMS_ACTIVATION_CODE"
VIRTUAL_CARD_SOURCE = "virtual_psd.agent_source"
"""Where ``--virtual`` finds the in-process virtual card (found at run time, never imported
by the agent: a ``VirtualCardSource(state, fault=...)`` raising ``VirtualCardError``)."""

EPILOG = """\
exit status: 0 session OK or nothing to do (or stopped, without --once);
1 bad configuration; 3 the server ended the session FAILED, REFUSED or
RETRY_LATER; 4 the stream or the card failed mid-session; 5 the server could
not be reached in time; 6 the server refused the stream, or was not the
access server (its certificate lacks the identity); 7 no reader or a
reader failure; 8 stopped before the session finished.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card-agent", help="relay APDU scripts between a card reader and the access server",
        description="Waits for a card, opens a CardChannel stream to the access server and "
                    "runs the APDU scripts it sends. Holds no key; logs no protected data.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    server = p.add_argument_group("access server")
    server.add_argument("--server", metavar="HOST:PORT",
                        help="access server address (overrides the one in --endpoints)")
    server.add_argument("--ca", type=Path, metavar="FILE",
                        help="CA certificate(s) that authenticate the server (PEM)")
    server.add_argument("--cert", type=Path, metavar="FILE",
                        help="client certificate (PEM), where the deployment issues one")
    server.add_argument("--key", type=Path, metavar="FILE", help="client private key (PEM)")
    server.add_argument("--endpoints", type=Path, metavar="PATH",
                        help="endpoints.json (or its directory) of a deployment")
    server.add_argument("--identity", default="card-agent",
                        help="TLS identity in --endpoints (default: card-agent)")
    server.add_argument("--server-identity", default=ACCESS_SERVER, metavar="IDENTITY",
                        help="the identity the server must prove (default: access-server; "
                             "provider: the provider system's init-pack --agents)")
    card = p.add_argument_group("card")
    card.add_argument("--reader", metavar="SUBSTRING",
                      help="use the first reader whose name contains this (default: first)")
    card.add_argument("--list-readers", action="store_true", help="list readers and exit")
    card.add_argument("--virtual", type=Path, metavar="STATE",
                      help="use the in-process virtual card kept in STATE instead of a reader")
    card.add_argument("--virtual-fault", metavar="SPEC",
                      help="fault plan for the virtual card (e.g. power-loss@5, tear@5)")
    run = p.add_argument_group("behaviour")
    run.add_argument("--role", choices=("user", "station"), default="user",
                     help="user: a user's PC (post-issuance work); station: a "
                          "personalization station (initial installation). Default: user")
    run.add_argument("--activate", action="store_true",
                     help="personalize a card issued online to this PC's user, with the "
                          f"activation code from ${ACTIVATION_CODE_ENV} or typed at a prompt "
                          "(never on the command line, where others can read it)")
    run.add_argument("--label", help="label of this PC or station (default: host name)")
    run.add_argument("--once", action="store_true",
                     help="serve one card, then exit with the session's status")
    run.add_argument("--session-timeout", type=float, metavar="SECONDS", default=None,
                     help="deadline of one session (default: 300)")
    run.add_argument("--give-up-after", type=float, metavar="SECONDS", default=None,
                     help="stop retrying an unreachable server after this long "
                          f"(default: {DEFAULT_GIVE_UP_ONCE_S:g} with --once, never without)")
    run.add_argument("--backoff-max", type=float, metavar="SECONDS", default=None,
                     help="longest wait between reconnection attempts (default: 30)")
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    p.set_defaults(func=_run)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace) -> int:
    from card_agent.agent import ExitStatus
    from card_agent.connection import AgentConfigError
    from card_agent.transport import ReaderError
    from cms.runtime.logs import setup_logging

    setup_logging("card-agent", args.log_level)
    if args.list_readers:
        return _list_readers(args)
    try:
        target = _server_target(args)
        target.validate()
        code = _activation_code(args)
        source = _card_source(args)
    except AgentConfigError as exc:
        return _fail(str(exc), ExitStatus.ERROR)
    except ReaderError as exc:
        return _fail(str(exc), ExitStatus.READER)
    try:
        status = int(_serve(args, target, source, code))
    finally:
        source.close()
    bound_exit(status)
    return status


def bound_exit(status: int, grace_s: float = EXIT_GRACE_S) -> None:
    """End the process with ``status`` if its normal exit has not within ``grace_s``.

    Everything the agent owes is settled when this is called: a card's state
    is written with each command, the outcome is printed. The interpreter's
    exit then still runs gRPC's teardown, which was once seen to hang after a
    stream broke (fault matrix: the agent had printed its last line and never
    exited); an agent that never exits holds its reader and its caller. So a
    daemon timer forces the exit, with the same status, only if it comes to that.
    """
    import os
    import threading

    def force() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()


def _list_readers(args: argparse.Namespace) -> int:
    from card_agent.agent import ExitStatus
    from card_agent.transport import ReaderError

    try:
        from card_agent.pcsc import list_readers
    except ImportError:
        return _fail("pyscard is not installed (pip install 'cms[agent]')", ExitStatus.ERROR)
    try:
        readers = list_readers()
    except ReaderError as exc:
        return _fail(str(exc), ExitStatus.READER)
    if not readers:
        return _fail("no PC/SC reader found", ExitStatus.READER)
    for name in readers:
        print(name)
    return ExitStatus.OK


def _server_target(args: argparse.Namespace) -> ServerTarget:
    from card_agent.connection import AgentConfigError, ServerTarget, target_from_endpoints

    if args.endpoints is not None:
        target = target_from_endpoints(args.endpoints, args.identity, address=args.server)
        if args.ca is not None:
            target = ServerTarget(target.address, args.ca, target.cert, target.key)
    else:
        if not args.server:
            raise AgentConfigError("give --server HOST:PORT with --ca, or --endpoints PATH")
        if args.ca is None:
            raise AgentConfigError("--server needs --ca (the server is always authenticated)")
        target = ServerTarget(args.server, args.ca, args.cert, args.key)
    return dataclasses.replace(target, server_identity=args.server_identity)


def _card_source(args: argparse.Namespace) -> CardSource:
    from card_agent.connection import AgentConfigError

    if args.virtual is not None:
        return _virtual_card_source(args.virtual, args.virtual_fault)
    if args.virtual_fault:
        raise AgentConfigError("--virtual-fault needs --virtual")
    try:
        from card_agent.pcsc import PcscCardSource
    except ImportError:
        raise AgentConfigError(
            "pyscard is not installed (pip install 'cms[agent]'), or use --virtual") from None
    return PcscCardSource(args.reader)


def _virtual_card_source(state: Path, fault: str | None) -> CardSource:
    """The in-process virtual card kept in ``state``, from the module named by
    ``VIRTUAL_CARD_SOURCE``.

    The virtual card is a part of its own (``virtual_psd``, with the 'card'
    extra) that fits the agent's card source shape; naming its module here
    instead of importing it keeps the agent free of it, as a user PC's install
    is. Its absence and its refusals are each one line, like any bad option.
    """
    import importlib

    from card_agent.connection import AgentConfigError

    try:
        module = importlib.import_module(VIRTUAL_CARD_SOURCE)
    except ImportError as exc:
        raise AgentConfigError(
            f"the virtual card is not available ({exc}); install 'cms[card]'") from None
    try:
        return module.VirtualCardSource(state, fault=fault)
    except module.VirtualCardError as exc:
        raise AgentConfigError(str(exc)) from None


def _activation_code(args: argparse.Namespace) -> str:
    """With ``--activate``: the code from the environment, or typed (not echoed)."""
    import getpass
    import os

    from card_agent.connection import AgentConfigError

    if not args.activate:
        return ""
    if args.role != "user":
        raise AgentConfigError("--activate is for a user's PC (--role user)")
    code = os.environ.get(ACTIVATION_CODE_ENV, "").strip()
    if not code and sys.stdin.isatty():
        code = getpass.getpass("activation code: ").strip()
    if not code:
        raise AgentConfigError(f"--activate needs the activation code: set "
                               f"{ACTIVATION_CODE_ENV}, or run on a terminal to type it")
    return code


def _serve(args: argparse.Namespace, target: ServerTarget, source: CardSource,
           activation_code: str = "") -> int:
    import socket

    from card_agent.agent import AgentSettings, CardAgent, ExitStatus
    from card_agent.backoff import Backoff
    from card_agent.cancel import Cancellation
    from card_agent.session import DEFAULT_SESSION_DEADLINE_S, ROLE_NAMES, AgentInfo

    give_up = args.give_up_after
    if give_up is None and args.once:
        give_up = DEFAULT_GIVE_UP_ONCE_S
    backoff = Backoff() if args.backoff_max is None else Backoff(max_s=args.backoff_max)
    settings = AgentSettings(
        info=AgentInfo(role=ROLE_NAMES[args.role], label=args.label or socket.gethostname(),
                       activation_code=activation_code),
        server=target.address, once=args.once,
        session_deadline_s=args.session_timeout or DEFAULT_SESSION_DEADLINE_S,
        give_up_after_s=give_up, backoff=backoff)
    cancellation = Cancellation()
    restore = _install_signal_handlers(cancellation)
    try:
        printer = StepPrinter()
        agent = CardAgent(source, target.open_channel, settings, cancellation,
                          on_session=printer.session, on_steps=printer.steps)
        status = agent.run()
    finally:
        restore()
    if status not in (ExitStatus.OK, ExitStatus.STOPPED) and agent.last_error:
        return _fail(agent.last_error, status)
    return status


class StepPrinter:
    """What a person at the PC (and the demo) reads: each seed step as the server reports
    it, then the session's outcome, PSD id and message."""

    def __init__(self) -> None:
        self.shown = 0

    def steps(self, steps: list[str]) -> None:
        for step in steps:
            print(f"  - {step}", flush=True)
        self.shown += len(steps)

    def session(self, report: SessionReport) -> None:
        from card_agent.session import SessionStatus

        shown, self.shown = self.shown, 0
        if report.status is not SessionStatus.DONE or report.done is None:
            if report.status is SessionStatus.NOT_CONNECTED:
                return  # the retry log line says it; a line per attempt would be noise
            print(f"session {report.outcome_name.lower()}: {report.error}", flush=True)
            return
        done = report.done
        for step in done.steps[shown:]:
            print(f"  - {step}", flush=True)
        line = f"session {report.outcome_name}"
        if done.psd_id:
            line += f" psd={done.psd_id}"
        if done.message:
            line += f": {done.message}"
        print(line, flush=True)


def _install_signal_handlers(cancellation: Cancellation):
    """SIGTERM/SIGINT request a stop; returns a function that restores the old handlers.

    The handler only writes a byte to a pipe (async-signal-safe); a watcher
    thread does the actual cancelling, which takes locks a handler must not.
    """
    import os
    import signal
    import threading

    read_fd, write_fd = os.pipe()

    def handler(signum: int, frame: object) -> None:
        try:
            os.write(write_fd, b"s")
        except OSError:
            pass

    def watch() -> None:
        try:
            if os.read(read_fd, 1) == b"s":
                cancellation.cancel()
        except OSError:
            pass
        finally:
            os.close(read_fd)

    threading.Thread(target=watch, name="card-agent-signals", daemon=True).start()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        try:
            os.write(write_fd, b"q")  # lets the watcher thread end
        except OSError:
            pass  # it has ended already, after a signal
        os.close(write_fd)

    return restore
