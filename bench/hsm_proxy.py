"""Benchmark: ECDSA P-256 signatures per second, direct and through the proxy.

    .venv/bin/python bench/hsm_proxy.py --seconds 5

Measured in one run on one token with one key, each for ``--seconds``:

- ``direct``: python-pkcs11 on SoftHSM2 in one process (the ceiling of one
  core); measured before and after the proxy runs, the mean is reported;
- ``p11kit_remote``: the same token through ``p11-kit server`` and
  p11-kit-client.so, one process (a remote PKCS#11 call per signature);
- ``proxy_unary``: Sign RPCs over mutual TLS on loopback, concurrent clients;
- ``proxy_batch``: SignBatch RPCs, concurrent clients, each on its own channel.

Prints one JSON object with the rates and the ratios ``proxy_batch/direct``
and ``proxy_batch/p11kit_remote``. It sets up its own PKI and SoftHSM2 token
in a temporary directory. Not a test: the numbers depend on the machine and
on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOKEN = "bench"
LABEL = "bench/ec-p256"
DIGEST = hashlib.sha256(b"benchmark").digest()
UNARY_CLIENTS = 8
BATCH_CLIENTS = 4
BATCH_SIZE = 1024
SIGNS_PER_CHECK = 64


# ---------------------------------------------------------------------------
# One-process PKCS#11 loop (run as a child, so this process never loads PKCS#11)

def _pkcs11_loop(module: str, pin_file: str, seconds: float) -> dict[str, Any]:
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    lib = pkcs11.lib(module)
    token = lib.get_token(token_label=TOKEN)
    with token.open(user_pin=Path(pin_file).read_text().strip()) as session:
        key = next(session.get_objects({Attribute.LABEL: LABEL,
                                        Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        key.sign(DIGEST, mechanism=Mechanism.ECDSA)  # warm up
        count = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            for _ in range(SIGNS_PER_CHECK):
                key.sign(DIGEST, mechanism=Mechanism.ECDSA)
            count += SIGNS_PER_CHECK
            now = time.perf_counter()
            if now >= end:
                break
    return {"signs": count, "seconds": now - start}


def _child(module: str, pin_file: str, seconds: float, env: dict[str, str]) -> float:
    result = subprocess.run(
        [sys.executable, __file__, "--pkcs11-loop", module, pin_file, str(seconds)],
        env={**os.environ, **env}, capture_output=True, text=True, check=True,
        timeout=seconds * 10 + 60)
    data = json.loads(result.stdout)
    return data["signs"] / data["seconds"]


# ---------------------------------------------------------------------------
# gRPC clients

def _run_clients(n: int, seconds: float, work) -> float:
    """Run ``work(stop) -> signatures`` in ``n`` threads for ``seconds``; signs per second."""
    stop = threading.Event()
    totals = [0] * n
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            totals[i] = work(stop)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return sum(totals) / elapsed


def _proxy_unary(proxy, seconds: float) -> float:
    from cms.runtime.tls import secure_channel
    from cms.v1 import hsm_pb2 as pb
    from cms.v1 import hsm_pb2_grpc

    request = pb.SignRequest(key=pb.KeyRef(token=TOKEN, label=LABEL), mechanism=pb.ECDSA,
                             data=DIGEST)

    def work(stop: threading.Event) -> int:
        channel = secure_channel(proxy.address, proxy.env.tls("access-server"))
        stub = hsm_pb2_grpc.HsmStub(channel)
        count = 0
        while not stop.is_set():
            stub.Sign(request, timeout=30)
            count += 1
        channel.close()
        return count

    return _run_clients(UNARY_CLIENTS, seconds, work)


def _proxy_batch(proxy, seconds: float, public) -> float:
    from cms.runtime.tls import secure_channel
    from cms.v1 import hsm_pb2 as pb
    from cms.v1 import hsm_pb2_grpc

    item = pb.SignRequest(key=pb.KeyRef(token=TOKEN, label=LABEL), mechanism=pb.ECDSA,
                          data=DIGEST)
    request = pb.SignBatchRequest(items=[item] * BATCH_SIZE)

    def work(stop: threading.Event) -> int:
        channel = secure_channel(proxy.address, proxy.env.tls("access-server"))
        stub = hsm_pb2_grpc.HsmStub(channel)
        count = 0
        checked = False
        while not stop.is_set():
            reply = stub.SignBatch(request, timeout=60)
            results = reply.results
            good = sum(1 for r in results if r.signature)
            if good != len(results):
                raise RuntimeError(f"{len(results) - good} signatures failed in a batch")
            if not checked:
                _verify(public, results[0].signature)
                checked = True
            count += good
        channel.close()
        return count

    return _run_clients(BATCH_CLIENTS, seconds, work)


def _verify(public, signature: bytes) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    public.verify(der, DIGEST, ec.ECDSA(Prehashed(hashes.SHA256())))


# ---------------------------------------------------------------------------

def run(seconds: float) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    from cms.v1 import hsm_pb2 as pb
    from deploy.softhsm import find_p11kit_client
    from tests.support.hsm_proxy import ProxyEnv, ProxyProcess, default_policy
    from tests.support.softhsm import P11KitServer

    with tempfile.TemporaryDirectory(prefix="cms-bench-") as tmp:
        directory = Path(tmp)
        env = ProxyEnv.create(directory, tokens=(TOKEN,), policy=default_policy(),
                              overrides={"log": {"level": "warning"}})
        pin_file = str(env.hsm.pin_file(TOKEN))
        module = env.module
        results: dict[str, Any] = {"seconds_each": seconds, "cpus": os.cpu_count(),
                                   "batch_size": BATCH_SIZE, "batch_clients": BATCH_CLIENTS,
                                   "unary_clients": UNARY_CLIENTS, "proxy_workers": env.workers}
        with ProxyProcess(env) as proxy:
            hsm = proxy.hsm("access-server")
            hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
                token=TOKEN, algorithm=pb.EC_P256,
                template=pb.KeyTemplate(label=LABEL, usages=[pb.SIGN])), timeout=60)
            public = serialization.load_der_public_key(hsm.GetPublicKey(pb.GetPublicKeyRequest(
                key=pb.KeyRef(token=TOKEN, label=LABEL)), timeout=30).public_key_der)
            proxy.close_channels()

            direct_before = _child(module, pin_file, seconds, env.hsm.env())
            with P11KitServer(env.hsm, (TOKEN,), directory / "p11kit.sock") as server:
                remote = _child(find_p11kit_client(), pin_file, seconds, server.env())
            unary = _proxy_unary(proxy, seconds)
            batch = _proxy_batch(proxy, seconds, public)
            direct_after = _child(module, pin_file, seconds, env.hsm.env())
        direct = (direct_before + direct_after) / 2
        results.update({
            "direct": round(direct),
            "direct_runs": [round(direct_before), round(direct_after)],
            "p11kit_remote": round(remote),
            "proxy_unary": round(unary),
            "proxy_batch": round(batch),
            "proxy_batch/direct": round(batch / direct, 2),
            "proxy_batch/p11kit_remote": round(batch / remote, 2),
            "targets": {"proxy_batch/direct": 0.8, "proxy_batch/p11kit_remote": 3},
        })
        return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--pkcs11-loop", nargs=3, metavar=("MODULE", "PIN_FILE", "SECONDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pkcs11_loop:
        module, pin_file, seconds = args.pkcs11_loop
        print(json.dumps(_pkcs11_loop(module, pin_file, float(seconds))))
        return 0
    print(json.dumps(run(args.seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
