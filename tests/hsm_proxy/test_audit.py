"""The audit log of a real run: honest log verifies; every kind of tampering is named.

The chain catches edits, deletions, insertions and reordering; the signed head
(checkpoints signed by the audit key in the proxy's token) catches a cut tail
with a rewritten, unsigned, foreign or stale head, and a head of another log.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cms import keynames
from cms.v1 import hsm_pb2 as pb
from deploy.softhsm import find_p11kit_client
from hsm_proxy.audit import GENESIS, canonical, key_fingerprint, record_hash, signed_bytes
from tests.hsm_proxy.helpers import TIMEOUT, label_ref, rpc_error, template, unique
from tests.support.hsm_proxy import REPO, ProxyEnv, ProxyProcess
from tests.support.softhsm import P11KitServer
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

INTERVAL = 0.2
WAIT_S = 30.0
AUDIT_KEY = keynames.AUDIT_KEY


@dataclass(frozen=True)
class Run:
    env: ProxyEnv
    exit_code: int | None
    records: int
    digest: bytes
    early_head: dict[str, Any]
    idle_growth: int


def _head_file(path: Path) -> Path:
    return path.with_name(path.name + ".head")


def _pem_file(path: Path) -> Path:
    return path.with_name(path.name + ".pub.pem")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _wait_for_checkpoint(path: Path, covering: int) -> dict[str, Any]:
    """The first interval checkpoint record covering record ``covering`` or later."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for rec in _records(path):
            cp = rec.get("checkpoint")
            if cp and cp["reason"] == "interval" and cp["seq"] >= covering:
                return rec
        time.sleep(0.05)
    raise TimeoutError(f"no interval checkpoint covering seq {covering} within {WAIT_S}s")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A proxy that served a mix of allowed, denied and failed calls, checkpointed at a
    short interval, idled, served more calls, then got SIGTERM."""
    env = ProxyEnv.create(tmp_path_factory.mktemp("audit"),
                          overrides={"audit": {"checkpoint_interval_seconds": INTERVAL}})
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
        last_call = max(r["seq"] for r in _records(env.audit_path)
                        if r["operation"] != "AuditCheckpoint")
        checkpoint = _wait_for_checkpoint(env.audit_path, last_call)
        early_head = json.loads(_head_file(env.audit_path).read_text())
        assert early_head == checkpoint["checkpoint"]
        # Idle for several intervals: with no new record, no checkpoint is added.
        before = len(_records(env.audit_path))
        time.sleep(INTERVAL * 6)
        idle_growth = len(_records(env.audit_path)) - before
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
    return Run(env, code, len(lines), digest, early_head, idle_growth)


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    """Another proxy (its own tokens, so its own audit key and log), keeping its audit
    key in the second token, running."""
    env = ProxyEnv.create(tmp_path_factory.mktemp("audit-other"),
                          overrides={"audit": {"token": "kms"}})
    with ProxyProcess(env) as proxy:
        yield proxy


def _verify(path: Path, *extra: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cms.cli", "audit", "verify", str(path),
                           *map(str, extra)],
                          capture_output=True, text=True, cwd=REPO, timeout=60, check=False)


def _failed(result: subprocess.CompletedProcess, *words: str) -> str:
    """The one FAILED line of a failed verification, checked to contain ``words``."""
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 1, result.stdout
    for word in words:
        assert word in failed[0], failed[0]
    return failed[0]


@pytest.fixture
def copy(run: Run, tmp_path: Path) -> Path:
    """A private copy of the log, its head and its public key, to tamper with."""
    target = tmp_path / "hsm-proxy.jsonl"
    shutil.copy(run.env.audit_path, target)
    shutil.copy(_head_file(run.env.audit_path), _head_file(target))
    shutil.copy(_pem_file(run.env.audit_path), _pem_file(target))
    return target


@pytest.fixture
def pinned(run: Run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's pinned copy of the audit public key, away from the log."""
    target = tmp_path_factory.mktemp("pinned") / "audit-key.pem"
    shutil.copy(_pem_file(run.env.audit_path), target)
    return target


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    _write(path, [canonical(r).decode() for r in records])


