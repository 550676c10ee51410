"""The audit log of a real run: honest log verifies; every kind of tampering is named."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cms.v1 import hsm_pb2 as pb
from hsm_proxy.audit import canonical, record_hash
from tests.hsm_proxy.helpers import TIMEOUT, label_ref, rpc_error, template, unique
from tests.support.hsm_proxy import REPO, ProxyEnv, ProxyProcess

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Run:
    env: ProxyEnv
    exit_code: int | None
    records: int
    digest: bytes


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A proxy that served a mix of allowed, denied and failed calls, then got SIGTERM."""
    env = ProxyEnv.create(tmp_path_factory.mktemp("audit"))
    proxy = ProxyProcess(env).start()
    try:
        hsm = proxy.hsm("access-server")
        label = unique("ops/audited-ec")
        hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
            token="access", algorithm=pb.EC_P256, template=template(label, pb.SIGN)),
            timeout=TIMEOUT)
        digest = hashlib.sha256(b"audited message").digest()
        for _ in range(3):
            hsm.Sign(pb.SignRequest(key=label_ref(label), mechanism=pb.ECDSA, data=digest),
                     timeout=TIMEOUT)
        hsm.SignBatch(pb.SignBatchRequest(items=[
            pb.SignRequest(key=label_ref(label), mechanism=pb.ECDSA, data=digest)] * 50),
            timeout=TIMEOUT)
        rpc_error(proxy.hsm("admin").Sign, pb.SignRequest(key=label_ref(label),
                                                          mechanism=pb.ECDSA, data=digest))
        rpc_error(hsm.Sign, pb.SignRequest(key=label_ref("ops/missing"), mechanism=pb.ECDSA,
                                           data=digest))
    finally:
        code = proxy.stop()
    lines = env.audit_path.read_text().splitlines()
    return Run(env, code, len(lines), digest)


def _verify(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cms.cli", "audit", "verify", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


@pytest.fixture
def copy(run: Run, tmp_path: Path) -> Path:
    """A private copy of the log and its head, to tamper with."""
    target = tmp_path / "hsm-proxy.jsonl"
    shutil.copy(run.env.audit_path, target)
    shutil.copy(run.env.audit_path.with_name(run.env.audit_path.name + ".head"),
                target.with_name(target.name + ".head"))
    return target


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_sigterm_exits_cleanly_and_writes_the_head(run):
    assert run.exit_code == 0
    head = json.loads(run.env.audit_path.with_name("hsm-proxy.jsonl.head").read_text())
    last = json.loads(_lines(run.env.audit_path)[-1])
    assert head["seq"] == last["seq"] == run.records and head["hash"] == last["hash"]
    assert not run.env.ready_path.exists()


def test_honest_log_verifies(run):
    result = _verify(run.env.audit_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK: {run.records} records" in result.stdout


def test_records_describe_calls_without_secrets(run):
    records = [json.loads(line) for line in _lines(run.env.audit_path)]
    outcomes = {(r["operation"], r["outcome"], r["code"]) for r in records}
    assert ("SignBatch", "ok", "OK") in outcomes
    assert ("Sign", "denied", "PERMISSION_DENIED") in outcomes
    assert ("Sign", "error", "NOT_FOUND") in outcomes
    batch = next(r for r in records if r["operation"] == "SignBatch")
    assert batch["items"] == 50 and len(batch["keys"]) == 1 and batch["identity"] == "access-server"
    text = run.env.audit_path.read_text() + run.env.log_path.read_text()
    for secret in (run.env.pin("access"), run.env.pin("kms")):
        assert secret not in text
    assert run.digest.hex() not in text


def test_edited_record_is_detected(copy):
    lines = _lines(copy)
    record = json.loads(lines[2])
    record["identity"] = "someone-else"
    lines[2] = canonical(record).decode()
    _write(copy, lines)
    result = _verify(copy)
    assert result.returncode == 1
    assert "edited: record seq 3" in result.stdout


def test_edited_record_with_recomputed_hash_breaks_the_chain(copy):
    lines = _lines(copy)
    record = json.loads(lines[2])
    record["outcome"] = "denied"
    record["hash"] = record_hash(record)
    lines[2] = canonical(record).decode()
    _write(copy, lines)
    result = _verify(copy)
    assert result.returncode == 1
    assert "edited" in result.stdout and "seq 4" in result.stdout


def test_deleted_record_is_detected(copy):
    lines = _lines(copy)
    del lines[3]
    _write(copy, lines)
    result = _verify(copy)
    assert result.returncode == 1
    assert "deleted: record(s) seq 4 missing" in result.stdout


def test_inserted_record_is_detected(copy):
    lines = _lines(copy)
    # A forged record that links correctly and takes seq 3's place.
    forged = json.loads(lines[2])
    forged["operation"] = "DestroyKey"
    forged["hash"] = record_hash(forged)
    lines.insert(2, canonical(forged).decode())
    _write(copy, lines)
    result = _verify(copy)
    assert result.returncode == 1
    assert "inserted: record seq 3 appears twice" in result.stdout


def test_reordered_records_are_detected(copy):
    lines = _lines(copy)
    lines[3], lines[4] = lines[4], lines[3]
    _write(copy, lines)
    result = _verify(copy)
    assert result.returncode == 1
    assert "reordered" in result.stdout


def test_truncated_tail_is_detected(copy, run):
    _write(copy, _lines(copy)[:-2])
    result = _verify(copy)
    assert result.returncode == 1
    assert f"truncated: the head records seq {run.records}" in result.stdout


def test_record_cut_in_the_middle_is_detected(copy):
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) - 40])
    result = _verify(copy)
    assert result.returncode == 1
    assert "truncated" in result.stdout


def test_missing_or_unreadable_log_is_a_clear_error(tmp_path):
    result = _verify(tmp_path / "nothing.jsonl")
    assert result.returncode == 2
    assert "no audit log at" in result.stderr and "Traceback" not in result.stderr
    result = _verify(tmp_path)
    assert result.returncode == 2
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr


def test_a_restarted_proxy_continues_the_chain(run, tmp_path):
    proxy = ProxyProcess(run.env).start()
    try:
        proxy.hsm("access-server").GenerateRandom(pb.GenerateRandomRequest(
            token="access", length=4), timeout=TIMEOUT)
    finally:
        assert proxy.stop() == 0
    lines = _lines(run.env.audit_path)
    assert json.loads(lines[-1])["seq"] == len(lines) > run.records
    result = _verify(run.env.audit_path)
    assert result.returncode == 0, result.stdout
