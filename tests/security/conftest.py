"""The world the attack suite runs in: a real proxy under the default policy of `cms dev up`.

Key management (identity key-mgmt) made the blocks in HSM2 and moved them to
HSM1 under a transport key that two custodians entered; a third ceremony made
the factory transport master. Every attempt of the suite goes through
``World.attempt``, which also scans what came back (response bytes, or the
error's message) for any protected key: a window of 16, 24 or 32 bytes whose
check value is a protected key's is confirmed against the token itself (with
the token PIN, as only a test may) and fails the test; the values the test
knows (the components it entered, the factory master, a card's keys, a known
R sealed in a cryptogram) must never appear at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from cardcore.diversify import diversify_key_set_software
from cardcore.kcv import kcv_zero_block
from cardcore.psd import psd_id_bytes
from cms import keynames
from cms.v1 import (
    card_keys_pb2_grpc,
    hsm_pb2_grpc,
    issuer_pb2_grpc,
    key_blocks_pb2_grpc,
    partners_pb2_grpc,
    provider_pb2_grpc,
)
from cms.v1 import hsm_pb2 as pb
from cms.v1 import issuer_pb2 as ipb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import partners_pb2 as rpb
from cms.v1 import provider_pb2 as ppb
from deploy.local import default_policy
from deploy.pki import CUSTODIANS
from tests.hsm_proxy.helpers import ceremony
from tests.support.hsm_proxy import TEST_IDENTITIES, ProxyEnv, ProxyProcess
from tests.support.scan import assert_absent
from tests.support.token import RawToken

TIMEOUT = 60
FACTORY_MASTER = bytes.fromhex("5A" * 16)
TRANSPORT = "transport/attack"
PSD_ID = "0102030405060708090A"
PROVIDER_ID = "attack-provider"
ROOT = keynames.provider_root_label(PROVIDER_ID)
ISSUER_KEY = keynames.issuer_key_label(1)
BUREAU_NAME, MAILER_NAME = "attack-bureau", "attack-mailer"
KEY_SIZES = (16, 24, 32)


@dataclass
class World:
    proxy: ProxyProcess
    env: ProxyEnv
    kcvs: dict[str, bytes] = field(default_factory=dict)       # label in HSM1 -> KCV
    known: dict[str, bytes] = field(default_factory=dict)      # what must never appear
    attempts: int = 0
    sealed_r: bytes = b""                                      # RSA-OAEP(cryptogram/1, R)
    root: bytes = b""                                          # the provider's root (DER)
    bureau: bytes = b""                                        # the bureau's certificate
    mailer: bytes = b""                                        # the mailer's public key

    def stub(self, identity: str, service: str) -> Any:
        channel = self.proxy.channel(identity)
        return {"Hsm": hsm_pb2_grpc.HsmStub, "CardKeys": card_keys_pb2_grpc.CardKeysStub,
                "KeyBlocks": key_blocks_pb2_grpc.KeyBlocksStub,
                "ProviderCa": provider_pb2_grpc.ProviderCaStub,
                "IssuerKeys": provider_pb2_grpc.IssuerKeysStub,
                "IssuerHsm": issuer_pb2_grpc.IssuerHsmStub,
                "BureauHsm": partners_pb2_grpc.BureauHsmStub,
                "MailerHsm": partners_pb2_grpc.MailerHsmStub}[service](channel)

    def attempt(self, identity: str, service: str, method: str, request: Any
                ) -> tuple[grpc.StatusCode, Any]:
        """Call ``service.method`` as ``identity``; scan and return (status, response)."""
        self.attempts += 1
        try:
            response = getattr(self.stub(identity, service), method)(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            self.scan(exc.details().encode(errors="replace"), f"{method} error")
            return exc.code(), None
        self.scan(response.SerializeToString(), method)
        return grpc.StatusCode.OK, response

    def refused(self, identity: str, service: str, method: str, request: Any,
                *codes: grpc.StatusCode) -> str:
        """The attempt must fail (by default with PERMISSION_DENIED); returns the message."""
        wanted = codes or (grpc.StatusCode.PERMISSION_DENIED,)
        try:
            response = getattr(self.stub(identity, service), method)(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            self.attempts += 1
            self.scan(exc.details().encode(errors="replace"), f"{method} error")
            assert exc.code() in wanted, (identity, method, exc.code(), exc.details())
            return exc.details()
        self.scan(response.SerializeToString(), method)
        raise AssertionError(f"{identity} {service}.{method} was not refused: {response}")

    def scan(self, blob: bytes, what: str) -> None:
        assert_absent(blob, self.known, what)
        by_kcv = {kcv: label for label, kcv in self.kcvs.items()}
        for size in KEY_SIZES:
            for offset in range(len(blob) - size + 1):
                window = blob[offset:offset + size]
                label = by_kcv.get(kcv_zero_block(window))
                if label is not None and self.confirm(label, window):
                    raise AssertionError(f"{what} returned the value of {label}")

    def confirm(self, label: str, candidate: bytes) -> bool:
        """Whether ``candidate`` is the value of HSM1's ``label``, beyond its 3-byte KCV."""
        from tests.hsm_proxy.helpers import aes_ecb

        block = os.urandom(16)
        return RawToken(self.env.hsm, keynames.HSM1_TOKEN).ecb(label, block) == aes_ecb(
            candidate, block)


