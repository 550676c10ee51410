"""A private PC/SC stack: pcscd with its own vpcd reader (tests and the demo).

pcsc-lite 1.9.9's daemon always puts its socket at ``/run/pcscd/pcscd.comm``
(it has no option for another path), while its client library honours
``PCSCLITE_CSOCK_NAME``. So the daemon runs in a private mount namespace
(``unshare --mount``) where a temporary directory is bind-mounted over
``/run``: its socket lands in that directory, visible from outside, and no
system pcscd is touched. The reader list comes from a private configuration
directory (``pcscd --config``) whose vpcd entry listens on a free port.

Clients (pyscard in this process, a card agent in another) reach it with the
environment in :attr:`PrivatePcscd.env`. pcsc-lite reads the variable once per
process, at its first use, so set it before anything in the process talks
PC/SC (the ``private_pcscd`` fixture does that, once per session).

Debian's vpcd driver opens two slots per configured reader, on ports P and
P+1; the card for slot 0 connects to P (:attr:`PrivatePcscd.vpcd_port`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

VPCD_DRIVER: Final = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
FRIENDLY_NAME: Final = "CMS Virtual PCD"
_MOUNT_AND_RUN: Final = 'mount --bind "$1" /run && exec "$2" --foreground --config "$3" --info'


class PcscUnavailable(RuntimeError):
    """This machine cannot run a private pcscd (the reason says why)."""


def unavailable_reason() -> str | None:
    """Why a private pcscd cannot run here, or None when it can."""
    pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
    if not Path(pcscd).exists():
        return "pcscd is not installed (Debian package pcscd)"
    if not VPCD_DRIVER.exists():
        return f"the vpcd reader driver is missing ({VPCD_DRIVER}, package vsmartcard-vpcd)"
    if shutil.which("unshare") is None:
        return "unshare is not installed (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return ("cannot create a private mount namespace (needs root or CAP_SYS_ADMIN): "
                + (probe.stderr.strip() or f"exit {probe.returncode}"))
    try:
        import smartcard  # noqa: F401
    except ImportError:
        return "pyscard is not installed"
    return None


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies (even by SIGKILL).

    PR_SET_PDEATHSIG survives the exec of unshare, sh and pcscd, so a crashed
    or killed test run leaves no private pcscd behind.
    """
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))


