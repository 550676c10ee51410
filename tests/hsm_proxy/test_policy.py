"""Policy: what each identity may do, two-key checks, handle ownership, audit of denials."""

from __future__ import annotations

import json

import grpc
import pytest

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import TIMEOUT, label_ref, rpc_error, template, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(proxy) -> dict[str, str]:
    """Keys made by the all-powerful identity for the others to try."""
    root = proxy.hsm("access-server")
    made = {
        "kms_aes": unique("kms/aes"), "access_aes": unique("card/aes"),
        "demo_ec": unique("demo/ec"), "other_ec": unique("other/ec"),
    }
    for name, token in (("kms_aes", "kms"), ("access_aes", "access")):
        root.GenerateSecretKey(pb.GenerateSecretKeyRequest(
            token=token, algorithm=pb.AES_128,
            template=template(made[name], pb.DERIVE)), timeout=TIMEOUT)
    for name in ("demo_ec", "other_ec"):
        root.GenerateKeyPair(pb.GenerateKeyPairRequest(
            token="access", algorithm=pb.EC_P256, template=template(made[name], pb.SIGN)),
            timeout=TIMEOUT)
    return made


def _denied(err: grpc.RpcError, *facts: str) -> None:
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
    for fact in facts:
        assert fact in err.details(), (fact, err.details())


def test_key_mgmt_is_confined_to_kms_labels_on_kms(proxy, keys):
    kmgmt = proxy.hsm("key-mgmt")
    ok = kmgmt.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="kms", algorithm=pb.AES_256, template=template(unique("kms/new"), pb.ENCRYPT)),
        timeout=TIMEOUT)
    assert ok.sensitive
    err = rpc_error(kmgmt.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_256, template=template("kms/elsewhere", pb.ENCRYPT)))
    _denied(err, "'key-mgmt'", "GenerateSecretKey", "'access'", "'kms/elsewhere'")
    err = rpc_error(kmgmt.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="kms", algorithm=pb.AES_256, template=template("mk/1", pb.ENCRYPT)))
    _denied(err, "'mk/1'")
    err = rpc_error(kmgmt.DestroyKey, pb.DestroyKeyRequest(key=label_ref(keys["kms_aes"], "kms")))
    _denied(err, "DestroyKey")


def test_two_key_operations_check_both_keys(proxy, keys):
    kmgmt = proxy.hsm("key-mgmt")
    # Base key allowed, new label not.
    err = rpc_error(kmgmt.DeriveKey, pb.DeriveKeyRequest(
        base_key=label_ref(keys["kms_aes"], "kms"), mechanism=pb.AES_ECB_ENCRYPT_DATA,
        data=bytes(16), algorithm=pb.AES_128, template=template("card/derived", pb.ENCRYPT)))
    _denied(err, "'card/derived'", "DeriveKey")
    # A session key's descriptive label is checked too.
    err = rpc_error(kmgmt.DeriveKey, pb.DeriveKeyRequest(
        base_key=label_ref(keys["kms_aes"], "kms"), mechanism=pb.AES_ECB_ENCRYPT_DATA,
        data=bytes(16), algorithm=pb.AES_128,
        template=template("card/session", pb.ENCRYPT, session=True)))
    _denied(err, "'card/session'")
    ok = kmgmt.DeriveKey(pb.DeriveKeyRequest(
        base_key=label_ref(keys["kms_aes"], "kms"), mechanism=pb.AES_ECB_ENCRYPT_DATA,
        data=bytes(16), algorithm=pb.AES_128,
        template=template("kms/session", pb.ENCRYPT, session=True)), timeout=TIMEOUT)
    assert ok.ref.handle


def test_admin_signs_only_demo_keys_and_lists_everything(proxy, keys):
    admin = proxy.hsm("admin")
    sig = admin.Sign(pb.SignRequest(key=label_ref(keys["demo_ec"]), mechanism=pb.ECDSA,
                                    data=bytes(32)), timeout=TIMEOUT)
    assert len(sig.signature) == 64
    err = rpc_error(admin.Sign, pb.SignRequest(key=label_ref(keys["other_ec"]),
                                               mechanism=pb.ECDSA, data=bytes(32)))
    _denied(err, "'admin'", "Sign", "'access'", keys["other_ec"])
    listed = {k.label for k in admin.ListKeys(pb.ListKeysRequest(token="access"),
                                              timeout=TIMEOUT).keys}
    assert {keys["demo_ec"], keys["other_ec"], keys["access_aes"]} <= listed
    kms_view = {k.label for k in proxy.hsm("key-mgmt").ListKeys(
        pb.ListKeysRequest(token="kms"), timeout=TIMEOUT).keys}
    assert keys["kms_aes"] in kms_view and all(label.startswith("kms/") for label in kms_view)


def test_a_batch_with_one_forbidden_key_is_denied_whole(proxy, keys):
    admin = proxy.hsm("admin")
    items = [pb.SignRequest(key=label_ref(keys["demo_ec"]), mechanism=pb.ECDSA,
                            data=bytes(32))] * 10
    items.append(pb.SignRequest(key=label_ref(keys["other_ec"]), mechanism=pb.ECDSA,
                                data=bytes(32)))
    err = rpc_error(admin.SignBatch, pb.SignBatchRequest(items=items))
    _denied(err, keys["other_ec"], "SignBatch")


def test_identities_the_policy_does_not_allow(proxy, keys):
    err = rpc_error(proxy.hsm("auditor").Sign, pb.SignRequest(
        key=label_ref(keys["demo_ec"]), mechanism=pb.ECDSA, data=bytes(32)))
    _denied(err, "'auditor'", "Sign", keys["demo_ec"])
    tokens = proxy.hsm("auditor").ListTokens(pb.ListTokensRequest(), timeout=TIMEOUT).tokens
    assert [t.label for t in tokens] == ["access"]
    err = rpc_error(proxy.hsm("stranger").Sign, pb.SignRequest(
        key=label_ref(keys["demo_ec"]), mechanism=pb.ECDSA, data=bytes(32)))
    _denied(err, "'stranger'", "not in the proxy policy", "Sign", "'access'", keys["demo_ec"])
    err = rpc_error(proxy.hsm("stranger").ReleaseHandles,
                    pb.ReleaseHandlesRequest(handles=["h0.x"]))
    _denied(err, "'stranger'")


def test_denials_are_audited(proxy, proxy_env, keys):
    rpc_error(proxy.hsm("stranger").GenerateRandom,
              pb.GenerateRandomRequest(token="kms", length=8))
    proxy.hsm("access-server").GenerateRandom(pb.GenerateRandomRequest(token="kms", length=8),
                                              timeout=TIMEOUT)
    # The audit file is appended record by record: the lines are already there.
    records = [json.loads(line) for line in proxy_env.audit_path.read_text().splitlines()]
    denied = [r for r in records if r["identity"] == "stranger"
              and r["operation"] == "GenerateRandom"]
    assert denied and denied[-1]["outcome"] == "denied"
    assert denied[-1]["code"] == "PERMISSION_DENIED" and denied[-1]["token"] == "kms"
    oks = [r for r in records if r["identity"] == "access-server"
           and r["operation"] == "GenerateRandom"]
    assert oks[-1]["outcome"] == "ok" and oks[-1]["code"] == "OK"
    assert proxy.metric("cms_hsm_policy_denials_total", identity="stranger",
                        operation="GenerateRandom") >= 1
