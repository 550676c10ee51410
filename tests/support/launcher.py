"""Run the local launcher (`cms dev ...`) as an operator would, in a test's directory."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CMS = [sys.executable, "-m", "cms.cli"]
COMMAND_TIMEOUT_S = 120


def cms(*args: str, check: bool = True, env: dict[str, str] | None = None,
        umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run one `cms` command (with ``umask`` if given); failures show its output."""
    done = subprocess.run([*CMS, *args], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, env=env, check=False,
                          umask=-1 if umask is None else umask)
    if check and done.returncode != 0:
        raise AssertionError(f"cms {' '.join(args)} exited {done.returncode}\n"
                             f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}")
    return done


def endpoints(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "endpoints.json").read_text())


@contextmanager
def dev_stack(directory: Path, *up_args: str, umask: int | None = None) -> Iterator[Path]:
    """`cms dev up` in ``directory``; `cms dev down` afterwards, whatever happened."""
    try:
        cms("dev", "up", "--dir", str(directory), *up_args, umask=umask)
        yield directory / "endpoints.json"
    finally:
        cms("dev", "down", "--dir", str(directory), check=False)