def _rechain(records: list[dict[str, Any]]) -> None:
    """Recompute every prev and hash, as someone who can rewrite the whole file can."""
    prev = GENESIS
    for rec in records:
        rec["prev"] = prev
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]


def _software_sign(key: ec.EllipticCurvePrivateKey, head: dict[str, Any]) -> dict[str, Any]:
    """``head`` signed with a key outside any HSM (r||s in hex, as the proxy writes it)."""
    r, s = decode_dss_signature(key.sign(signed_bytes(head), ec.ECDSA(hashes.SHA256())))
    return {**head, "signature": (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()}


def _fingerprint(key: ec.EllipticCurvePrivateKey) -> str:
    return key_fingerprint(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


def _cut_and_rehead(path: Path, keep: int, **changes: Any) -> dict[str, Any]:
    """Cut the log to its first ``keep`` records and rewrite the head to point at the new
    last record (seq and hash re-computed; ``changes`` applied on top)."""
    records = _records(path)[:keep]
    _write_records(path, records)
    head = json.loads(_head_file(path).read_text())
    head.update(seq=records[-1]["seq"], hash=records[-1]["hash"], **changes)
    _head_file(path).write_text(json.dumps(head))
    return head


# ---------------------------------------------------------------------------
# An honest run

def test_sigterm_exits_cleanly_and_writes_a_signed_head(run):
    assert run.exit_code == 0
    head = json.loads(_head_file(run.env.audit_path).read_text())
    records = _records(run.env.audit_path)
    last = records[-1]
    assert last["operation"] == "AuditCheckpoint" and last["checkpoint"] == head
    assert head["reason"] == "shutdown" and head["seq"] == run.records - 1
    assert head["hash"] == records[-2]["hash"] and len(bytes.fromhex(head["signature"])) == 64
    assert head["log_id"] == records[0]["log_id"] and records[0]["operation"] == "AuditGenesis"
    assert head["key"] == AUDIT_KEY and head["token"] == "access"  # the first token
    assert not run.env.ready_path.exists()


def test_checkpoints_come_at_the_interval_when_records_were_added_and_at_shutdown(run):
    records = _records(run.env.audit_path)
    checkpoints = [r for r in records if r["operation"] == "AuditCheckpoint"]
    reasons = [r["checkpoint"]["reason"] for r in checkpoints]
    assert reasons[0] == "start" and reasons[-1] == "shutdown" and "interval" in reasons
    assert checkpoints[0]["seq"] == 2 and checkpoints[0]["checkpoint"]["seq"] == 1
    for rec in checkpoints:
        covered = rec["checkpoint"]["seq"]
        assert covered < rec["seq"] and records[covered - 1]["hash"] == rec["checkpoint"]["hash"]
        assert rec["identity"] is None and rec["keys"] == [AUDIT_KEY]
    assert run.idle_growth == 0


def test_honest_log_verifies_with_the_key_beside_it_and_says_what_that_is_worth(run):
    result = _verify(run.env.audit_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK: {run.records} records" in result.stdout
    assert "proves nothing against someone who can rewrite the directory" in result.stdout


def test_a_genuine_log_verifies_offline_with_the_pinned_public_key(copy, pinned):
    _pem_file(copy).unlink()
    result = _verify(copy, "--public-key", pinned)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "signed checkpoint(s), signed head at seq" in result.stdout
    assert "proves nothing" not in result.stdout


def test_records_describe_calls_without_secrets(run):
    records = _records(run.env.audit_path)
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


def _strings(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, path)
    elif isinstance(value, str):
        yield path, value


# Long hex strings the log and head may hold: hashes, the log id, the signature and
# the fingerprint of the public key. Anything else that long and hex is suspect.
HEX_FIELDS = {"hash", "prev", "log_id", "checkpoint.hash", "checkpoint.log_id",
              "checkpoint.signature", "checkpoint.key_fingerprint", "signature",
              "key_fingerprint"}


def test_no_key_material_in_the_log_the_head_or_the_public_key_file(run):
    head = json.loads(_head_file(run.env.audit_path).read_text())
    for item in [*_records(run.env.audit_path), head]:
        for where, text in _strings(item):
            if re.search(r"[0-9a-fA-F]{32,}", text):
                assert where in HEX_FIELDS, (where, text)
    pem = _pem_file(run.env.audit_path).read_text()
    assert pem.startswith("-----BEGIN PUBLIC KEY-----") and "PRIVATE" not in pem
    public = serialization.load_pem_public_key(pem.encode())
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert head["key_fingerprint"] == key_fingerprint(public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))


# ---------------------------------------------------------------------------
# The chain

def test_edited_record_is_detected(copy):
    lines = _lines(copy)
    record = json.loads(lines[2])
    record["identity"] = "someone-else"
    lines[2] = canonical(record).decode()
    _write(copy, lines)
    _failed(_verify(copy), "edited: record seq 3")


def test_edited_record_with_recomputed_hash_breaks_the_chain(copy):
    lines = _lines(copy)
    record = json.loads(lines[2])
    record["outcome"] = "denied"
    record["hash"] = record_hash(record)
    lines[2] = canonical(record).decode()
    _write(copy, lines)
    _failed(_verify(copy), "edited", "seq 4")


def test_deleted_record_is_detected(copy):
    lines = _lines(copy)
    del lines[3]
    _write(copy, lines)
    _failed(_verify(copy), "deleted: record(s) seq 4 missing")


def test_inserted_record_is_detected(copy):
    lines = _lines(copy)
    # A forged record that links correctly and takes seq 3's place.
    forged = json.loads(lines[2])
    forged["operation"] = "DestroyKey"
    forged["hash"] = record_hash(forged)
    lines.insert(2, canonical(forged).decode())
    _write(copy, lines)
    _failed(_verify(copy), "inserted: record seq 3 appears twice")


def test_reordered_records_are_detected(copy):
    lines = _lines(copy)
    lines[3], lines[4] = lines[4], lines[3]
    _write(copy, lines)
    _failed(_verify(copy), "reordered")


def test_record_cut_in_the_middle_is_detected(copy):
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) - 40])
    _failed(_verify(copy), "truncated")


