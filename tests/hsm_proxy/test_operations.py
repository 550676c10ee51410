"""Every operation of the Hsm service (operator keys) through a real proxy, results
checked independently.

Signatures are verified with ``cryptography`` against the exported public
key. Secret-key results (CMAC, ciphers, derivations) are checked against keys
whose value the test knows: the proxy never imports a known secret, so the
test writes them into the token itself with the token PIN (tests/support/token.py),
one key per usage group, as operator keys.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import (
    TIMEOUT,
    aes_cbc,
    aes_cmac,
    aes_ecb,
    handle_ref,
    kcv,
    label_ref,
    public_key,
    rpc_error,
    template,
    unique,
    verify_ecdsa,
    verify_rsa,
)
from tests.support.token import RawToken, operator_tag

pytestmark = pytest.mark.integration

GROUPS = {"cipher": ["ENCRYPT", "DECRYPT"], "mac": ["SIGN", "VERIFY"], "derive": ["DERIVE"]}


@pytest.fixture(scope="module")
def hsm(proxy):
    return proxy.hsm("access-server")


@pytest.fixture(scope="module")
def known(proxy_env) -> tuple[dict[str, str], bytes]:
    """Operator AES-256 keys of one known value on token access, one per usage group:
    ({group: label}, value)."""
    value = secrets.token_bytes(32)
    token = RawToken(proxy_env.hsm, "access")
    labels = {}
    for group, usages in GROUPS.items():
        labels[group] = unique(f"ops/known-{group}")
        token.create_aes(labels[group], value, usages, tag=operator_tag())
    return labels, value


@pytest.fixture(scope="module")
def ec_pair(hsm) -> str:
    label = unique("ops/ec")
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(label, pb.SIGN)),
        timeout=TIMEOUT)
    return label


def test_list_tokens_shows_both_tokens_available(hsm):
    tokens = {t.label: t for t in hsm.ListTokens(pb.ListTokensRequest(), timeout=TIMEOUT).tokens}
    assert set(tokens) == {"access", "kms"}
    assert all(t.available and t.logged_in for t in tokens.values())
    assert tokens["access"].manufacturer.startswith("SoftHSM")
    assert tokens["access"].serial != tokens["kms"].serial


def test_generate_aes_key_is_sensitive_with_kcv_and_labels_are_unique(hsm):
    label = unique("ops/aes")
    info = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_256, template=template(label, pb.ENCRYPT)),
        timeout=TIMEOUT)
    assert (info.key_class, info.algorithm, info.size_bits) == (pb.SECRET_KEY, pb.AES_256, 256)
    assert info.sensitive and info.always_sensitive and info.never_extractable
    assert not info.extractable and info.local and info.token_object
    assert len(info.kcv) == 3 and info.kcv_method == pb.KCV_ZERO_BLOCK
    assert info.ref.label == label and list(info.usages) == [pb.ENCRYPT]
    # The KCV is the key's: encrypting a zero block through the proxy gives it.
    block = hsm.Encrypt(pb.CipherRequest(key=label_ref(label), mechanism=pb.CIPHER_AES_ECB,
                                         data=bytes(16)), timeout=TIMEOUT).data
    assert block[:3] == info.kcv
    err = rpc_error(hsm.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(label, pb.ENCRYPT)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and label in err.details()


def test_generic_secret_has_requested_length(hsm):
    info = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="kms", algorithm=pb.GENERIC_SECRET, length_bytes=48,
        template=template(unique("ops/generic"), pb.DERIVE)), timeout=TIMEOUT)
    assert info.algorithm == pb.GENERIC_SECRET and info.size_bits == 384 and info.sensitive


@pytest.mark.parametrize("algorithm", [pb.EC_P256, pb.EC_SECP256K1])
def test_ecdsa_signatures_verify_outside_the_hsm(hsm, algorithm):
    label = unique("ops/ecdsa")
    info = hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=algorithm, template=template(label, pb.SIGN)),
        timeout=TIMEOUT)
    assert info.key_class == pb.KEY_PAIR and info.algorithm == algorithm
    assert info.sensitive and not info.extractable
    public = public_key(hsm, label_ref(label))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    message = b"card management"
    digest = hashlib.sha256(message).digest()
    raw = hsm.Sign(pb.SignRequest(key=label_ref(label), mechanism=pb.ECDSA, data=digest),
                   timeout=TIMEOUT).signature
    assert len(raw) == 64
    verify_ecdsa(public, raw, digest, prehashed=True)
    hashed = hsm.Sign(pb.SignRequest(key=label_ref(label), mechanism=pb.ECDSA_SHA256,
                                     data=message), timeout=TIMEOUT).signature
    verify_ecdsa(public, hashed, message, prehashed=False)
    ok = hsm.Verify(pb.VerifyRequest(key=label_ref(label), mechanism=pb.ECDSA, data=digest,
                                     signature=raw), timeout=TIMEOUT)
    bad = hsm.Verify(pb.VerifyRequest(key=label_ref(label), mechanism=pb.ECDSA, data=digest,
                                      signature=raw[:-1] + bytes([raw[-1] ^ 1])),
                     timeout=TIMEOUT)
    assert ok.valid and not bad.valid


@pytest.mark.parametrize(("algorithm", "bits"), [(pb.RSA_2048, 2048), (pb.RSA_3072, 3072)])
def test_rsa_pkcs1_and_pss_signatures_verify_outside_the_hsm(hsm, algorithm, bits):
    label = unique("ops/rsa")
    info = hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=algorithm, template=template(label, pb.SIGN)),
        timeout=120)
    assert info.algorithm == algorithm and info.size_bits == bits
    public = public_key(hsm, label_ref(label))
    message = b"issuer payload"
    for mechanism, pss in ((pb.RSA_PKCS1_SHA256, False), (pb.RSA_PSS_SHA256, True)):
        sig = hsm.Sign(pb.SignRequest(key=label_ref(label), mechanism=mechanism, data=message),
                       timeout=TIMEOUT).signature
        verify_rsa(public, sig, message, pss)
        assert hsm.Verify(pb.VerifyRequest(key=label_ref(label), mechanism=mechanism,
                                           data=message, signature=sig), timeout=TIMEOUT).valid


def test_cmac_ciphers_and_batch_forms_match_software(hsm, known):
    labels, value = known
    mac_ref = label_ref(labels["mac"])
    data = secrets.token_bytes(40)
    mac = hsm.Sign(pb.SignRequest(key=mac_ref, mechanism=pb.AES_CMAC, data=data),
                   timeout=TIMEOUT).signature
    assert mac == aes_cmac(value, data)
    assert hsm.Verify(pb.VerifyRequest(key=mac_ref, mechanism=pb.AES_CMAC, data=data,
                                       signature=mac), timeout=TIMEOUT).valid
    ref = label_ref(labels["cipher"])
    # A key of one usage group does nothing of another.
    err = rpc_error(hsm.Sign, pb.SignRequest(key=ref, mechanism=pb.AES_CMAC, data=data))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "SIGN" in err.details()

    block = secrets.token_bytes(48)
    iv = secrets.token_bytes(16)
    ecb = hsm.Encrypt(pb.CipherRequest(key=ref, mechanism=pb.CIPHER_AES_ECB, data=block),
                      timeout=TIMEOUT).data
    cbc = hsm.Encrypt(pb.CipherRequest(key=ref, mechanism=pb.CIPHER_AES_CBC, iv=iv, data=block),
                      timeout=TIMEOUT).data
    assert ecb == aes_ecb(value, block) and cbc == aes_cbc(value, iv, block)
    back = hsm.Decrypt(pb.CipherRequest(key=ref, mechanism=pb.CIPHER_AES_CBC, iv=iv, data=cbc),
                       timeout=TIMEOUT).data
    assert back == block

    items = [secrets.token_bytes(16 * (1 + i % 3)) for i in range(64)]
    reply = hsm.EncryptBatch(pb.CipherBatchRequest(items=[
        pb.CipherRequest(key=ref, mechanism=pb.CIPHER_AES_ECB, data=d) for d in items]
        + [pb.CipherRequest(key=ref, mechanism=pb.CIPHER_AES_ECB, data=b"not a block")]),
        timeout=TIMEOUT)
    assert [r.data for r in reply.results[:-1]] == [aes_ecb(value, d) for d in items]
    assert reply.results[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


def test_sign_batch_mixes_cmac_and_ecdsa_and_reports_item_errors(hsm, known, ec_pair):
    labels, value = known
    label = labels["mac"]
    public = public_key(hsm, label_ref(ec_pair))
    messages = [secrets.token_bytes(24) for _ in range(200)]
    items = []
    for i, msg in enumerate(messages):
        if i % 2:
            items.append(pb.SignRequest(key=label_ref(label), mechanism=pb.AES_CMAC, data=msg))
        else:
            items.append(pb.SignRequest(key=label_ref(ec_pair), mechanism=pb.ECDSA,
                                        data=hashlib.sha256(msg).digest()))
    items.append(pb.SignRequest(key=label_ref("ops/no-such-key"), mechanism=pb.ECDSA,
                                data=bytes(32)))
    reply = hsm.SignBatch(pb.SignBatchRequest(items=items), timeout=TIMEOUT)
    assert len(reply.results) == len(items)
    for i, (msg, result) in enumerate(zip(messages, reply.results, strict=False)):
        assert result.WhichOneof("result") == "signature"
        if i % 2:
            assert result.signature == aes_cmac(value, msg)
        else:
            verify_ecdsa(public, result.signature, hashlib.sha256(msg).digest(), prehashed=True)
    assert reply.results[-1].error.code == grpc.StatusCode.NOT_FOUND.value[0]


def test_derive_into_session_matches_software_and_is_usable(hsm, known):
    labels, value = known
    label = labels["derive"]
    data = secrets.token_bytes(16)
    iv = secrets.token_bytes(16)
    ecb = hsm.DeriveKey(pb.DeriveKeyRequest(
        base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA, data=data,
        algorithm=pb.AES_128, template=template("card/derived", pb.SIGN, session=True)),
        timeout=TIMEOUT)
    derived = aes_ecb(value, data)
    assert ecb.ref.handle and ecb.HasField("expires")
    assert not ecb.token_object and ecb.sensitive and not ecb.extractable
    assert ecb.role == pb.OPERATOR_KEY and not ecb.modifiable
    cbc_data = secrets.token_bytes(32)
    cbc = hsm.DeriveKey(pb.DeriveKeyRequest(
        base_key=label_ref(label), mechanism=pb.AES_CBC_ENCRYPT_DATA, data=cbc_data, iv=iv,
        algorithm=pb.AES_256, template=template("card/derived-cbc", pb.ENCRYPT, session=True)),
        timeout=TIMEOUT)
    assert cbc.kcv == kcv(aes_cbc(value, iv, cbc_data))
    # The session key works: its CMAC is the CMAC of the derived value.
    msg = b"secure channel"
    mac = hsm.Sign(pb.SignRequest(key=handle_ref(ecb.ref.handle), mechanism=pb.AES_CMAC,
                                  data=msg), timeout=TIMEOUT).signature
    assert mac == aes_cmac(derived, msg)
    released = hsm.ReleaseHandles(pb.ReleaseHandlesRequest(
        handles=[ecb.ref.handle, cbc.ref.handle, "h0.unknown"]), timeout=TIMEOUT)
    assert released.released == 2
    err = rpc_error(hsm.Sign, pb.SignRequest(key=handle_ref(ecb.ref.handle),
                                             mechanism=pb.AES_CMAC, data=msg))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "released" in err.details()


def test_derive_batch_kcvs_match_software(hsm, known):
    labels, value = known
    label = labels["derive"]
    datas = [secrets.token_bytes(16) for _ in range(40)]
    reply = hsm.DeriveKeyBatch(pb.DeriveKeyBatchRequest(items=[
        pb.DeriveKeyRequest(base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA,
                            data=d, algorithm=pb.AES_128,
                            template=template(f"card/{i}", pb.ENCRYPT, pb.DECRYPT,
                                              session=True))
        for i, d in enumerate(datas)] + [
        pb.DeriveKeyRequest(base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA,
                            data=b"short", algorithm=pb.AES_128,
                            template=template("card/bad", pb.SIGN, session=True))]),
        timeout=TIMEOUT)
    keys = [r.key for r in reply.results[:-1]]
    assert [k.kcv for k in keys] == [kcv(aes_ecb(value, d)) for d in datas]
    assert len({k.ref.handle for k in keys}) == len(datas)
    assert reply.results[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # Handles spread over the workers are each usable.
    for k, d in list(zip(keys, datas, strict=True))[::7]:
        block = hsm.Encrypt(pb.CipherRequest(key=handle_ref(k.ref.handle),
                                             mechanism=pb.CIPHER_AES_ECB, data=bytes(16)),
                            timeout=TIMEOUT).data
        assert block == aes_ecb(aes_ecb(value, d), bytes(16))
    persistent = hsm.DeriveKeyBatch(pb.DeriveKeyBatchRequest(items=[
        pb.DeriveKeyRequest(base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA,
                            data=datas[0], algorithm=pb.AES_128,
                            template=template(unique("ops/derived"), pb.ENCRYPT))]),
        timeout=TIMEOUT)
    assert persistent.results[0].key.token_object
    assert persistent.results[0].key.kcv == kcv(aes_ecb(value, datas[0]))


def test_imported_public_key_verifies_software_signatures(hsm):
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    label = unique("ops/imported")
    info = hsm.ImportPublicKey(pb.ImportPublicKeyRequest(
        token="kms", public_key_der=der, label=label, usages=[pb.VERIFY]), timeout=TIMEOUT)
    assert info.key_class == pb.PUBLIC_KEY and info.algorithm == pb.EC_P256
    message = b"provider root"
    r, s = decode_dss_signature(private.sign(message, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    ok = hsm.Verify(pb.VerifyRequest(key=label_ref(label, "kms"), mechanism=pb.ECDSA_SHA256,
                                     data=message, signature=raw), timeout=TIMEOUT)
    assert ok.valid
    exported = hsm.GetPublicKey(pb.GetPublicKeyRequest(key=label_ref(label, "kms")),
                                timeout=TIMEOUT)
    assert exported.public_key_der == der and exported.algorithm == pb.EC_P256


def test_random_attributes_listing_and_destroy(hsm, ec_pair):
    a = hsm.GenerateRandom(pb.GenerateRandomRequest(token="access", length=32), timeout=TIMEOUT)
    b = hsm.GenerateRandom(pb.GenerateRandomRequest(token="access", length=32), timeout=TIMEOUT)
    assert len(a.data) == 32 and a.data != b.data
    public = hsm.GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=label_ref(ec_pair), key_class=pb.PUBLIC_KEY), timeout=TIMEOUT)
    assert public.key_class == pb.PUBLIC_KEY and list(public.usages) == [pb.VERIFY]
    private = hsm.GetKeyAttributes(pb.GetKeyAttributesRequest(key=label_ref(ec_pair)),
                                   timeout=TIMEOUT)
    assert private.key_class == pb.PRIVATE_KEY and private.sensitive
    listed = hsm.ListKeys(pb.ListKeysRequest(token="access", label_pattern="ops/ec-*"),
                          timeout=TIMEOUT).keys
    assert ec_pair in {k.label for k in listed}
    assert all(k.label.startswith("ops/ec-") for k in listed)
    pairs = hsm.ListKeys(pb.ListKeysRequest(token="access", key_class=pb.KEY_PAIR),
                         timeout=TIMEOUT).keys
    assert all(k.key_class == pb.KEY_PAIR for k in pairs) and ec_pair in {k.label for k in pairs}

    doomed = unique("ops/doomed")
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(doomed, pb.SIGN)),
        timeout=TIMEOUT)
    # Warm the label cache of every worker, then destroy.
    for _ in range(4):
        hsm.Sign(pb.SignRequest(key=label_ref(doomed), mechanism=pb.ECDSA, data=bytes(32)),
                 timeout=TIMEOUT)
    assert hsm.DestroyKey(pb.DestroyKeyRequest(key=label_ref(doomed)),
                          timeout=TIMEOUT).destroyed == 2
    for _ in range(4):
        err = rpc_error(hsm.Sign, pb.SignRequest(key=label_ref(doomed), mechanism=pb.ECDSA,
                                                 data=bytes(32)))
        assert err.code() == grpc.StatusCode.NOT_FOUND


def test_session_keys_are_bound_to_their_creator(proxy, hsm):
    info = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128,
        template=template("demo/session", pb.SIGN, session=True)), timeout=TIMEOUT)
    assert info.ref.handle.startswith("h") and not info.token_object
    assert info.expires.seconds > 0
    mac = hsm.Sign(pb.SignRequest(key=handle_ref(info.ref.handle), mechanism=pb.AES_CMAC,
                                  data=b"a"), timeout=TIMEOUT)
    assert len(mac.signature) == 16
    # admin's policy allows demo/* keys, yet the handle is not admin's.
    err = rpc_error(proxy.hsm("admin").Sign, pb.SignRequest(
        key=handle_ref(info.ref.handle), mechanism=pb.AES_CMAC, data=b"a"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "another identity" in err.details()
    assert proxy.hsm("admin").ReleaseHandles(pb.ReleaseHandlesRequest(
        handles=[info.ref.handle]), timeout=TIMEOUT).released == 0
    assert hsm.DestroyKey(pb.DestroyKeyRequest(key=handle_ref(info.ref.handle)),
                          timeout=TIMEOUT).destroyed == 1


def test_metrics_count_operations_workers_and_sessions(proxy, hsm, ec_pair):
    hsm.Sign(pb.SignRequest(key=label_ref(ec_pair), mechanism=pb.ECDSA, data=bytes(32)),
             timeout=TIMEOUT)
    assert proxy.metric("cms_hsm_operations_total", operation="Sign", code="OK") >= 1
    assert proxy.metric("cms_hsm_workers_up") == 3          # 2 workers and the officer
    assert proxy.metric("cms_hsm_sessions_in_use") == 4  # 2 workers x 2 tokens (officer: none)
    assert proxy.metric("cms_hsm_batch_items_total", operation="SignBatch") >= 200
    assert proxy.metric("cms_hsm_operation_errors_total", operation="Sign",
                        code="NOT_FOUND") >= 1


def test_only_worker_processes_load_pkcs11(proxy, proxy_env):
    """The frontend (gRPC, policy, audit) never maps the PKCS#11 module; each worker does."""
    module = Path(proxy_env.module).name
    frontend = Path(f"/proc/{proxy.pid}/maps").read_text()
    assert module not in frontend and "_pkcs11" not in frontend
    workers = proxy.worker_pids()
    assert len(workers) == proxy_env.workers + 1           # and the officer worker
    for pid in workers:
        assert module in Path(f"/proc/{pid}/maps").read_text()


