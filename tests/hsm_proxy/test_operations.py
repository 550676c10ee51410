"""Every HSM operation through a real proxy, results checked independently.

Signatures are verified with ``cryptography`` against the exported public
key. Secret-key results (CMAC, ciphers, derivations, wraps) are checked
against a key whose value the test knows, put into the HSM through the
component-import ceremony, or through an RSA-OAEP unwrap made in software.
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
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import (
    TIMEOUT,
    aes_cbc,
    aes_cmac,
    aes_ecb,
    handle_ref,
    import_known_key,
    kcv,
    label_ref,
    oaep_sha1,
    public_key,
    rpc_error,
    template,
    unique,
    verify_ecdsa,
    verify_rsa,
)

pytestmark = pytest.mark.integration

AES_ALL = [pb.ENCRYPT, pb.DECRYPT, pb.SIGN, pb.VERIFY, pb.WRAP, pb.UNWRAP, pb.DERIVE]


@pytest.fixture(scope="module")
def hsm(proxy):
    return proxy.hsm("access-server")


@pytest.fixture(scope="module")
def known(hsm) -> tuple[str, bytes]:
    """A persistent AES-256 key of known value (label, value) on token access."""
    value = secrets.token_bytes(32)
    label = unique("ops/known")
    infos = import_known_key(hsm, label, value, AES_ALL)
    assert infos[0].kcv == kcv(value)
    return label, value


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
    label, value = known
    ref = label_ref(label)
    data = secrets.token_bytes(40)
    mac = hsm.Sign(pb.SignRequest(key=ref, mechanism=pb.AES_CMAC, data=data),
                   timeout=TIMEOUT).signature
    assert mac == aes_cmac(value, data)
    assert hsm.Verify(pb.VerifyRequest(key=ref, mechanism=pb.AES_CMAC, data=data,
                                       signature=mac), timeout=TIMEOUT).valid

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
    label, value = known
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
    label, value = known
    data = secrets.token_bytes(16)
    iv = secrets.token_bytes(16)
    ecb = hsm.DeriveKey(pb.DeriveKeyRequest(
        base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA, data=data,
        algorithm=pb.AES_128, template=template("card/derived", pb.SIGN, session=True)),
        timeout=TIMEOUT)
    derived = aes_ecb(value, data)
    assert ecb.ref.handle and ecb.kcv == kcv(derived) and ecb.HasField("expires")
    assert not ecb.token_object and ecb.sensitive
    cbc_data = secrets.token_bytes(32)
    cbc = hsm.DeriveKey(pb.DeriveKeyRequest(
        base_key=label_ref(label), mechanism=pb.AES_CBC_ENCRYPT_DATA, data=cbc_data, iv=iv,
        algorithm=pb.AES_256, template=template("card/derived-cbc", pb.SIGN, session=True)),
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
    label, value = known
    datas = [secrets.token_bytes(16) for _ in range(40)]
    reply = hsm.DeriveKeyBatch(pb.DeriveKeyBatchRequest(items=[
        pb.DeriveKeyRequest(base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA,
                            data=d, algorithm=pb.AES_128,
                            template=template(f"card/{i}", pb.SIGN, session=True))
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
        mac = hsm.Sign(pb.SignRequest(key=handle_ref(k.ref.handle), mechanism=pb.AES_CMAC,
                                      data=b"x"), timeout=TIMEOUT).signature
        assert mac == aes_cmac(aes_ecb(value, d), b"x")
    persistent = hsm.DeriveKeyBatch(pb.DeriveKeyBatchRequest(items=[
        pb.DeriveKeyRequest(base_key=label_ref(label), mechanism=pb.AES_ECB_ENCRYPT_DATA,
                            data=datas[0], algorithm=pb.AES_128,
                            template=template(unique("ops/derived"), pb.ENCRYPT))]),
        timeout=TIMEOUT)
    assert persistent.results[0].key.token_object
    assert persistent.results[0].key.kcv == kcv(aes_ecb(value, datas[0]))


def test_wrap_mechanisms_produce_the_key_software_can_unwrap(hsm, known):
    kek_label, kek = known
    target = unique("ops/extractable")
    info = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128, template=template(target, pb.ENCRYPT,
                                                                extractable=True)),
        timeout=TIMEOUT)
    assert info.extractable and info.sensitive

    def wrap(mechanism: int) -> pb.WrapKeyResponse:
        return hsm.WrapKey(pb.WrapKeyRequest(wrapping_key=label_ref(kek_label),
                                             key=label_ref(target), mechanism=mechanism),
                           timeout=TIMEOUT)

    kwp = wrap(pb.AES_KEY_WRAP_PAD)
    value = aes_key_unwrap_with_padding(kek, kwp.wrapped)
    assert kcv(value) == info.kcv == kwp.kcv and kwp.kcv_method == pb.KCV_ZERO_BLOCK
    assert aes_key_unwrap(kek, wrap(pb.AES_KEY_WRAP).wrapped) == value
    # GlobalPlatform PUT KEY key data: AES-CBC with a zero IV.
    gp = wrap(pb.AES_CBC_ZERO_IV).wrapped
    assert gp == aes_cbc(kek, bytes(16), value)


def test_unwrap_checks_the_expected_kcv(hsm, known):
    kek_label, kek = known
    value = secrets.token_bytes(16)
    wrapped = aes_key_wrap_with_padding(kek, value)
    label = unique("ops/unwrapped")
    err = rpc_error(hsm.UnwrapKey, pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(kek_label), wrapped=wrapped, mechanism=pb.AES_KEY_WRAP_PAD,
        key_class=pb.SECRET_KEY, algorithm=pb.AES_128, template=template(label, pb.ENCRYPT),
        expected_kcv=b"\x00\x00\x00"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "check value" in err.details()
    gone = rpc_error(hsm.GetKeyAttributes, pb.GetKeyAttributesRequest(key=label_ref(label)))
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    info = hsm.UnwrapKey(pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(kek_label), wrapped=wrapped, mechanism=pb.AES_KEY_WRAP_PAD,
        key_class=pb.SECRET_KEY, algorithm=pb.AES_128, template=template(label, pb.ENCRYPT),
        expected_kcv=kcv(value)), timeout=TIMEOUT)
    assert info.kcv == kcv(value) and info.sensitive and not info.local
    block = hsm.Encrypt(pb.CipherRequest(key=label_ref(label), mechanism=pb.CIPHER_AES_ECB,
                                         data=b"\x11" * 16), timeout=TIMEOUT).data
    assert block == aes_ecb(value, b"\x11" * 16)


def test_rsa_oaep_import_key_transports_a_known_key(hsm):
    label = unique("ops/import-key")
    hsm.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=pb.RSA_2048,
        template=template(label, pb.UNWRAP, pb.DECRYPT)), timeout=120)
    public = public_key(hsm, label_ref(label))
    value = secrets.token_bytes(32)
    session = hsm.UnwrapKey(pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(label), wrapped=public.encrypt(value, oaep_sha1()),
        mechanism=pb.RSA_OAEP_SHA1, key_class=pb.SECRET_KEY, algorithm=pb.AES_256,
        template=template("transport/session", pb.SIGN, session=True),
        expected_kcv=kcv(value)), timeout=TIMEOUT)
    mac = hsm.Sign(pb.SignRequest(key=handle_ref(session.ref.handle), mechanism=pb.AES_CMAC,
                                  data=b"t"), timeout=TIMEOUT).signature
    assert mac == aes_cmac(value, b"t")
    secret = b"random R of a card"
    cryptogram = hsm.Encrypt(pb.CipherRequest(key=label_ref(label),
                                              mechanism=pb.CIPHER_RSA_OAEP_SHA1, data=secret),
                             timeout=TIMEOUT)
    assert cryptogram.data != secret
    plain = hsm.Decrypt(pb.CipherRequest(key=label_ref(label), mechanism=pb.CIPHER_RSA_OAEP_SHA1,
                                         data=cryptogram.data), timeout=TIMEOUT).data
    assert plain == secret
    # The HSM's own OAEP wrap of an extractable key unwraps to the same KCV.
    target = unique("ops/to-transport")
    made = hsm.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128,
        template=template(target, pb.ENCRYPT, extractable=True)), timeout=TIMEOUT)
    wrapped = hsm.WrapKey(pb.WrapKeyRequest(wrapping_key=label_ref(label),
                                            key=label_ref(target), mechanism=pb.RSA_OAEP_SHA1),
                          timeout=TIMEOUT).wrapped
    back = hsm.UnwrapKey(pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(label), wrapped=wrapped, mechanism=pb.RSA_OAEP_SHA1,
        key_class=pb.SECRET_KEY, algorithm=pb.AES_128,
        template=template("transport/back", pb.ENCRYPT, session=True)), timeout=TIMEOUT)
    assert back.kcv == made.kcv


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


def test_component_ceremony_rejects_a_wrong_check_value_and_waits(hsm):
    label = unique("ops/ceremony")
    value = secrets.token_bytes(16)
    first = secrets.token_bytes(16)
    second = bytes(a ^ b for a, b in zip(first, value, strict=True))
    begun = hsm.BeginComponentImport(pb.BeginComponentImportRequest(
        tokens=["access", "kms"], algorithm=pb.AES_128, components=2,
        template=template(label, pb.ENCRYPT)), timeout=TIMEOUT)
    assert (begun.received, begun.needed, begun.completed) == (0, 2, False)
    err = rpc_error(hsm.AddKeyComponent, pb.AddKeyComponentRequest(
        handle=begun.handle, component=first, kcv=kcv(second)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "check value" in err.details()
    step = hsm.AddKeyComponent(pb.AddKeyComponentRequest(
        handle=begun.handle, component=first, kcv=kcv(first)), timeout=TIMEOUT)
    assert (step.received, step.completed) == (1, False)
    done = hsm.AddKeyComponent(pb.AddKeyComponentRequest(
        handle=begun.handle, component=second, kcv=kcv(second)), timeout=TIMEOUT)
    assert done.completed and {k.ref.token for k in done.keys} == {"access", "kms"}
    assert all(k.kcv == kcv(value) for k in done.keys)
    for token in ("access", "kms"):
        block = hsm.Encrypt(pb.CipherRequest(key=label_ref(label, token),
                                             mechanism=pb.CIPHER_AES_ECB, data=bytes(16)),
                            timeout=TIMEOUT).data
        assert block == aes_ecb(value, bytes(16))
    err = rpc_error(hsm.AddKeyComponent, pb.AddKeyComponentRequest(
        handle=begun.handle, component=first, kcv=kcv(first)))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_metrics_count_operations_workers_and_sessions(proxy, hsm, ec_pair):
    hsm.Sign(pb.SignRequest(key=label_ref(ec_pair), mechanism=pb.ECDSA, data=bytes(32)),
             timeout=TIMEOUT)
    assert proxy.metric("cms_hsm_operations_total", operation="Sign", code="OK") >= 1
    assert proxy.metric("cms_hsm_workers_up") == 2
    assert proxy.metric("cms_hsm_sessions_in_use") == 4  # 2 workers x 2 tokens
    assert proxy.metric("cms_hsm_batch_items_total", operation="SignBatch") >= 200
    assert proxy.metric("cms_hsm_operation_errors_total", operation="Sign",
                        code="NOT_FOUND") >= 1


def test_only_worker_processes_load_pkcs11(proxy, proxy_env):
    """The frontend (gRPC, policy, audit) never maps the PKCS#11 module; each worker does."""
    module = Path(proxy_env.module).name
    frontend = Path(f"/proc/{proxy.pid}/maps").read_text()
    assert module not in frontend and "_pkcs11" not in frontend
    workers = proxy.worker_pids()
    assert len(workers) == proxy_env.workers
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
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "private usage" in err.details()


