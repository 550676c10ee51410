"""`cms dev up/down/status`: the embedded default stack, run as real processes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cms.runtime.client import load_endpoints
from deploy.local import PRIVATE_DIRS
from tests.support.launcher import cms, dev_stack, endpoints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SERVICE_NAMES = {"hsm_proxy": "cms.v1.Hsm", "access_server": "cms.v1.PsdRegistry"}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _pids(directory: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in (directory / "run").glob("*.pid")}


def _health(endpoints_path: Path, service: str, grpc_name: str) -> int:
    ep = load_endpoints(endpoints_path)
    with ep.channel(service, "admin") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=grpc_name), timeout=10)
    return reply.status


def test_up_creates_the_stack_serves_and_down_stops_it(tmp_path: Path) -> None:
    with dev_stack(tmp_path) as endpoints_path:
        doc = endpoints(tmp_path)
        # The documented shape, with absolute paths only.
        assert set(doc) >= {"services", "tls"}
        assert set(doc["services"]) >= set(SERVICE_NAMES)
        for name, entry in doc["services"].items():
            host, _, port = entry["grpc"].rpartition(":")
            assert host == "127.0.0.1" and int(port) > 0, name
            assert entry["metrics"].startswith("http://127.0.0.1:")
            assert entry["metrics"].endswith("/metrics")
        assert Path(doc["tls"]["ca"]).is_absolute() and Path(doc["tls"]["ca"]).is_file()
        assert set(doc["tls"]["identities"]) == {
            "hsm-proxy", "access-server", "key-mgmt", "card-agent", "admin",
            "custodian-1", "custodian-2", "custodian-3", "provider", "bureau", "mailer"}
        for files in doc["tls"]["identities"].values():
            for path in (files["cert"], files["key"]):
                assert Path(path).is_absolute() and Path(path).is_file()

        tokens = cms("hsm", "--endpoints", str(endpoints_path), "tokens").stdout
        assert "access" in tokens and "kms" in tokens
        assert "provider" in tokens and "issuer" in tokens
        assert "bureau" in tokens and "mailer" in tokens

        for service, grpc_name in SERVICE_NAMES.items():
            assert _health(endpoints_path, service, grpc_name) == \
                health_pb2.HealthCheckResponse.SERVING

        status = cms("dev", "status", "--dir", str(tmp_path)).stdout
        assert "hsm_proxy" in status
        pids = _pids(tmp_path)
        assert pids and all(_pid_alive(pid) for pid in pids.values())

    # dev_stack ran `down`: every process it started is gone.
    assert all(not _pid_alive(pid) for pid in pids.values())
    with pytest.raises(grpc.RpcError):
        _health(endpoints_path, "hsm_proxy", "cms.v1.Hsm")


def test_second_up_is_idempotent_and_reuses_tokens_and_keys(tmp_path: Path) -> None:
    with dev_stack(tmp_path) as endpoints_path:
        ep = str(endpoints_path)
        cms("hsm", "--endpoints", ep, "generate", "--token", "access",
            "--label", "demo/kept", "--algorithm", "ec-p256")
        public_before = cms("hsm", "--endpoints", ep, "public-key",
                            "--token", "access", "--label", "demo/kept").stdout
        pids = _pids(tmp_path)

        cms("dev", "up", "--dir", str(tmp_path))           # up again while running
        assert _pids(tmp_path) == pids                     # nothing restarted

    address_before = endpoints(tmp_path)["services"]["hsm_proxy"]["grpc"]
    with dev_stack(tmp_path):                              # up after down
        # Same port (clients keep their endpoints.json), same tokens and keys.
        assert endpoints(tmp_path)["services"]["hsm_proxy"]["grpc"] == address_before
        public_after = cms("hsm", "--endpoints", ep, "public-key",
                           "--token", "access", "--label", "demo/kept").stdout
        assert public_after == public_before


def test_up_restarts_a_service_that_died(tmp_path: Path) -> None:
    with dev_stack(tmp_path) as endpoints_path:
        pid = _pids(tmp_path)["hsm_proxy"]
        os.kill(pid, 9)
        cms("dev", "up", "--dir", str(tmp_path))
        new_pid = _pids(tmp_path)["hsm_proxy"]
        assert new_pid != pid and _pid_alive(new_pid)
        assert _health(endpoints_path, "hsm_proxy", "cms.v1.Hsm") == \
            health_pb2.HealthCheckResponse.SERVING


def test_down_without_up_status_of_nothing_and_a_bad_directory_are_clear(
        tmp_path: Path) -> None:
    down = cms("dev", "down", "--dir", str(tmp_path), check=False)
    assert down.returncode == 0 and "nothing was running" in down.stdout
    status = cms("dev", "status", "--dir", str(tmp_path), check=False)
    assert status.returncode == 3                      # LSB: not running
    blocker = tmp_path / "file"
    blocker.write_text("")
    bad = cms("dev", "up", "--dir", str(blocker / "stack"), check=False)
    assert bad.returncode != 0
    assert "cannot use" in bad.stderr and "Traceback" not in bad.stderr


def test_dev_up_refuses_an_access_database_url_it_cannot_use(tmp_path: Path) -> None:
    done = cms("dev", "up", "--dir", str(tmp_path), "--access-database",
                   "mysql://x@y/z", check=False)
    assert done.returncode == 1
    assert "--access-database: expected sqlite:///PATH or postgresql" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "config" / "access-database.url").exists()


def _modes(directory: Path) -> dict[str, int]:
    """Mode of each private directory of the stack and of everything under it."""
    modes = {}
    for name in PRIVATE_DIRS:
        for path in [directory / name, *sorted((directory / name).rglob("*"))]:
            modes[str(path.relative_to(directory))] = stat.S_IMODE(path.lstat().st_mode)
    modes["endpoints.json"] = stat.S_IMODE((directory / "endpoints.json").stat().st_mode)
    return modes


def _not_private(modes: dict[str, int], directory: Path) -> dict[str, str]:
    return {name: oct(mode) for name, mode in modes.items()
            if mode != (0o700 if (directory / name).is_dir() else 0o600)}


def test_databases_logs_audit_and_run_state_are_the_owners_only(tmp_path: Path) -> None:
    """Under umask 000 (every default would be world-writable), `cms dev up` leaves every
    file under config/, run/, logs/, audit/ and data/ 0600 and the directories 0700,
    SQLite's -wal and -shm files included; what was widened later, the next `up` tightens."""
    with dev_stack(tmp_path, umask=0o000) as endpoints_path:
        ep = str(endpoints_path)
        cms("hsm", "--endpoints", ep, "tokens")                      # audited by the proxy
        cms("psd", "--endpoints", ep, "register", "00112233445566778899")   # a registry write
        modes = _modes(tmp_path)
        for name in ("data/access.db", "data/access.db-wal", "data/access.db-shm",
                     "data/key-mgmt.db", "logs/access_server.log", "logs/hsm_proxy.log",
                     "audit/hsm-proxy.jsonl", "run/ports.json", "run/access_server.ready",
                     "run/access_server.pid", "config/policy.yaml",
                     "config/access_server.yaml"):
            assert name in modes, f"{name} missing: {sorted(modes)}"
        assert _not_private(modes, tmp_path) == {}

        # Widened on purpose, as a run before owner-only files left them.
        os.chmod(tmp_path / "data" / "access.db", 0o644)
        os.chmod(tmp_path / "data" / "access.db-wal", 0o666)  # noqa: S103
        os.chmod(tmp_path / "logs", 0o755)  # noqa: S103
        os.chmod(tmp_path / "audit" / "hsm-proxy.jsonl", 0o644)
        os.chmod(tmp_path / "run" / "ports.json", 0o644)
        cms("dev", "up", "--dir", str(tmp_path), umask=0o000)       # services still running
        assert _not_private(_modes(tmp_path), tmp_path) == {}
