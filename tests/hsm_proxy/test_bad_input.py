"""Malformed, oversized and misdirected requests: clear status codes, proxy keeps serving.

The Hsm service here, KeyBlocks and CardKeys in their own tests; the attack
suite (tests/security) covers requests that are well formed but not allowed.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import TIMEOUT, label_ref, rpc_error, template, unique
from tests.support.hsm_proxy import ProxyEnv, ProxyProcess

pytestmark = pytest.mark.integration

MAX_BATCH = 64
MAX_DATA = 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[ProxyProcess]:
    env = ProxyEnv.create(tmp_path_factory.mktemp("bad-input"), overrides={
        "limits": {"max_batch_items": MAX_BATCH, "max_data_bytes": MAX_DATA}})
    with ProxyProcess(env) as running:
        yield running


@pytest.fixture(scope="module")
def hsm(proxy):
    return proxy.hsm("access-server")


@pytest.fixture(scope="module")
def keys(hsm) -> dict[str, str]:
    made = {"aes": unique("bad/aes"), "ec": unique("bad/ec"), "mac_only": unique("bad/mac")}
    hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(made["aes"], pb.ENCRYPT,
                                                                pb.DECRYPT)),
        timeout=TIMEOUT)
    hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(made["mac_only"], pb.SIGN)),
        timeout=TIMEOUT)
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(made["ec"], pb.SIGN)),
        timeout=TIMEOUT)
    return made


def _code(hsm, method: str, request) -> tuple[grpc.StatusCode, str]:
    err = rpc_error(getattr(hsm, method), request)
    return err.code(), err.details()


def test_missing_and_unknown_names(hsm, keys):
    code, msg = _code(hsm, "Sign", pb.SignRequest(mechanism=pb.ECDSA, data=bytes(32)))
    assert code == INVALID and "label" in msg and "handle" in msg
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=label_ref(keys["ec"], "nosuch"),
                                                  mechanism=pb.ECDSA, data=bytes(32)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown token 'nosuch'" in msg
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=label_ref("bad/none"),
                                                  mechanism=pb.ECDSA, data=bytes(32)))
    assert code == grpc.StatusCode.NOT_FOUND and "bad/none" in msg
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=pb.KeyRef(handle="h1.feedface"),
                                                  mechanism=pb.ECDSA, data=bytes(32)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown handle" in msg
    code, _ = _code(hsm, "GenerateSecretKey", pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=pb.KeyTemplate(usages=[pb.ENCRYPT])))
    assert code == INVALID
    code, msg = _code(hsm, "GenerateSecretKey", pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=pb.KeyTemplate(label="bad/x")))
    assert code == INVALID and "usages" in msg


def test_malformed_data_and_parameters(hsm, keys):
    aes = label_ref(keys["aes"])
    code, msg = _code(hsm, "Encrypt", pb.CipherRequest(key=aes, mechanism=pb.CIPHER_AES_ECB,
                                                       data=b"fifteen bytes!!"[:15]))
    assert code == INVALID and "16-byte blocks" in msg
    code, msg = _code(hsm, "Encrypt", pb.CipherRequest(key=aes, mechanism=pb.CIPHER_AES_CBC,
                                                       iv=b"short", data=bytes(16)))
    assert code == INVALID and "IV" in msg
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=label_ref(keys["ec"]), mechanism=pb.ECDSA,
                                                  data=b"not a digest"))
    assert code == INVALID and "digest" in msg
    code, msg = _code(hsm, "Encrypt", pb.CipherRequest(key=aes, mechanism=9, data=bytes(16)))
    assert code == INVALID and "SHA-1" in msg
    code, msg = _code(hsm, "GenerateSecretKey", pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.GENERIC_SECRET, template=template("bad/g", pb.DERIVE)))
    assert code == INVALID and "length_bytes" in msg
    code, msg = _code(hsm, "GenerateKeyPair", pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.AES_128, template=template("bad/p", pb.SIGN)))
    assert code == INVALID and "GenerateSecretKey" in msg
    code, msg = _code(hsm, "DeriveKey", pb.DeriveKeyRequest(
        base_key=aes, mechanism=pb.AES_ECB_ENCRYPT_DATA, data=bytes(8), algorithm=pb.AES_128,
        template=template("bad/d", pb.ENCRYPT, session=True)))
    assert code == INVALID and "multiple of 16" in msg
    code, _ = _code(hsm, "GenerateRandom", pb.GenerateRandomRequest(token="access", length=0))
    assert code == INVALID


def test_wrong_key_type_or_usage(hsm, keys):
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=label_ref(keys["aes"]),
                                                  mechanism=pb.ECDSA, data=bytes(32)))
    assert code == PRECONDITION and "EC private key" in msg
    code, msg = _code(hsm, "Sign", pb.SignRequest(key=label_ref(keys["aes"]),
                                                  mechanism=pb.AES_CMAC, data=b"m"))
    assert code == PRECONDITION and "does not allow SIGN" in msg
    code, msg = _code(hsm, "Encrypt", pb.CipherRequest(key=label_ref(keys["ec"]),
                                                       mechanism=pb.CIPHER_AES_ECB,
                                                       data=bytes(16)))
    assert code == PRECONDITION and "secret key" in msg
    code, msg = _code(hsm, "DeriveKey", pb.DeriveKeyRequest(
        base_key=label_ref(keys["aes"]), mechanism=pb.AES_ECB_ENCRYPT_DATA, data=bytes(16),
        algorithm=pb.AES_128, template=template("bad/d2", pb.ENCRYPT, session=True)))
    assert code == PRECONDITION and "does not allow DERIVE" in msg
    code, msg = _code(hsm, "GetPublicKey", pb.GetPublicKeyRequest(key=label_ref(keys["aes"])))
    assert code == PRECONDITION and "secret key" in msg


def test_oversized_data_and_batches(hsm, keys):
    code, msg = _code(hsm, "Encrypt", pb.CipherRequest(key=label_ref(keys["aes"]),
                                                       mechanism=pb.CIPHER_AES_ECB,
                                                       data=bytes(MAX_DATA + 16)))
    assert code == INVALID and f"limit is {MAX_DATA}" in msg
    item = pb.SignRequest(key=label_ref(keys["ec"]), mechanism=pb.ECDSA, data=bytes(32))
    code, msg = _code(hsm, "SignBatch", pb.SignBatchRequest(items=[item] * (MAX_BATCH + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and f"limit is {MAX_BATCH}" in msg
    code, _ = _code(hsm, "SignBatch", pb.SignBatchRequest())
    assert code == INVALID


def test_bad_batch_items_fail_alone(hsm, keys):
    good = pb.SignRequest(key=label_ref(keys["ec"]), mechanism=pb.ECDSA, data=bytes(32))
    items = [good, pb.SignRequest(key=label_ref(keys["ec"]), mechanism=pb.ECDSA, data=b"x"),
             good, pb.SignRequest(key=label_ref(keys["aes"]), mechanism=pb.ECDSA,
                                  data=bytes(32)),
             pb.SignRequest(mechanism=pb.ECDSA, data=bytes(32)), good]
    reply = hsm.SignBatch(pb.SignBatchRequest(items=items), timeout=TIMEOUT)
    kinds = [r.WhichOneof("result") for r in reply.results]
    assert kinds == ["signature", "error", "signature", "error", "error", "signature"]
    assert reply.results[1].error.code == INVALID.value[0]
    assert reply.results[3].error.code == PRECONDITION.value[0]
    assert reply.results[4].error.code == INVALID.value[0]


def test_proxy_keeps_serving_after_bad_input(proxy, hsm, keys):
    sig = hsm.Sign(pb.SignRequest(key=label_ref(keys["ec"]), mechanism=pb.ECDSA,
                                  data=bytes(32)), timeout=TIMEOUT)
    assert len(sig.signature) == 64
    assert proxy.health() == "SERVING"
    assert proxy.metric("cms_hsm_workers_up") == 3          # 2 workers and the officer