def test_private_key_unwrapped_from_pkcs8_signs_for_its_public_key(hsm, known):
    kek_label, kek = known
    private = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    info = hsm.UnwrapKey(pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(kek_label), wrapped=aes_key_wrap_with_padding(kek, pkcs8),
        mechanism=pb.AES_KEY_WRAP_PAD, key_class=pb.PRIVATE_KEY, algorithm=pb.EC_P256,
        template=template("device/imported", pb.SIGN, session=True)), timeout=TIMEOUT)
    assert info.key_class == pb.PRIVATE_KEY and info.sensitive and not info.extractable
    digest = hashlib.sha256(b"device key").digest()
    sig = hsm.Sign(pb.SignRequest(key=handle_ref(info.ref.handle), mechanism=pb.ECDSA,
                                  data=digest), timeout=TIMEOUT).signature
    verify_ecdsa(private.public_key(), sig, digest, prehashed=True)


def test_imported_public_key_completes_an_unwrapped_private_key_into_a_pair(hsm, known):
    """Key transfer brings an RSA private key alone; its public half joins it by label."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    kek_label, kek = known
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pkcs8 = private.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    label = unique("ops/transferred")
    hsm.UnwrapKey(pb.UnwrapKeyRequest(
        unwrapping_key=label_ref(kek_label), wrapped=aes_key_wrap_with_padding(kek, pkcs8),
        mechanism=pb.AES_KEY_WRAP_PAD, key_class=pb.PRIVATE_KEY, algorithm=pb.RSA_2048,
        template=template(label, pb.DECRYPT)), timeout=TIMEOUT)

    def der(key) -> bytes:
        return key.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    # Every worker resolves (and caches) the label while it names the private key alone.
    for _ in range(6):
        alone = hsm.GetPublicKey(pb.GetPublicKeyRequest(key=label_ref(label)), timeout=TIMEOUT)
        assert alone.public_key_der == der(private.public_key())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    err = rpc_error(hsm.ImportPublicKey, pb.ImportPublicKeyRequest(
        token="access", public_key_der=der(stranger), label=label, usages=[pb.ENCRYPT]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in err.details()
    info = hsm.ImportPublicKey(pb.ImportPublicKeyRequest(
        token="access", public_key_der=der(private.public_key()), label=label,
        usages=[pb.ENCRYPT]), timeout=TIMEOUT)
    assert info.key_class == pb.KEY_PAIR
    # One label now encrypts (public half) and decrypts (private half), in any worker.
    secret = secrets.token_bytes(16)
    for _ in range(4):
        sealed = hsm.Encrypt(pb.CipherRequest(key=label_ref(label),
                                              mechanism=pb.CIPHER_RSA_OAEP_SHA1, data=secret),
                             timeout=TIMEOUT).data
        assert hsm.Decrypt(pb.CipherRequest(key=label_ref(label),
                                            mechanism=pb.CIPHER_RSA_OAEP_SHA1, data=sealed),
                           timeout=TIMEOUT).data == secret
    again = rpc_error(hsm.ImportPublicKey, pb.ImportPublicKeyRequest(
        token="access", public_key_der=der(private.public_key()), label=label,
        usages=[pb.ENCRYPT]))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
