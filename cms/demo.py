"""``cms demo``: the system at work on the embedded default.

Brings the local stack up (SoftHSM2 tokens, development PKI, every service on
loopback), then shows what an operator would: the proxy's health, a key
generated in the HSM, a signature made and verified through the proxy, the
key's attributes (sensitive, never extractable), and the metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import time
import urllib.request
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser("demo", help="run the demo on a local stack")
    demo.add_argument("--dir", type=Path, default=Path("var/demo"),
                      help="state directory of the local stack (default: var/demo)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave the services running at the end")
    demo.set_defaults(func=_run)


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def _run(args: argparse.Namespace) -> int:
    from deploy.local import down, up

    _say("stack", f"bringing up the local stack in {args.dir.resolve()}")
    endpoints_path = up(args.dir)
    try:
        _proxy_tour(endpoints_path)
    finally:
        if args.keep_running:
            _say("stack", f"left running; stop with: cms dev down --dir {args.dir}")
        else:
            stopped = down(args.dir)
            _say("stack", "stopped " + ", ".join(stopped))
    return 0


def _proxy_tour(endpoints_path: Path) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cms.runtime.client import load_endpoints
    from cms.v1 import hsm_pb2 as pb
    from cms.v1 import hsm_pb2_grpc

    endpoints = load_endpoints(endpoints_path)
    _say("stack", f"endpoints written to {endpoints.path}")
    for name, entry in endpoints.data["services"].items():
        _say("stack", f"  {name}: grpc {entry['grpc']}, metrics {entry.get('metrics')}")

    channel = endpoints.channel("hsm_proxy", "admin")
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="cms.v1.Hsm"), timeout=10)
    _say("health", "cms.v1.Hsm is "
         + health_pb2.HealthCheckResponse.ServingStatus.Name(health.status))

    hsm = hsm_pb2_grpc.HsmStub(channel)
    for token in hsm.ListTokens(pb.ListTokensRequest(), timeout=10).tokens:
        _say("hsm", f"token {token.label!r} ({token.manufacturer} {token.model}), "
             f"available={token.available}")

    label = f"demo/signing-{int(time.time())}"
    info = hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256,
        template=pb.KeyTemplate(label=label, usages=[pb.SIGN, pb.VERIFY])), timeout=30)
    _say("hsm", f"generated EC P-256 key pair {label!r} in token 'access' (HSM1)")
    attrs = hsm.GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=pb.KeyRef(token="access", label=label), key_class=pb.PRIVATE_KEY), timeout=10)
    _say("hsm", f"private key: sensitive={attrs.sensitive} extractable={attrs.extractable} "
         f"always_sensitive={attrs.always_sensitive} never_extractable={attrs.never_extractable} "
         f"local={attrs.local}")
    del info

    message = b"card management demo"
    digest = hashlib.sha256(message).digest()
    sig = hsm.Sign(pb.SignRequest(key=pb.KeyRef(token="access", label=label),
                                  mechanism=pb.ECDSA, data=digest), timeout=10).signature
    _say("hsm", f"signed SHA-256({message.decode()!r}) with ECDSA inside the HSM: "
         f"{len(sig)}-byte r||s")
    verified = hsm.Verify(pb.VerifyRequest(key=pb.KeyRef(token="access", label=label),
                                           mechanism=pb.ECDSA, data=digest, signature=sig),
                          timeout=10).valid
    _say("hsm", f"verified by the proxy: {verified}")

    der = hsm.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(token="access", label=label)),
                           timeout=10).public_key_der
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    half = len(sig) // 2
    dss = encode_dss_signature(int.from_bytes(sig[:half], "big"), int.from_bytes(sig[half:], "big"))
    try:
        public.verify(dss, message, ec.ECDSA(hashes.SHA256()))
        _say("verify", "verified outside the HSM with the exported public key: True")
    except InvalidSignature:
        _say("verify", "verified outside the HSM with the exported public key: FALSE")
        raise SystemExit(1) from None

    metrics_url = endpoints.metrics_url("hsm_proxy")
    if metrics_url:
        with urllib.request.urlopen(metrics_url, timeout=10) as resp:  # noqa: S310 (loopback)
            text = resp.read().decode()
        lines = [ln for ln in text.splitlines()
                 if ln.startswith(("cms_hsm_operations_total", "cms_grpc_server_handled_total"))
                 and not ln.startswith("#")]
        _say("metrics", f"{metrics_url} ({len(text.splitlines())} lines), for example:")
        for ln in lines[:8]:
            print("    " + ln)
    channel.close()
