"""Keys generated through the proxy, inspected directly in the token with python-pkcs11.

The test process opens its own PKCS#11 session on the same SoftHSM2 token
(another process, as an auditor would) and reads the protection attributes
and, to be sure, tries to read CKA_VALUE itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pkcs11
import pytest
from pkcs11 import Attribute, ObjectClass

from cms.v1 import hsm_pb2 as pb
from tests.hsm_proxy.helpers import TIMEOUT, template, unique

pytestmark = pytest.mark.integration

PROTECTION = (Attribute.SENSITIVE, Attribute.EXTRACTABLE, Attribute.ALWAYS_SENSITIVE,
              Attribute.NEVER_EXTRACTABLE)


@pytest.fixture(scope="module")
def session(proxy_env) -> Iterator[pkcs11.Session]:
    os.environ.update(proxy_env.hsm.env())
    lib = pkcs11.lib(proxy_env.module)
    lib.reinitialize()  # read this module's SOFTHSM2_CONF even if loaded before
    token = lib.get_token(token_label="access")
    with token.open(user_pin=proxy_env.pin("access")) as opened:
        yield opened
    lib.finalize()


def _object(session: pkcs11.Session, label: str, cls: ObjectClass) -> pkcs11.Object:
    found = list(session.get_objects({Attribute.LABEL: label, Attribute.CLASS: cls}))
    assert len(found) == 1, f"{label}: {len(found)} objects of class {cls.name}"
    return found[0]


def _value_unreadable(obj: pkcs11.Object) -> None:
    with pytest.raises(pkcs11.AttributeSensitive):
        obj[Attribute.VALUE]


@pytest.mark.parametrize("algorithm", [pb.AES_256, pb.GENERIC_SECRET])
def test_generated_secret_keys_never_leave_in_clear(proxy, session, algorithm):
    label = unique("protect/secret")
    proxy.hsm("access-server").GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=algorithm, length_bytes=32 if algorithm == pb.GENERIC_SECRET
        else 0, template=template(label, pb.DERIVE)), timeout=TIMEOUT)
    key = _object(session, label, ObjectClass.SECRET_KEY)
    attrs = key.get_attributes(list(PROTECTION))
    assert attrs == {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                     Attribute.ALWAYS_SENSITIVE: True, Attribute.NEVER_EXTRACTABLE: True}
    _value_unreadable(key)


@pytest.mark.parametrize("algorithm", [pb.EC_P256, pb.RSA_2048])
def test_generated_private_keys_never_leave_in_clear(proxy, session, algorithm):
    label = unique("protect/pair")
    proxy.hsm("access-server").GenerateKeyPair(pb.GenerateKeyPairRequest(
        token="access", algorithm=algorithm, template=template(label, pb.SIGN)), timeout=120)
    private = _object(session, label, ObjectClass.PRIVATE_KEY)
    attrs = private.get_attributes(list(PROTECTION))
    assert attrs == {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                     Attribute.ALWAYS_SENSITIVE: True, Attribute.NEVER_EXTRACTABLE: True}
    secret_parts = ([Attribute.VALUE] if algorithm == pb.EC_P256
                    else [Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.PRIME_2])
    for part in secret_parts:
        with pytest.raises(pkcs11.AttributeSensitive):
            private[part]
    # The public half is what it should be: public, only for verifying.
    public = _object(session, label, ObjectClass.PUBLIC_KEY)
    assert public[Attribute.VERIFY] is True and public[Attribute.ENCRYPT] is False


def test_blocks_and_transport_keys_have_their_class_template_in_the_token(proxy, proxy_env):
    """Read back with the token PIN: what KeyBlocks made is what the class table says.

    HSM2's block: extractable only under a trusted key, no usage, fixed. The
    transport key's HSM2 half: trusted, wrap only, public object (made in the
    SO session); its HSM1 half: unwrap only. HSM1's block: derive only, never
    extractable. None of them can be modified or copied, and no value can be read.
    """
    from cms.v1 import key_blocks_pb2 as bpb
    from cms.v1 import key_blocks_pb2_grpc
    from tests.hsm_proxy.helpers import ceremony
    from tests.support.token import RawToken

    blocks = key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel("access-server"))
    transport = unique("transport/protect")
    ceremony(proxy, transport, os.urandom(16))
    version = int.from_bytes(os.urandom(3), "big") + 100
    mk = f"mk/{version}"
    blocks.GenerateBlock(bpb.GenerateBlockRequest(token="kms", role=pb.MK_BLOCK, label=mk,
                                                  algorithm=pb.AES_128), timeout=TIMEOUT)
    blocks.TransferBlocks(bpb.TransferBlocksRequest(source_token="kms", target_token="access",
                                                    transport_label=transport, labels=[mk]),
                          timeout=TIMEOUT)
    names = ["SENSITIVE", "EXTRACTABLE", "WRAP_WITH_TRUSTED", "TRUSTED", "PRIVATE",
             "MODIFIABLE", "COPYABLE", "ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "DERIVE",
             "VALUE"]
    kms, access = RawToken(proxy_env.hsm, "kms"), RawToken(proxy_env.hsm, "access")
    fixed = {"SENSITIVE": True, "MODIFIABLE": False, "COPYABLE": False,
             "VALUE": "error:AttributeSensitive"}
    none = {u: False for u in ("ENCRYPT", "DECRYPT", "WRAP", "UNWRAP", "SIGN", "DERIVE")}
    expected = {
        (kms, mk): {**fixed, **none, "EXTRACTABLE": True, "WRAP_WITH_TRUSTED": True,
                    "TRUSTED": False, "PRIVATE": True},
        (access, mk): {**fixed, **none, "DERIVE": True, "EXTRACTABLE": False,
                       "WRAP_WITH_TRUSTED": False, "TRUSTED": False, "PRIVATE": True},
        (kms, transport): {**fixed, **none, "WRAP": True, "EXTRACTABLE": False,
                           "WRAP_WITH_TRUSTED": False, "TRUSTED": True, "PRIVATE": False},
        (access, transport): {**fixed, **none, "UNWRAP": True, "EXTRACTABLE": False,
                              "WRAP_WITH_TRUSTED": False, "TRUSTED": False, "PRIVATE": True},
    }
    for (token, label), want in expected.items():
        assert token.read(label, names) == [want], (token.token, label)