def test_a_chain_rebuilt_without_its_genesis_is_detected(copy):
    records = _records(copy)[1:]
    for seq, rec in enumerate(records, start=1):
        rec["seq"] = seq
    _rechain(records)
    _write_records(copy, records)
    _failed(_verify(copy), "no genesis record")


def test_missing_or_unreadable_log_is_a_clear_error(tmp_path):
    result = _verify(tmp_path / "nothing.jsonl")
    assert result.returncode == 2
    assert "no audit log at" in result.stderr and "Traceback" not in result.stderr
    result = _verify(tmp_path)
    assert result.returncode == 2
    assert "is a directory" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# The tail: truncation and the signed head

def test_a_truncated_tail_under_the_genuine_head_is_detected(copy, run):
    _write(copy, _lines(copy)[:-2])
    _failed(_verify(copy), f"truncated: the head records seq {run.records - 1}")


def test_a_deleted_head_fails(copy, pinned):
    _head_file(copy).unlink()
    _failed(_verify(copy, "--public-key", pinned), "no head file")


def test_truncation_with_a_rehashed_unsigned_head_fails(copy, pinned):
    records = _records(copy)[:-3]
    _write_records(copy, records)
    _head_file(copy).write_text(json.dumps({"seq": records[-1]["seq"],
                                            "hash": records[-1]["hash"]}))
    _failed(_verify(copy, "--public-key", pinned), "the head is unsigned")
    head = json.loads(_head_file(copy).read_text())
    assert head == {"seq": records[-1]["seq"], "hash": records[-1]["hash"]}