def test_pair_usages_may_name_both_halves(hsm):
    label = unique("ops/both-halves")
    info = hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(label, pb.SIGN, pb.VERIFY)),
        timeout=TIMEOUT)
    assert list(info.usages) == [pb.SIGN]
    public = hsm.GetKeyAttributes(pb.GetKeyAttributesRequest(
        key=label_ref(label), key_class=pb.PUBLIC_KEY), timeout=TIMEOUT)
    assert list(public.usages) == [pb.VERIFY]
    err = rpc_error(hsm.GenerateKeyPair, pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.EC_P256, template=template(unique("ops/v"), pb.VERIFY)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "one group" in err.details()
    err = rpc_error(hsm.GenerateKeyPair, pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.RSA_2048,
        template=template(unique("ops/se"), pb.SIGN, pb.ENCRYPT)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


def test_operator_keys_get_the_class_template_whatever_is_asked(hsm, proxy_env):
    """The proxy, not the caller, decides a key's attributes: asked-for usages must be one
    group of the operator class, extractable is refused, CKA_ID is the proxy's tag, and the
    key can be neither modified nor copied (read back in the token itself)."""
    label = unique("ops/shape")
    info = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(label, pb.ENCRYPT)),
        timeout=TIMEOUT)
    assert (info.role, info.origin) == (pb.OPERATOR_KEY, pb.GENERATED)
    assert not info.modifiable and not info.copyable and not info.conformance
    raw = RawToken(proxy_env.hsm, "access").read(label, [
        "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "DERIVE", "EXTRACTABLE",
        "MODIFIABLE", "COPYABLE", "SENSITIVE", "ID"])
    assert raw == [{"ENCRYPT": True, "DECRYPT": False, "WRAP": False, "UNWRAP": False,
                    "SIGN": False, "DERIVE": False, "EXTRACTABLE": False, "MODIFIABLE": False,
                    "COPYABLE": False, "SENSITIVE": True, "ID": operator_tag().hex()}]
    for usages in ([pb.WRAP], [pb.UNWRAP], [pb.ENCRYPT, pb.SIGN], [pb.DECRYPT, pb.DERIVE]):
        err = rpc_error(hsm.GenerateSecretKey, pb.GenerateSecretKeyRequest(
            token="access", algorithm=pb.AES_128, template=template(unique("ops/no"), *usages)))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "one group" in err.details()
    err = rpc_error(hsm.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128,
        template=template(unique("ops/ex"), pb.ENCRYPT, extractable=True)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "extractable" in err.details()
    err = rpc_error(hsm.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128,
        template=pb.KeyTemplate(label=unique("ops/id"), usages=[pb.ENCRYPT], id=b"mine")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "CKA_ID" in err.details()
    err = rpc_error(hsm.GenerateKeyPair, pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.RSA_2048,
        template=template(unique("ops/rsa-unwrap"), pb.UNWRAP)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("label", ["mk/99", "mkrk/7", "cryptogram/3", "transport/x",
                                   "factory/transport-master", "audit/hsm-proxy",
                                   "mk/not-a-version"])
def test_labels_of_other_classes_are_not_this_services(hsm, label):
    err = rpc_error(hsm.GenerateSecretKey, pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(label, pb.DERIVE)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "operator" in err.details() or "reserved" in err.details()
