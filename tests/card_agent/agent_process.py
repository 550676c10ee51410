"""Running ``cms card-agent`` as a real subprocess and reading what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from deploy.pki import Pki

REPO = Path(__file__).resolve().parents[2]
AGENT_CMD = (sys.executable, "-m", "cms.cli", "card-agent")
RUN_TIMEOUT_S = 90


def agent_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CMS_DEBUG", None)
    env.update(extra)
    return env


def tls_args(pki: Pki, address: str) -> list[str]:
    ident = pki.identity("card-agent")
    return ["--server", address, "--ca", str(pki.ca), "--cert", str(ident.cert),
            "--key", str(ident.key)]


def run_agent(args: list[str], *, env: dict[str, str] | None = None,
              timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT_CMD, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env or agent_env(), check=False)


def json_lines(stderr: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


class AgentProcess:
    """A running agent whose stderr is collected line by line while it runs."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([*AGENT_CMD, *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=REPO,
                                     env=env or agent_env())
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = ""
        self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._out_reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for_log(self, message: str, timeout: float = 60, *, count: int = 1) -> dict:
        """The ``count``-th JSON log entry whose msg is ``message`` (waits for it)."""
        def find() -> dict | None:
            seen = [e for e in json_lines("\n".join(self.lines)) if e.get("msg") == message]
            return seen[count - 1] if len(seen) >= count else None

        with self._cond:
            self._cond.wait_for(
                lambda: find() is not None or self.proc.poll() is not None, timeout)
            entry = find()
        if entry is None:
            raise AssertionError(f"agent never logged {message!r} ({count}x):\n" + self.stderr)
        return entry

    def finish(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._reader.join(10)
        self._out_reader.join(10)
        return self.proc.returncode

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        with self._cond:
            return "\n".join(self.lines)
