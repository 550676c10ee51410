"""SoftHSM2 tokens for tests, directly or through ``p11-kit server``."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

from deploy.softhsm import SoftHsm, find_module

P11KIT_START_TIMEOUT_S = 10.0


def make_softhsm(directory: Path, tokens: Iterable[str] = ("access", "kms")) -> SoftHsm:
    """SoftHSM2 rooted at ``directory`` with the given tokens (PINs in 0600 files)."""
    hsm = SoftHsm(directory).ensure()
    for label in tokens:
        hsm.init_token(label)
    return hsm


class P11KitServer:
    """``p11-kit server`` exposing SoftHSM2 tokens on a unix socket.

    The server forks one ``p11-kit-remote`` per client connection; ``kill``
    ends the whole process group (server and connections), which is what a
    network HSM restarting looks like to a client. ``start`` again serves on
    the same socket path, so clients configured with ``env()`` reconnect.
    """

    def __init__(self, hsm: SoftHsm, tokens: Iterable[str], socket: Path):
        self.hsm = hsm
        self.tokens = tuple(tokens)
        self.socket = socket
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"unix:path={self.socket}"

    def env(self) -> dict[str, str]:
        """Environment for a process that loads p11-kit-client.so."""
        return {"P11_KIT_SERVER_ADDRESS": self.address}

    def start(self) -> P11KitServer:
        self.socket.unlink(missing_ok=True)
        args = ["p11-kit", "server", "--foreground", "--provider", find_module(),
                "--name", str(self.socket), *[f"pkcs11:token={t}" for t in self.tokens]]
        self.process = subprocess.Popen(
            args, env={**os.environ, **self.hsm.env()}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + P11KIT_START_TIMEOUT_S
        while not self.socket.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"p11-kit server exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("p11-kit server did not create its socket")
            time.sleep(0.02)
        return self

    def kill(self) -> None:
        """SIGKILL the server and every connection it forked (its process group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> P11KitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


__all__ = ["P11KitServer", "SoftHsm", "find_module", "make_softhsm"]
