"""Worker crashes, handle expiry and quotas, and start-up errors an operator can act on."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import yaml
from cryptography.exceptions import InvalidSignature

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import (
    TIMEOUT,
    handle_ref,
    kcv,
    label_ref,
    public_key,
    rpc_error,
    template,
    unique,
    verify_ecdsa,
)
from tests.support.hsm_proxy import REPO, ProxyEnv, ProxyProcess

pytestmark = pytest.mark.integration

MAX_HANDLES = 6
WAIT = 60.0
HUNG_AFTER = 2.0


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[ProxyProcess]:
    env = ProxyEnv.create(tmp_path_factory.mktemp("lifecycle"), overrides={
        "handles": {"ttl_seconds": 300, "max_per_identity": MAX_HANDLES},
        "pkcs11": {"probe_interval_seconds": 0.2, "call_timeout_seconds": HUNG_AFTER}})
    with ProxyProcess(env) as running:
        yield running


def _session_key(hsm, label: str = "demo/s") -> pb.KeyInfo:
    return hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(label, pb.SIGN, session=True)),
        timeout=TIMEOUT)


def _restarts(proxy: ProxyProcess) -> float:
    return sum(proxy.metric("cms_hsm_worker_restarts_total", worker=w) or 0 for w in ("0", "1"))


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_a_crashed_worker_is_replaced_and_its_handles_expire(proxy):
    hsm = proxy.hsm("access-server")
    label = unique("demo/crash")
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(label, pb.SIGN)),
        timeout=TIMEOUT)
    public = public_key(hsm, label_ref(label))
    handles = [_session_key(hsm).ref.handle for _ in range(MAX_HANDLES)]
    assert len({h.split(".")[0] for h in handles}) == 2  # spread over both workers
    before = proxy.worker_pids()
    assert len(before) == 3                              # 2 workers and the officer
    restarts_before = _restarts(proxy)

    stop = threading.Event()
    outcomes: Counter = Counter()
    wrong = 0

    def sign_loop() -> None:
        nonlocal wrong
        n = 0
        while not stop.is_set():
            n += 1
            digest = hashlib.sha256(str(n).encode()).digest()
            try:
                reply = hsm.SignBatch(pb.SignBatchRequest(items=[pb.SignRequest(
                    key=label_ref(label), mechanism=pb.ECDSA, data=digest)] * 32), timeout=5)
            except grpc.RpcError as exc:
                outcomes[exc.code().name] += 1
                continue
            for r in reply.results:
                try:
                    verify_ecdsa(public, r.signature, digest, prehashed=True)
                except InvalidSignature:
                    wrong += 1
            outcomes["OK"] += 1

    thread = threading.Thread(target=sign_loop, daemon=True)
    thread.start()
    try:
        _wait_for(lambda: outcomes["OK"] >= 5, "no successes before the crash")
        os.kill(before[0], signal.SIGKILL)
        _wait_for(lambda: len(pids := proxy.worker_pids()) == 3 and before[0] not in pids,
                  "the worker was not replaced")
        proxy.wait_health("SERVING", WAIT)
        seen = outcomes["OK"]
        _wait_for(lambda: outcomes["OK"] >= seen + 5, "no successes after the restart")
    finally:
        stop.set()
        thread.join(15)
    assert wrong == 0
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert before[1] in proxy.worker_pids()
    assert _restarts(proxy) == restarts_before + 1
    expired = 0
    for handle in handles:
        try:
            hsm.Sign(pb.SignRequest(key=handle_ref(handle), mechanism=pb.AES_CMAC, data=b"x"),
                     timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "handle expired (backend restarted)" in exc.details()
            expired += 1
    assert 0 < expired < len(handles)
    hsm.ReleaseHandles(pb.ReleaseHandlesRequest(handles=handles), timeout=TIMEOUT)


def test_a_hung_worker_is_killed_and_its_calls_run_elsewhere(proxy):
    """A worker stuck inside the module (here: stopped) is killed after the call
    timeout; idempotent calls it held are answered by the other worker."""
    hsm = proxy.hsm("access-server")
    label = unique("demo/hang")
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(label, pb.SIGN)),
        timeout=TIMEOUT)
    public = public_key(hsm, label_ref(label))
    before = proxy.worker_pids()
    os.kill(before[0], signal.SIGSTOP)
    try:
        futures = [hsm.Sign.future(pb.SignRequest(key=label_ref(label), mechanism=pb.ECDSA,
                                                  data=bytes([i]) * 32), timeout=WAIT)
                   for i in range(8)]
        for i, future in enumerate(futures):
            verify_ecdsa(public, future.result().signature, bytes([i]) * 32, prehashed=True)
        _wait_for(lambda: len(pids := proxy.worker_pids()) == 3 and before[0] not in pids,
                  "the hung worker was not replaced")
    finally:
        try:
            os.kill(before[0], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "worker silent past the call timeout" in proxy.log_tail(200)
    proxy.wait_health("SERVING", WAIT)


def test_handle_quota_per_identity(proxy):
    admin = proxy.hsm("admin")
    made = [_session_key(admin).ref.handle for _ in range(MAX_HANDLES)]
    err = rpc_error(admin.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template("demo/s", pb.SIGN,
                                                                session=True)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'admin'" in err.details()
    # Another identity is not affected by admin's quota.
    other = _session_key(proxy.hsm("access-server"))
    assert admin.ReleaseHandles(pb.ReleaseHandlesRequest(handles=made[:1]),
                                timeout=TIMEOUT).released == 1
    again = _session_key(admin)
    assert again.ref.handle
    assert proxy.metric("cms_hsm_handles_live", kind="key") >= MAX_HANDLES + 1
    admin.ReleaseHandles(pb.ReleaseHandlesRequest(handles=[*made[1:], again.ref.handle]),
                         timeout=TIMEOUT)
    proxy.hsm("access-server").ReleaseHandles(pb.ReleaseHandlesRequest(
        handles=[other.ref.handle]), timeout=TIMEOUT)


def test_a_derive_batch_over_the_quota_fails_whole_and_holds_no_handle(proxy):
    base = template(unique("demo/derive-base"), pb.DERIVE)
    admin = proxy.hsm("admin")
    admin.GenerateSecretKey(pb.GenerateSecretKeyRequest(token="access", algorithm=pb.AES_128,
                                                        template=base), timeout=TIMEOUT)
    items = [pb.DeriveKeyRequest(base_key=label_ref(base.label),
                                 mechanism=pb.AES_ECB_ENCRYPT_DATA,
                                 data=bytes([i]) * 16, algorithm=pb.AES_128,
                                 template=template("demo/d", pb.ENCRYPT, session=True))
             for i in range(MAX_HANDLES + 1)]
    err = rpc_error(admin.DeriveKeyBatch, pb.DeriveKeyBatchRequest(items=items))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'admin'" in err.details()
    # The handles reserved for the items before were given back: the whole quota is free.
    made = [_session_key(admin).ref.handle for _ in range(MAX_HANDLES)]
    assert admin.ReleaseHandles(pb.ReleaseHandlesRequest(handles=made),
                                timeout=TIMEOUT).released == MAX_HANDLES


def test_handles_expire_after_their_ttl(tmp_path):
    env = ProxyEnv.create(tmp_path, overrides={"handles": {"ttl_seconds": 1}})
    with ProxyProcess(env) as proxy:
        hsm = proxy.hsm("access-server")
        info = _session_key(hsm)
        assert info.expires.seconds > 0

        def expired() -> bool:
            try:
                hsm.Sign(pb.SignRequest(key=handle_ref(info.ref.handle), mechanism=pb.AES_CMAC,
                                        data=b"x"), timeout=TIMEOUT)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                assert "expired (TTL 1 s)" in exc.details()
                return True
            return False

        _wait_for(expired, "the handle did not expire")
        _wait_for(lambda: proxy.metric("cms_hsm_handles_live", kind="key") == 0,
                  "the expired handle is still counted")


def test_a_key_ceremony_outlives_the_handle_ttl_until_its_own(tmp_path):
    """Custodians may come one after the other: a ceremony lives for
    handles.ceremony_ttl_seconds, not for the TTL of a contact's handles."""
    from cms.v1 import key_blocks_pb2 as bpb
    from cms.v1 import key_blocks_pb2_grpc

    env = ProxyEnv.create(tmp_path, overrides={
        "handles": {"ttl_seconds": 1, "ceremony_ttl_seconds": 4}})
    with ProxyProcess(env) as proxy:
        hsm = proxy.hsm("access-server")
        first, second = os.urandom(16), os.urandom(16)

        def begin() -> bpb.ComponentCeremony:
            return key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel("access-server")).BeginCeremony(
                bpb.BeginCeremonyRequest(role=pb.TRANSPORT_KEY, label=unique("transport/ttl"),
                                         algorithm=pb.AES_128, components=2, source_token="kms",
                                         target_token="access"), timeout=TIMEOUT)

        def add(custodian: str, ceremony_id: str, part: bytes) -> bpb.ComponentCeremony:
            return key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel(custodian)).AddComponent(
                bpb.AddComponentRequest(ceremony_id=ceremony_id, component=part, kcv=kcv(part)),
                timeout=TIMEOUT)

        begun = begin()
        add("custodian-1", begun.ceremony_id, first)
        key = _session_key(hsm)
        time.sleep(1.5)                                   # past the ordinary TTL
        with pytest.raises(grpc.RpcError) as gone:
            hsm.Sign(pb.SignRequest(key=handle_ref(key.ref.handle), mechanism=pb.AES_CMAC,
                                    data=b"x"), timeout=TIMEOUT)
        assert "expired (TTL 1 s)" in gone.value.details()
        done = add("custodian-2", begun.ceremony_id, second)
        assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED

        # ... and it does end at its own TTL.
        late = begin()
        time.sleep(4.5)
        with pytest.raises(grpc.RpcError) as expired:
            add("custodian-1", late.ceremony_id, first)
        assert expired.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "expired (TTL 4 s)" in expired.value.details()