def _port_pair_free(port: int) -> bool:
    for p in (port, port + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # vpcd binds with SO_REUSEADDR: connections in TIME_WAIT do not matter.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", p))
            except OSError:
                return False
    return True


def free_port_pair() -> int:
    """A port P with P and P+1 free (vpcd listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535 and _port_pair_free(port):
            return port
    raise PcscUnavailable("no free pair of TCP ports for vpcd")


class PrivatePcscd:
    """A pcscd of our own, with one vpcd reader; start/stop/restart at will."""

    def __init__(self, workdir: str | os.PathLike[str] | None = None, *,
                 friendly_name: str = FRIENDLY_NAME) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cms-pcscd-"))
        self.friendly_name = friendly_name
        self.run_dir = self.workdir / "run"
        self.conf_dir = self.workdir / "reader.conf.d"
        self.log_path = self.workdir / "pcscd.log"
        self.vpcd_port = 0
        self.process: subprocess.Popen[bytes] | None = None

    # --- what clients need ---------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd" / "pcscd.comm"

    @property
    def env(self) -> dict[str, str]:
        """Environment additions for any PC/SC client of this daemon."""
        return {"PCSCLITE_CSOCK_NAME": str(self.socket_path)}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A full environment for a child process (``subprocess.Popen(env=...)``)."""
        env = dict(os.environ if base is None else base)
        env.update(self.env)
        return env

    @property
    def reader_name(self) -> str:
        """The PC/SC name of the reader the virtual card plugs into (slot 0)."""
        return self.slot_reader_name(0)

    def slot_reader_name(self, slot: int) -> str:
        """Reader name of vpcd slot 0 or 1 (ports P and P+1)."""
        if slot not in (0, 1):
            raise ValueError("vpcd has slots 0 and 1")
        return f"{self.friendly_name} 00 {slot:02d}"

    def vpcd_endpoint(self, slot: int = 0) -> str:
        """``HOST:PORT`` for ``cms card virtual --vpcd`` (slot 0 or 1)."""
        if slot not in (0, 1):
            raise ValueError("vpcd has slots 0 and 1")
        return f"127.0.0.1:{self.vpcd_port + slot}"

    # --- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> PrivatePcscd:
        reason = unavailable_reason()
        if reason:
            raise PcscUnavailable(reason)
        last_error = ""
        for _attempt in range(3):
            if not self.vpcd_port:  # a restart keeps its port: cards reconnect there
                self.vpcd_port = free_port_pair()
            self._write_config()
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except PcscUnavailable as exc:  # e.g. lost a race for the port
                last_error = str(exc)
                self.stop()
                self.vpcd_port = 0
        raise PcscUnavailable(f"private pcscd did not start: {last_error}")

    def _write_config(self) -> None:
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.conf_dir / "vpcd").write_text(
            f'FRIENDLYNAME "{self.friendly_name}"\n'
            f"DEVICENAME   /dev/null:0x{self.vpcd_port:04X}\n"
            f"LIBPATH      {VPCD_DRIVER}\n"
            f"CHANNELID    0x{self.vpcd_port:04X}\n")

    def _spawn(self) -> None:
        pcscd = shutil.which("pcscd") or "/usr/sbin/pcscd"
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        log = open(self.log_path, "wb")  # handed to the child, closed here
        try:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 _MOUNT_AND_RUN, "pcscd-private", str(self.run_dir), pcscd,
                 str(self.conf_dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise PcscUnavailable(f"pcscd exited ({self.process.returncode}): "
                                      + self.log_tail())
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if "Could not initialize connection to virtual ICC" in log:
                raise PcscUnavailable("vpcd could not listen on its port")
            if self.socket_path.exists() and "daemon ready" in log:
                return
            time.sleep(0.05)
        raise PcscUnavailable("timed out waiting for pcscd: " + self.log_tail())

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self) -> None:
        """Stop and start again on the same port and socket path."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PrivatePcscd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # --- in-process client helpers (pyscard) -------------------------------------

    def use_in_this_process(self) -> None:
        """Point this process's PC/SC client library at this daemon.

        Must happen before the first PC/SC call of the process.
        """
        current = os.environ.get("PCSCLITE_CSOCK_NAME")
        if current and current != str(self.socket_path):
            raise PcscUnavailable("this process already uses another pcscd socket")
        os.environ.update(self.env)

    def readers(self) -> list[str]:
        from smartcard.Exceptions import ListReadersException
        from smartcard.System import readers

        try:
            return [str(r) for r in readers()]
        except ListReadersException:
            return []

    def wait_for_reader(self, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.reader_name in self.readers():
                return self.reader_name
            time.sleep(0.05)
        raise PcscUnavailable(f"reader {self.reader_name!r} did not appear: {self.log_tail()}")

    def card_present(self, slot: int = 0) -> bool:
        from smartcard.scard import (
            SCARD_S_SUCCESS,
            SCARD_SCOPE_USER,
            SCARD_STATE_PRESENT,
            SCARD_STATE_UNAWARE,
            SCardEstablishContext,
            SCardGetStatusChange,
            SCardReleaseContext,
        )

        rc, ctx = SCardEstablishContext(SCARD_SCOPE_USER)
        if rc != SCARD_S_SUCCESS:
            return False
        try:
            rc, states = SCardGetStatusChange(
                ctx, 0, [(self.slot_reader_name(slot), SCARD_STATE_UNAWARE)])
            if rc != SCARD_S_SUCCESS:
                return False
            return bool(states[0][1] & SCARD_STATE_PRESENT)
        finally:
            SCardReleaseContext(ctx)

    def wait_for_card(self, present: bool = True, timeout: float = 10.0, *,
                      slot: int = 0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.card_present(slot) == present:
                return
            time.sleep(0.05)
        state = "inserted" if present else "removed"
        raise TimeoutError(f"card not {state} in {self.slot_reader_name(slot)!r} "
                           f"after {timeout} s")

    def connect(self, timeout: float = 10.0, *, slot: int = 0) -> Any:
        """A connected pyscard ``CardConnection`` to the card (waits for the card)."""
        from smartcard.System import readers

        self.wait_for_card(True, timeout, slot=slot)
        name = self.slot_reader_name(slot)
        reader = next(r for r in readers() if str(r) == name)
        conn = reader.createConnection()
        conn.connect()
        return conn


def transmit_fn(connection: Any) -> Callable[[bytes], bytes]:
    """``transmit(apdu bytes) -> response bytes`` over a pyscard connection."""
    def transmit(apdu: bytes) -> bytes:
        data, sw1, sw2 = connection.transmit(list(apdu))
        return bytes(data) + bytes((sw1, sw2))

    return transmit
