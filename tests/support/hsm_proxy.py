"""A real hsm_proxy for tests: configuration, process, and per-identity clients.

Typical use (module-scoped, one proxy shared by a test module)::

    env = ProxyEnv.create(tmp_path_factory.mktemp("proxy"))
    with ProxyProcess(env) as proxy:
        hsm = proxy.hsm("access-server")          # cms.v1.Hsm stub over mTLS
        hsm.Sign(...)

``ProxyEnv`` makes the PKI, the SoftHSM2 tokens, the policy and the YAML
configuration (exactly the schema the launcher writes); ``ProxyProcess`` runs
``python -m cms.cli hsm-proxy serve`` with a ready file and waits until the
health of ``cms.v1.Hsm`` is SERVING. The process log is kept in
``env.directory / "proxy.log"`` and its tail is shown when start-up fails.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cms.runtime.tls import TlsFiles, secure_channel
from cms.v1 import hsm_pb2_grpc
from deploy.pki import CUSTODIANS, DEFAULT_IDENTITIES, Pki
from deploy.softhsm import SoftHsm, find_module
from tests.support.pki import make_pki
from tests.support.softhsm import make_softhsm

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
HSM_SERVICE = "cms.v1.Hsm"

# Identities of the test PKI: the standard ones plus a known-nothing "stranger".
TEST_IDENTITIES = (*DEFAULT_IDENTITIES, "stranger", "auditor")


def default_policy() -> dict[str, Any]:
    """A policy with one identity per privilege shape tests care about."""
    return {
        "identities": {
            # Everything on every token (operations tests).
            "access-server": [{"operations": ["*"], "tokens": ["*"], "keys": ["*"]}],
            # Only keys under kms/ on the kms token, and no destruction.
            "key-mgmt": [
                {"operations": ["GenerateSecretKey", "GenerateKeyPair", "GetKeyAttributes",
                                "Sign", "SignBatch", "Verify", "ListKeys", "GetPublicKey",
                                "DeriveKey", "Encrypt"],
                 "tokens": ["kms"], "keys": ["kms/*"]},
            ],
            # Custodians enter ceremony components (KeyBlocks), nothing else.
            **{c: [{"operations": ["AddComponent", "GetCeremony"], "tokens": ["*"],
                    "keys": ["*"]}] for c in CUSTODIANS},
            # Read-only inspection everywhere, signing only demo keys.
            "admin": [
                {"operations": ["ListTokens", "ListKeys", "GetKeyAttributes", "GetPublicKey",
                                "GenerateRandom"], "tokens": ["*"], "keys": ["*"]},
                {"operations": ["*"], "tokens": ["*"], "keys": ["demo/*"]},
            ],
            # Known to the policy, allowed nothing useful.
            "auditor": [{"operations": ["ListTokens"], "tokens": ["access"], "keys": ["*"]}],
        }
    }


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class ProxyEnv:
    """Everything a proxy needs, in one directory."""

    directory: Path
    pki: Pki
    hsm: SoftHsm
    tokens: tuple[str, ...] = ("access", "kms")
    policy: dict[str, Any] = field(default_factory=default_policy)
    workers: int = 2
    module: str = field(default_factory=find_module)
    pkcs11_env: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, *, tokens: Iterable[str] = ("access", "kms"),
               identities: Iterable[str] = TEST_IDENTITIES,
               policy: dict[str, Any] | None = None, workers: int = 2,
               overrides: dict[str, Any] | None = None) -> ProxyEnv:
        directory = Path(directory).resolve()
        tokens = tuple(tokens)
        pki = make_pki(directory / "pki", identities)
        hsm = make_softhsm(directory / "softhsm", tokens)
        env = cls(directory, pki, hsm, tokens, policy or default_policy(), workers,
                  overrides=overrides or {})
        env.pkcs11_env = hsm.env()
        return env

    @property
    def config_path(self) -> Path:
        return self.directory / "hsm-proxy.yaml"

    @property
    def policy_path(self) -> Path:
        return self.directory / "policy.yaml"

    @property
    def audit_path(self) -> Path:
        return self.directory / "audit" / "hsm-proxy.jsonl"

    @property
    def ready_path(self) -> Path:
        return self.directory / "hsm-proxy.ready"

    @property
    def log_path(self) -> Path:
        return self.directory / "proxy.log"

    def tls(self, identity: str) -> TlsFiles:
        files = self.pki.identity(identity)
        return TlsFiles(self.pki.ca, files.cert, files.key)

    def pin(self, token: str) -> str:
        return self.hsm.pin_file(token).read_text().strip()

    def config(self) -> dict[str, Any]:
        proxy = self.pki.identity("hsm-proxy")
        base = {
            "server": {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0",
                       "max_workers": 32},
            "tls": {"ca": str(self.pki.ca), "cert": str(proxy.cert), "key": str(proxy.key)},
            "pkcs11": {
                "module": self.module,
                "env": dict(self.pkcs11_env),
                "workers": self.workers,
                "tokens": [{"label": t, "pin_file": str(self.hsm.pin_file(t)),
                            "so_pin_file": str(self.hsm.so_pin_file(t))}
                           for t in self.tokens],
            },
            "policy": str(self.policy_path),
            "audit": {"file": str(self.audit_path)},
            "handles": {"ttl_seconds": 300, "max_per_identity": 10000},
            "limits": {"max_batch_items": 4096, "max_data_bytes": 65536},
            "log": {"level": "info", "file": None},
        }
        return _merge(base, self.overrides)

    def write(self) -> Path:
        self.policy_path.write_text(yaml.safe_dump(self.policy, sort_keys=False))
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_path


class ProxyProcess:
    """``cms hsm-proxy serve`` as a child process, with clients per identity."""

    def __init__(self, env: ProxyEnv):
        self.env = env
        self.process: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}
        self._channels: dict[str, grpc.Channel] = {}

    # -- lifecycle -------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S, *, wait_serving: bool = True
              ) -> ProxyProcess:
        config = self.env.write()
        ready = self.env.ready_path
        ready.unlink(missing_ok=True)
        with self.env.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cms.cli", "hsm-proxy", "serve", "--config", str(config),
                 "--ready-file", str(ready)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"hsm-proxy exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"hsm-proxy wrote no ready file:\n{self.log_tail()}")
            time.sleep(0.05)
        self.info = json.loads(ready.read_text())
        if wait_serving:
            self.wait_health("SERVING", max(1.0, deadline - time.monotonic()))
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Signal the proxy and wait; returns its exit status (None if it was not running)."""
        self.close_channels()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.process.returncode
        self.process = None
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()
        self.kill()

    # -- facts ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return self.info["grpc"]

    @property
    def metrics_url(self) -> str:
        return self.info["metrics"]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def worker_pids(self) -> list[int]:
        """PIDs of the proxy's PKCS#11 worker processes (its Python children)."""
        pids: set[int] = set()
        # Children are listed under the thread that started them (workers are
        # restarted by the proxy's monitor thread), so every thread is read.
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                pids.update(int(p) for p in (task / "children").read_text().split())
            except OSError:
                continue
        out = []
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"multiprocessing" in cmdline and b"spawn_main" in cmdline:
                out.append(pid)
        return sorted(out)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.env.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as resp:  # noqa: S310
            return resp.read().decode()

    def metric(self, name: str, **labels: str) -> float | None:
        """Value of one sample from /metrics (None if absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in self.metrics().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            sample, value = line.rsplit(" ", 1)
            sname, _, rest = sample.partition("{")
            if sname != name:
                continue
            got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
            if got == want:
                return float(value)
        return None

    # -- clients ---------------------------------------------------------------------------
    def channel(self, identity: str) -> grpc.Channel:
        if identity not in self._channels:
            self._channels[identity] = secure_channel(self.address, self.env.tls(identity))
        return self._channels[identity]

    def hsm(self, identity: str) -> hsm_pb2_grpc.HsmStub:
        return hsm_pb2_grpc.HsmStub(self.channel(identity))

    def health(self, service: str = HSM_SERVICE, identity: str = "admin",
               timeout: float = 5.0) -> str | None:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel(identity)).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_health(self, status: str, timeout: float = 30.0,
                    service: str = HSM_SERVICE) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"hsm-proxy exited:\n{self.log_tail()}")
            last = self.health(service)
            if last == status:
                return
            time.sleep(0.05)
        raise TimeoutError(f"health of {service} stayed {last}, not {status}:\n"
                           f"{self.log_tail()}")

    def close_channels(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def write_endpoints(path: Path, proxy: ProxyProcess) -> Path:
    """An endpoints.json (as ``cms dev up`` writes it) naming this proxy."""
    pki = proxy.env.pki
    data = {
        "services": {"hsm_proxy": {"grpc": proxy.address, "metrics": proxy.metrics_url}},
        "tls": {"ca": str(pki.ca),
                "identities": {n: f.as_dict() for n, f in sorted(pki.identities.items())}},
        "dir": str(proxy.env.directory),
    }
    path.write_text(json.dumps(data, indent=2))
    return path
