"""`cms dev up/down/status`: the embedded default stack, run as real processes."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cms.runtime.client import load_endpoints
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
            "custodian-1", "custodian-2", "custodian-3"}
        for files in doc["tls"]["identities"].values():
            for path in (files["cert"], files["key"]):
                assert Path(path).is_absolute() and Path(path).is_file()

        tokens = cms("hsm", "--endpoints", str(endpoints_path), "tokens").stdout
        assert "access" in tokens and "kms" in tokens

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
