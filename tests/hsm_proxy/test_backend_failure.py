"""The HSM goes away under load and comes back: clean errors, no wrong results, recovery.

SoftHSM2 is served through ``p11-kit server`` and the proxy loads
p11-kit-client.so, so killing the server (and the connections it forked) is
what a network HSM restart looks like to the proxy. Client threads keep
signing throughout, with deadlines; every returned signature is verified.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from cryptography.exceptions import InvalidSignature

from cms.v1 import hsm_pb2 as pb
from deploy.softhsm import find_p11kit_client
from tests.hsm_proxy.helpers import (
    TIMEOUT,
    handle_ref,
    label_ref,
    public_key,
    rpc_error,
    template,
    verify_ecdsa,
)
from tests.support.hsm_proxy import ProxyEnv, ProxyProcess
from tests.support.softhsm import P11KitServer

pytestmark = pytest.mark.integration

CALL_DEADLINE = 5.0
CLIENT_THREADS = 4
WAIT = 60.0
LABEL = "demo/under-load"


@dataclass
class Load:
    """Signing clients running until stopped; outcomes tallied by phase."""

    phase: str = "before"
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: Counter = field(default_factory=Counter)
    wrong: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, code: str) -> None:
        with self.lock:
            self.outcomes[(self.phase, code)] += 1

    def successes(self, phase: str) -> int:
        with self.lock:
            return self.outcomes[(phase, "OK")]

    def codes(self) -> set[str]:
        with self.lock:
            return {code for _, code in self.outcomes}


def _client(proxy: ProxyProcess, public, load: Load, worker: int) -> None:
    hsm = proxy.hsm("access-server")
    n = 0
    while not load.stop.is_set():
        n += 1
        digest = hashlib.sha256(f"{worker}-{n}".encode()).digest()
        try:
            if n % 2:
                sigs = [hsm.Sign(pb.SignRequest(key=label_ref(LABEL), mechanism=pb.ECDSA,
                                                data=digest), timeout=CALL_DEADLINE).signature]
            else:
                reply = hsm.SignBatch(pb.SignBatchRequest(items=[pb.SignRequest(
                    key=label_ref(LABEL), mechanism=pb.ECDSA, data=digest)] * 8),
                    timeout=CALL_DEADLINE)
                if any(r.WhichOneof("result") != "signature" for r in reply.results):
                    load.count("ITEM_ERROR")
                    continue
                sigs = [r.signature for r in reply.results]
        except grpc.RpcError as exc:
            load.count(exc.code().name)
            time.sleep(0.01)
            continue
        for sig in sigs:
            try:
                verify_ecdsa(public, sig, digest, prehashed=True)
            except InvalidSignature:
                with load.lock:
                    load.wrong += 1
        load.count("OK")


def _wait_for(predicate, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@pytest.fixture
def remote(tmp_path) -> Iterator[tuple[ProxyEnv, P11KitServer]]:
    env = ProxyEnv.create(tmp_path, overrides={"pkcs11": {
        "probe_interval_seconds": 0.2, "max_backoff_seconds": 0.5}})
    server = P11KitServer(env.hsm, env.tokens, tmp_path / "p11kit.sock").start()
    env.module = find_p11kit_client()
    env.pkcs11_env = server.env()
    try:
        yield env, server
    finally:
        server.kill()


def test_backend_restart_under_load(remote):
    env, server = remote
    with ProxyProcess(env) as proxy:
        hsm = proxy.hsm("access-server")
        hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
            token="access", algorithm=pb.EC_P256, template=template(LABEL, pb.SIGN)),
            timeout=TIMEOUT)
        public = public_key(hsm, label_ref(LABEL))
        session = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
            token="access", algorithm=pb.AES_128,
            template=template("demo/session", pb.SIGN, session=True)), timeout=TIMEOUT)
        proxy_pid = proxy.pid

        load = Load()
        threads = [threading.Thread(target=_client, args=(proxy, public, load, i), daemon=True)
                   for i in range(CLIENT_THREADS)]
        for t in threads:
            t.start()
        try:
            _wait_for(lambda: load.successes("before") >= 20, "no successes before the failure")

            load.phase = "down"
            server.kill()
            _wait_for(lambda: load.outcomes[("down", "UNAVAILABLE")] >= 5,
                      "no UNAVAILABLE while the backend was down")
            proxy.wait_health("NOT_SERVING", WAIT)
            tokens = hsm.ListTokens(pb.ListTokensRequest(), timeout=TIMEOUT).tokens
            assert {t.label for t in tokens} == {"access", "kms"}
            assert not any(t.available for t in tokens)

            load.phase = "restarted"
            server.start()
            proxy.wait_health("SERVING", WAIT)
            _wait_for(lambda: load.successes("restarted") >= 20,
                      "no successes after the backend came back")
        finally:
            load.stop.set()
            for t in threads:
                t.join(CALL_DEADLINE * 3)

        assert load.wrong == 0
        assert load.codes() <= {"OK", "UNAVAILABLE"}, load.outcomes
        assert proxy.alive() and proxy.pid == proxy_pid
        err = rpc_error(hsm.Sign, pb.SignRequest(key=handle_ref(session.ref.handle),
                                                 mechanism=pb.AES_CMAC, data=b"x"))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "handle expired (backend restarted)" in err.details()
        assert sum(proxy.metric("cms_hsm_backend_resets_total", worker=str(w)) or 0
                   for w in range(env.workers)) >= 1
        # Health turns SERVING with the first worker back; the others follow.
        _wait_for(lambda: proxy.metric("cms_hsm_workers_up") == env.workers + 1,
                  "not every worker came back up")