def _serve(config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cms.cli", "hsm-proxy", "serve", "--config",
                           str(config)], capture_output=True, text=True, cwd=REPO, timeout=60,
                          check=False)


def test_start_up_errors_are_one_clear_line(tmp_path):
    result = _serve(tmp_path / "missing.yaml")
    assert result.returncode == 1 and "cannot read configuration" in result.stderr
    assert "Traceback" not in result.stderr
    env = ProxyEnv.create(tmp_path / "env")
    config = env.config()
    del config["pkcs11"]["tokens"][0]["pin_file"]
    path = tmp_path / "no-pin.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _serve(path)
    assert result.returncode == 1
    assert "pkcs11.tokens[0]: give exactly one of pin_file and pin_env" in result.stderr
    env.policy = {"identities": {"admin": [{"operations": ["Sing"], "tokens": ["*"],
                                            "keys": ["*"]}]}}
    result = _serve(env.write())
    assert result.returncode == 1 and "unknown operation(s) Sing" in result.stderr
    env.policy = {"identities": {}}
    env.hsm.pin_file("kms").chmod(0)
    try:
        if os.geteuid() != 0:  # root reads any file; the check below needs a missing one
            result = _serve(env.write())
            assert result.returncode == 1 and "user PIN of token 'kms'" in result.stderr
        env.overrides = {"pkcs11": {"tokens": [{"label": "kms", "pin_env": "NO_SUCH_PIN_VAR"}]}}
        result = _serve(env.write())
        assert result.returncode == 1 and "NO_SUCH_PIN_VAR is not set" in result.stderr
    finally:
        env.hsm.pin_file("kms").chmod(0o600)
    assert "Traceback" not in result.stderr