def test_truncation_with_a_rehashed_head_keeping_the_old_signature_fails(copy, pinned):
    _cut_and_rehead(copy, -3)
    _failed(_verify(copy, "--public-key", pinned), "the head: the signature does not verify")


def test_truncation_with_a_head_signed_by_another_key_fails(copy, pinned):
    forger = ec.generate_private_key(ec.SECP256R1())
    head = _cut_and_rehead(copy, -3, key_fingerprint=_fingerprint(forger))
    _head_file(copy).write_text(json.dumps(_software_sign(forger, head)))
    _failed(_verify(copy, "--public-key", pinned), "the head is signed by another key")
    # Claiming the genuine key's fingerprint does not help: the signature is checked.
    head["key_fingerprint"] = json.loads(_lines(copy)[1])["checkpoint"]["key_fingerprint"]
    _head_file(copy).write_text(json.dumps(_software_sign(forger, head)))
    _failed(_verify(copy, "--public-key", pinned), "the signature does not verify")


def test_a_directory_rewritten_under_another_key_fails_against_the_pinned_key(copy, pinned):
    """Whoever rewrites the log, its head and the public key beside it can re-sign all of
    it with a key of their own: only the pinned copy of the real key shows it."""
    forger = ec.generate_private_key(ec.SECP256R1())
    records = _records(copy)[:-3]
    for rec in records:
        if rec["operation"] == "AuditCheckpoint":
            head = {**rec["checkpoint"], "key_fingerprint": _fingerprint(forger)}
            head["hash"] = records[head["seq"] - 1]["hash"]
            rec["checkpoint"] = _software_sign(forger, head)
        rec["hash"] = record_hash(rec)  # re-hashed in order: checkpoints sign new hashes
        if rec["seq"] < len(records):
            records[rec["seq"]]["prev"] = rec["hash"]
    last = records[-1]
    head = {**records[1]["checkpoint"], "seq": last["seq"], "hash": last["hash"],
            "reason": "shutdown"}
    _write_records(copy, records)
    _head_file(copy).write_text(json.dumps(_software_sign(forger, head)))
    _pem_file(copy).write_bytes(forger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    unpinned = _verify(copy)
    assert unpinned.returncode == 0, unpinned.stdout
    assert "proves nothing against someone who can rewrite the directory" in unpinned.stdout
    _failed(_verify(copy, "--public-key", pinned),
            "checkpoint record seq 2 is signed by another key")


def test_a_stale_head_fails(copy, pinned, run):
    _head_file(copy).write_text(json.dumps(run.early_head))
    _failed(_verify(copy, "--public-key", pinned), "stale head",
            f"past the head's seq {run.early_head['seq']}")


def test_rolling_back_to_an_earlier_checkpoint_is_seen_only_against_an_anchor(copy, pinned, run,
                                                                              tmp_path):
    """The limit of offline checking (docs/threat-model.md): cut the log right after a
    genuine checkpoint and put that checkpoint's head back, and the log looks like one
    whose proxy is still running. A head kept elsewhere (--anchor) shows the cut."""
    final_head = tmp_path / "final.head"
    shutil.copy(_head_file(copy), final_head)
    records = _records(copy)
    at = next(r["seq"] for r in records if r.get("checkpoint") == run.early_head)
    _write_records(copy, records[:at])
    _head_file(copy).write_text(json.dumps(run.early_head))
    rolled_back = _verify(copy, "--public-key", pinned)
    assert rolled_back.returncode == 0, rolled_back.stdout
    assert "not a shutdown one" in rolled_back.stdout and "--anchor" in rolled_back.stdout
    _failed(_verify(copy, "--public-key", pinned, "--anchor", final_head),
            f"truncated: the log ends at seq {at}, before the anchored head")


def test_a_genuine_log_reaches_its_anchor(copy, pinned, run, tmp_path):
    early = tmp_path / "early.head"
    early.write_text(json.dumps(run.early_head))
    result = _verify(copy, "--public-key", pinned, "--anchor", early)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_head_from_another_log_fails(copy, other):
    shutil.copy(_head_file(other.env.audit_path), _head_file(copy))
    _failed(_verify(copy), "the head belongs to another log")


def test_a_malformed_head_or_public_key_is_a_clear_failure(copy, tmp_path):
    _head_file(copy).write_text("{not json")
    _failed(_verify(copy), "is not JSON")
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello")
    result = _verify(copy, "--public-key", not_a_key)
    assert result.returncode == 2 and "is not a PEM public key" in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------
# The audit key

def test_the_audit_key_is_generated_in_the_configured_token_with_its_class(other):
    info = other.hsm("admin").GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=label_ref(AUDIT_KEY, "kms"), key_class=pb.PRIVATE_KEY), timeout=TIMEOUT)
    assert info.role == pb.AUDIT_KEY and info.origin == pb.GENERATED and not info.conformance
    assert info.algorithm == pb.EC_P256 and list(info.usages) == [pb.SIGN]
    assert info.sensitive and not info.extractable and info.never_extractable and info.local
    assert not info.modifiable and not info.copyable
    public = other.hsm("admin").GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=label_ref(AUDIT_KEY, "kms"), key_class=pb.PUBLIC_KEY), timeout=TIMEOUT)
    assert list(public.usages) == [pb.VERIFY]
    head = json.loads(_head_file(other.env.audit_path).read_text())
    assert head["token"] == "kms" and head["reason"] == "start"
    der = other.hsm("admin").GetPublicKey(pb.GetPublicKeyRequest(
        key=label_ref(AUDIT_KEY, "kms")), timeout=TIMEOUT).public_key_der
    assert head["key_fingerprint"] == key_fingerprint(der)


