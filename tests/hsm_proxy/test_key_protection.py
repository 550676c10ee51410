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


def test_extractable_means_wrappable_not_readable(proxy, session):
    label = unique("protect/extractable")
    proxy.hsm("access-server").GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token="access", algorithm=pb.AES_128,
        template=template(label, pb.ENCRYPT, extractable=True)), timeout=TIMEOUT)
    key = _object(session, label, ObjectClass.SECRET_KEY)
    assert key[Attribute.SENSITIVE] is True and key[Attribute.EXTRACTABLE] is True
    assert key[Attribute.NEVER_EXTRACTABLE] is False
    _value_unreadable(key)
