"""A real proxy holding the issuer's keys: its seed, its device authentication KEK and its
issuer key, each made in its token under the policy of ``cms dev up``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cms import keynames
from cms.v1 import issuer_pb2 as ipb
from cms.v1 import issuer_pb2_grpc, provider_pb2_grpc
from cms.v1 import provider_pb2 as ppb
from deploy.local import default_policy
from tests.support.hsm_proxy import ProxyEnv, ProxyProcess

TIMEOUT = 60


@contextmanager
def issuer_proxy(directory: Path) -> Iterator[ProxyProcess]:
    """A proxy on every token, with seed 1, KEK 1 and issuer key 1 made by admin."""
    env = ProxyEnv.create(directory, tokens=keynames.TOKENS, policy=default_policy())
    with ProxyProcess(env) as running:
        admin = issuer_pb2_grpc.IssuerHsmStub(running.channel("admin"))
        admin.CreateSeed(ipb.CreateSeedRequest(version=1), timeout=TIMEOUT)
        admin.CreateDeviceAuthKek(ipb.CreateDeviceAuthKekRequest(version=1), timeout=TIMEOUT)
        provider_pb2_grpc.IssuerKeysStub(running.channel("admin")).CreateIssuerKey(
            ppb.CreateIssuerKeyRequest(version=1), timeout=TIMEOUT)
        yield running


def issuer_public_key(proxy: ProxyProcess) -> ec.EllipticCurvePublicKey:
    """The public issuer key (version 1), as the access server reads it."""
    der = provider_pb2_grpc.IssuerKeysStub(proxy.channel("access-server")).GetIssuerKey(
        ppb.GetIssuerKeyRequest(version=1), timeout=TIMEOUT).public_key
    public = serialization.load_der_public_key(der)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public
