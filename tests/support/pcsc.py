"""Test glue around the private PC/SC stack of ``deploy.pcscd`` (which the demo uses too):
pytest fixtures that skip with the reason when this machine cannot run it, and a small
runner (``python -m tests.support.pcsc --card STATE -- COMMAND``)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

from deploy.pcscd import (
    FRIENDLY_NAME,
    VPCD_DRIVER,
    PcscUnavailable,
    PrivatePcscd,
    free_port_pair,
    transmit_fn,
    unavailable_reason,
)

__all__ = [
    "FRIENDLY_NAME",
    "VPCD_DRIVER",
    "PcscUnavailable",
    "PrivatePcscd",
    "free_port_pair",
    "pcscd_fixture",
    "private_pcscd_session",
    "started_or_skip",
    "transmit_fn",
    "unavailable_reason",
]


@contextlib.contextmanager
def started_or_skip() -> Iterator[PrivatePcscd]:
    """A running private pcscd for subprocess clients, or the test skipped with the reason."""
    import pytest

    reason = unavailable_reason()
    if reason:
        pytest.skip(f"private PC/SC stack unavailable: {reason}")
    daemon = PrivatePcscd()
    try:
        daemon.start()
    except PcscUnavailable as exc:
        daemon.close()
        pytest.skip(str(exc))
    try:
        yield daemon
    finally:
        daemon.close()


@contextlib.contextmanager
def private_pcscd_session() -> Iterator[PrivatePcscd]:
    """Start a private pcscd and point this process at it; stop it afterwards."""
    daemon = PrivatePcscd()
    try:
        daemon.start()
        daemon.use_in_this_process()
        daemon.wait_for_reader()
        yield daemon
    finally:
        daemon.close()


def pcscd_fixture():  # pragma: no cover - thin pytest glue
    """A session-scoped pytest fixture; import it into a conftest as ``private_pcscd``.

    Skips (with the reason) only when this machine cannot run a private
    pcscd, e.g. without CAP_SYS_ADMIN or without the vpcd driver.
    """
    import pytest

    @pytest.fixture(scope="session")
    def private_pcscd() -> Iterator[PrivatePcscd]:
        reason = unavailable_reason()
        if reason:
            pytest.skip(f"private PC/SC stack unavailable: {reason}")
        with private_pcscd_session() as daemon:
            yield daemon

    return private_pcscd


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.pcsc [--card STATE]... -- COMMAND...``

    Runs COMMAND against a private pcscd (its environment carries
    PCSCLITE_CSOCK_NAME), with up to two virtual cards from state files
    plugged into the vpcd slots; everything stops when COMMAND exits.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tests.support.pcsc")
    parser.add_argument("--card", action="append", default=[], metavar="STATE",
                        help="virtual card state file to insert (at most two)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or len(args.card) > 2:
        parser.error("give a command after --, and at most two cards")
    reason = unavailable_reason()
    if reason:
        print(f"private pcscd unavailable: {reason}", file=sys.stderr)
        return 77
    daemon = PrivatePcscd()
    cards: list[subprocess.Popen[bytes]] = []
    try:
        daemon.start()
        for slot, state in enumerate(args.card):
            cards.append(subprocess.Popen(
                [sys.executable, "-m", "cms.cli", "card", "virtual", "--state", state,
                 "--vpcd", daemon.vpcd_endpoint(slot)]))
        print(f"PCSCLITE_CSOCK_NAME={daemon.socket_path}", file=sys.stderr)
        return subprocess.run(command, env=daemon.client_env(), check=False).returncode
    finally:
        for proc in cards:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        daemon.close()


if __name__ == "__main__":
    raise SystemExit(main())