def test_no_caller_can_sign_with_or_destroy_the_audit_key(other):
    hsm = other.hsm("access-server")  # the test policy grants it every operation
    for call, request in (
            (hsm.Sign, pb.SignRequest(key=label_ref(AUDIT_KEY, "kms"),
                                      mechanism=pb.ECDSA_SHA256, data=b"a forged head")),
            (hsm.SignBatch, pb.SignBatchRequest(items=[pb.SignRequest(
                key=label_ref(AUDIT_KEY, "kms"), mechanism=pb.ECDSA, data=bytes(32))])),
            (hsm.DestroyKey, pb.DestroyKeyRequest(key=label_ref(AUDIT_KEY, "kms"))),
            (hsm.GenerateKeyPair, pb.GenerateKeyPairRequest(
                token="access", algorithm=pb.EC_P256,
                template=template("audit/another", pb.SIGN)))):
        err = rpc_error(call, request)
        assert err.code().name == "PERMISSION_DENIED", (call, err.details())
        assert "audit-key" in err.details()


def _serve(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cms.cli", "hsm-proxy", "serve", "--config",
                           str(config)], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False)


def test_an_audit_token_that_is_not_configured_is_refused(tmp_path, run):
    config = run.env.config()
    config["audit"]["token"] = "nope"
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _serve(path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "audit.token: 'nope' is not a configured token (pkcs11.tokens: access, kms)" \
        in result.stderr


def test_an_audit_key_planted_outside_the_proxy_stops_its_start(tmp_path):
    env = ProxyEnv.create(tmp_path, workers=1)
    RawToken(env.hsm, "access").create_aes(AUDIT_KEY, bytes(16), ["SIGN"], fixed=True)
    with pytest.raises(RuntimeError) as failed:
        ProxyProcess(env).start()
    assert f"audit: audit key '{AUDIT_KEY}' on token 'access' does not match its class" \
        in str(failed.value)
    assert not _head_file(env.audit_path).exists()


def test_an_hsm_down_at_start_delays_the_start_checkpoint_until_it_is_back(tmp_path):
    env = ProxyEnv.create(tmp_path, workers=1, overrides={
        "audit": {"checkpoint_interval_seconds": INTERVAL},
        "pkcs11": {"probe_interval_seconds": 0.2, "max_backoff_seconds": 0.5}})
    server = P11KitServer(env.hsm, env.tokens, tmp_path / "p11kit.sock")
    env.module = find_p11kit_client()
    env.pkcs11_env = server.env()
    proxy = ProxyProcess(env)
    try:
        proxy.start(wait_serving=False)
        assert proxy.health() == "NOT_SERVING"
        assert [r["operation"] for r in _records(env.audit_path)] == ["AuditGenesis"]
        assert not _head_file(env.audit_path).exists()
        server.start()
        proxy.wait_health("SERVING", WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while not _head_file(env.audit_path).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.stop() == 0
    finally:
        proxy.kill()
        server.kill()
    records = _records(env.audit_path)
    checkpoints = [r["checkpoint"] for r in records if r["operation"] == "AuditCheckpoint"]
    assert checkpoints[0]["reason"] == "start" and checkpoints[0]["seq"] == 1
    assert checkpoints[-1]["reason"] == "shutdown"
    result = _verify(env.audit_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------
# Restarts (these change the run's log: they come last)

def test_a_restarted_proxy_continues_the_chain_with_a_new_checkpoint(run, pinned):
    before = len(_lines(run.env.audit_path))
    proxy = ProxyProcess(run.env).start()
    try:
        proxy.hsm("access-server").GenerateRandom(pb.GenerateRandomRequest(
            token="access", length=4), timeout=TIMEOUT)
    finally:
        assert proxy.stop() == 0
    records = _records(run.env.audit_path)
    assert records[-1]["seq"] == len(records) > before
    restart = records[before]
    assert restart["operation"] == "AuditCheckpoint"
    assert restart["checkpoint"]["reason"] == "start"
    assert restart["checkpoint"]["seq"] == before  # covers the previous run's last record
    after = records[before + 1:]
    assert after[0]["operation"] == "GenerateRandom"
    assert all(r["operation"] == "AuditCheckpoint" for r in after[1:])
    assert after[-1]["checkpoint"]["reason"] == "shutdown"
    assert len({r["checkpoint"]["log_id"] for r in records if "checkpoint" in r}) == 1
    result = _verify(run.env.audit_path, "--public-key", pinned)
    assert result.returncode == 0, result.stdout


def test_a_log_shorter_than_its_head_is_refused_at_start(run):
    saved = run.env.audit_path.read_bytes()
    try:
        _write(run.env.audit_path, _lines(run.env.audit_path)[:-2])
        with pytest.raises(RuntimeError) as failed:
            ProxyProcess(run.env).start()
        assert "records were removed" in str(failed.value)
    finally:
        run.env.audit_path.write_bytes(saved)


def test_a_public_key_file_of_another_key_stops_the_start(run):
    pem = _pem_file(run.env.audit_path)
    saved = pem.read_bytes()
    try:
        pem.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        with pytest.raises(RuntimeError) as failed:
            ProxyProcess(run.env).start()
        assert "holds another public key than the audit key" in str(failed.value)
    finally:
        pem.write_bytes(saved)


def test_a_head_of_a_new_log_under_the_same_key_does_not_fit_the_old_one(run, pinned, tmp_path):
    old = tmp_path / "old.jsonl"
    shutil.move(run.env.audit_path, old)
    shutil.move(_head_file(run.env.audit_path), _head_file(old))
    proxy = ProxyProcess(run.env).start()
    assert proxy.stop() == 0
    new = _records(run.env.audit_path)
    assert new[0]["operation"] == "AuditGenesis" and new[0]["log_id"] != _records(old)[0]["log_id"]
    assert _verify(old, "--public-key", pinned).returncode == 0
    shutil.copy(_head_file(run.env.audit_path), _head_file(old))
    _failed(_verify(old, "--public-key", pinned), "the head belongs to another log")