def refuse_generic_uses(world: World, identity: str, token: str, label: str) -> None:
    """Every generic way to use, move or destroy the key ``label`` is refused to
    ``identity``: signing (alone and in a batch), ciphers, derivation, destruction, a
    transfer under a transport key, a card key set diversified from it."""
    import hashlib

    from cms.v1 import card_keys_pb2 as kpb

    ref = pb.KeyRef(token=token, label=label)
    world.refused(identity, "Hsm", "Sign", pb.SignRequest(
        key=ref, mechanism=pb.ECDSA, data=hashlib.sha256(b"anything").digest()))
    world.refused(identity, "Hsm", "SignBatch", pb.SignBatchRequest(items=[
        pb.SignRequest(key=ref, mechanism=pb.ECDSA_SHA256, data=b"anything")]))
    for method in ("Encrypt", "Decrypt"):
        world.refused(identity, "Hsm", method, pb.CipherRequest(
            key=ref, mechanism=pb.CIPHER_AES_ECB, data=bytes(16)))
    world.refused(identity, "Hsm", "DeriveKey", pb.DeriveKeyRequest(
        base_key=ref, mechanism=pb.AES_ECB_ENCRYPT_DATA, data=bytes(16),
        algorithm=pb.AES_128, template=pb.KeyTemplate(
            label="demo/derived-from", usages=[pb.ENCRYPT], session=True)))
    world.refused(identity, "Hsm", "DestroyKey", pb.DestroyKeyRequest(key=ref))
    world.refused(identity, "KeyBlocks", "TransferBlocks", bpb.TransferBlocksRequest(
        source_token=token, target_token=keynames.HSM1_TOKEN, transport_label=TRANSPORT,
        labels=[label]))
    world.refused(identity, "CardKeys", "DeriveKeySet", kpb.DeriveKeySetRequest(
        spec=kpb.KeySetSpec(token=token, key_length=16, diversified=kpb.Diversified(
            master_label=label, element=bytes(10)))))


def _provision(world: World) -> None:
    proxy = world.proxy
    km = world.stub("key-mgmt", "KeyBlocks")
    transport_value = os.urandom(16)
    done = ceremony(proxy, TRANSPORT, transport_value, starter="key-mgmt",
                    custodians=CUSTODIANS[:2])
    assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED
    world.known["transport key"] = transport_value
    done = ceremony(proxy, keynames.FACTORY_TRANSPORT_MASTER, FACTORY_MASTER,
                    role=pb.FACTORY_TRANSPORT_MASTER, starter="key-mgmt",
                    custodians=CUSTODIANS[1:])
    assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED
    world.known["factory transport master"] = FACTORY_MASTER
    card = diversify_key_set_software(FACTORY_MASTER, psd_id_bytes(PSD_ID), 16)
    world.known.update({"card ENC": card.enc, "card MAC": card.mac, "card DEK": card.dek})
    for label, role, algorithm in (("mk/1", pb.MK_BLOCK, pb.AES_128),
                                   ("mkrk/1", pb.MKRK_BLOCK, pb.AES_128),
                                   ("cryptogram/1", pb.CRYPTOGRAM_PAIR, pb.RSA_2048)):
        info = km.GenerateBlock(bpb.GenerateBlockRequest(token=keynames.HSM2_TOKEN, role=role,
                                                         label=label, algorithm=algorithm),
                                timeout=TIMEOUT)
        if role != pb.CRYPTOGRAM_PAIR:
            world.kcvs[label] = info.kcv
    km.TransferBlocks(bpb.TransferBlocksRequest(
        source_token=keynames.HSM2_TOKEN, target_token=keynames.HSM1_TOKEN,
        transport_label=TRANSPORT, labels=["mk/1", "mkrk/1", "cryptogram/1"]), timeout=TIMEOUT)
    # A known R, sealed to the cryptogram key as the access server seals each card's R:
    # no attempt may get it back.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.hashes import SHA1

    der = world.stub("admin", "Hsm").GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(
        token=keynames.HSM1_TOKEN, label="cryptogram/1")), timeout=TIMEOUT).public_key_der
    world.known["R"] = os.urandom(16)
    world.sealed_r = serialization.load_der_public_key(der).encrypt(  # type: ignore[union-attr]
        world.known["R"], padding.OAEP(mgf=padding.MGF1(SHA1()), algorithm=SHA1(),  # noqa: S303
                                       label=None))
    # Seed 004: the provider's root in its token, an issuer key in the issuer's.
    world.root = world.stub("provider", "ProviderCa").CreateRoot(
        ppb.CreateRootRequest(provider_id=PROVIDER_ID), timeout=TIMEOUT).certificate
    world.stub("admin", "IssuerKeys").CreateIssuerKey(ppb.CreateIssuerKeyRequest(version=1),
                                                      timeout=TIMEOUT)
    # Seed 004 part 2: the issuer's seed and the device authentication KEK.
    world.stub("admin", "IssuerHsm").CreateSeed(ipb.CreateSeedRequest(version=1),
                                                timeout=TIMEOUT)
    world.stub("admin", "IssuerHsm").CreateDeviceAuthKek(
        ipb.CreateDeviceAuthKekRequest(version=1), timeout=TIMEOUT)
    # Seed 004 B4: the bureau's keys and the mailing house's, each made by its owner.
    world.bureau = world.stub("bureau", "BureauHsm").CreateBureauKey(
        rpb.BureauKeyRequest(bureau=BUREAU_NAME), timeout=TIMEOUT).certificate
    world.mailer = world.stub("mailer", "MailerHsm").CreateMailerKey(
        rpb.MailerKeyRequest(mailer=MAILER_NAME), timeout=TIMEOUT).public_key


@pytest.fixture(scope="package")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    env = ProxyEnv.create(tmp_path_factory.mktemp("attacks"), tokens=keynames.TOKENS,
                          identities=(*TEST_IDENTITIES, *CUSTODIANS), policy=default_policy())
    with ProxyProcess(env) as proxy:
        made = World(proxy, env)
        _provision(made)
        yield made

