"""Every identity against every RPC of the proxy, compared with docs/threat-model.md.

Each RPC gets one representative request, valid for the purpose it serves, so
only the policy decides: a call counts as allowed when it is not refused with
PERMISSION_DENIED (an allowed call may still fail on its own merits, e.g. a
forged card answer). The documented matrix is the reference; a change of the
default policy that is not written down there fails this test, and so does a
documented permission the proxy does not give.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cardcore.psd import psd_id_bytes
from cms import keynames
from cms.v1 import (
    card_keys_pb2,
    hsm_pb2,
    issuer_pb2,
    key_blocks_pb2,
    partners_pb2,
    provider_pb2,
)
from cms.v1 import card_keys_pb2 as kpb
from cms.v1 import hsm_pb2 as pb
from cms.v1 import issuer_pb2 as ipb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import partners_pb2 as rpb
from cms.v1 import provider_pb2 as ppb
from deploy.pki import CUSTODIANS
from tests.security.conftest import (
    BUREAU_NAME,
    MAILER_NAME,
    PROVIDER_ID,
    PSD_ID,
    TRANSPORT,
    World,
)

pytestmark = pytest.mark.integration

HSM1, HSM2 = keynames.HSM1_TOKEN, keynames.HSM2_TOKEN
DOC = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"
IDENTITIES = ("access-server", "key-mgmt", "admin", *CUSTODIANS, "provider", "bureau",
              "mailer", "card-agent", "stranger")
COLUMNS = {"access-server": "access-server", "key-mgmt": "key-mgmt", "admin": "admin",
           **{c: "custodian-N" for c in CUSTODIANS}, "provider": "provider",
           "bureau": "bureau", "mailer": "mailer",
           "card-agent": "any other", "stranger": "any other"}
MODULES = (hsm_pb2, card_keys_pb2, key_blocks_pb2, provider_pb2, issuer_pb2, partners_pb2)
_serial = itertools.count(1000)
_issuer_version = itertools.count(100)


def _ref(label: str, token: str = HSM1) -> pb.KeyRef:
    return pb.KeyRef(token=token, label=label)


def _tpl(label: str, *usages: int, session: bool = False) -> pb.KeyTemplate:
    return pb.KeyTemplate(label=label, usages=list(usages), session=session)


def _unique(prefix: str) -> str:
    return f"{prefix}-{next(_serial)}"


def _forged_channel(item: bool = False) -> kpb.OpenSecureChannelRequest:
    return kpb.OpenSecureChannelRequest(
        key_set=kpb.KeySetSpec(token=HSM1, key_length=16, diversified=kpb.Diversified(
            master_label=keynames.FACTORY_TRANSPORT_MASTER, element=psd_id_bytes(PSD_ID))),
        kvn=0xFF, host_challenge=os.urandom(8),
        initialize_update_response=bytes(10) + b"\x00\x03\x70" + os.urandom(16) + bytes(3),
        security_level=0x33, predict_responses=item)


@pytest.fixture(scope="module")
def setup(world: World) -> dict[str, Any]:
    """Operator keys (made by admin) for the Hsm service's requests."""
    admin = world.stub("admin", "Hsm")
    keys = {"derive": "demo/matrix-derive", "cipher": "demo/matrix-cipher",
            "ec": "demo/matrix-ec"}
    admin.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token=HSM1, algorithm=pb.AES_128, template=_tpl(keys["derive"], pb.DERIVE)), timeout=60)
    admin.GenerateSecretKey(pb.GenerateSecretKeyRequest(
        token=HSM1, algorithm=pb.AES_128, template=_tpl(keys["cipher"], pb.ENCRYPT, pb.DECRYPT)),
        timeout=60)
    admin.GenerateKeyPair(pb.GenerateKeyPairRequest(
        token=HSM1, algorithm=pb.EC_P256, template=_tpl(keys["ec"], pb.SIGN)), timeout=60)
    keys["spki"] = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    keys["device"] = rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    keys["device_auth"] = world.stub("access-server", "IssuerHsm").GenerateDeviceAuthKeys(
        ipb.GenerateDeviceAuthKeysRequest(count=1, kek_version=1), timeout=60).keys[0]
    return keys


def _ceremony(world: World) -> str:
    return world.stub("key-mgmt", "KeyBlocks").BeginCeremony(bpb.BeginCeremonyRequest(
        role=pb.TRANSPORT_KEY, label=_unique("transport/matrix"), algorithm=pb.AES_128,
        components=3, source_token=HSM2, target_token=HSM1), timeout=60).ceremony_id


def _requests(world: World, keys: dict[str, Any]) -> dict[tuple[str, str], Callable[[], Any]]:
    def derive() -> pb.DeriveKeyRequest:
        return pb.DeriveKeyRequest(base_key=_ref(keys["derive"]),
                                   mechanism=pb.AES_ECB_ENCRYPT_DATA, data=os.urandom(16),
                                   algorithm=pb.AES_128,
                                   template=_tpl("demo/derived", pb.ENCRYPT, session=True))

    def cipher() -> pb.CipherRequest:
        return pb.CipherRequest(key=_ref(keys["cipher"]), mechanism=pb.CIPHER_AES_ECB,
                                data=bytes(16))

    def sign() -> pb.SignRequest:
        return pb.SignRequest(key=_ref(keys["ec"]), mechanism=pb.ECDSA, data=bytes(32))

    def doomed() -> pb.DestroyKeyRequest:
        label = _unique("demo/doomed")
        world.stub("admin", "Hsm").GenerateSecretKey(pb.GenerateSecretKeyRequest(
            token=HSM1, algorithm=pb.AES_128, template=_tpl(label, pb.ENCRYPT)), timeout=60)
        return pb.DestroyKeyRequest(key=_ref(label))

    def component() -> bpb.AddComponentRequest:
        from cardcore.kcv import kcv_zero_block

        part = os.urandom(16)
        return bpb.AddComponentRequest(ceremony_id=_ceremony(world), component=part,
                                       kcv=kcv_zero_block(part))

    return {
        ("Hsm", "ListTokens"): lambda: pb.ListTokensRequest(),
        ("Hsm", "ListKeys"): lambda: pb.ListKeysRequest(token=HSM1),
        ("Hsm", "GenerateSecretKey"): lambda: pb.GenerateSecretKeyRequest(
            token=HSM1, algorithm=pb.AES_128, template=_tpl(_unique("demo/s"), pb.ENCRYPT)),
        ("Hsm", "GenerateKeyPair"): lambda: pb.GenerateKeyPairRequest(
            token=HSM1, algorithm=pb.EC_P256, template=_tpl(_unique("demo/p"), pb.SIGN)),
        ("Hsm", "DeriveKey"): derive,
        ("Hsm", "DeriveKeyBatch"): lambda: pb.DeriveKeyBatchRequest(items=[derive()]),
        ("Hsm", "ImportPublicKey"): lambda: pb.ImportPublicKeyRequest(
            token=HSM1, public_key_der=keys["spki"], label=_unique("demo/i"),
            usages=[pb.VERIFY]),
        ("Hsm", "Encrypt"): cipher,
        ("Hsm", "Decrypt"): cipher,
        ("Hsm", "EncryptBatch"): lambda: pb.CipherBatchRequest(items=[cipher()]),
        ("Hsm", "Sign"): sign,
        ("Hsm", "SignBatch"): lambda: pb.SignBatchRequest(items=[sign()]),
        ("Hsm", "Verify"): lambda: pb.VerifyRequest(key=_ref(keys["ec"]), mechanism=pb.ECDSA,
                                                    data=bytes(32), signature=bytes(64)),
        ("Hsm", "GenerateRandom"): lambda: pb.GenerateRandomRequest(token=HSM1, length=16),
        ("Hsm", "GetPublicKey"): lambda: pb.GetPublicKeyRequest(key=_ref("cryptogram/1")),
        ("Hsm", "GetKeyAttributes"): lambda: pb.GetKeyAttributesRequest(key=_ref("mk/1")),
        ("Hsm", "DestroyKey"): doomed,
        ("Hsm", "ReleaseHandles"): lambda: pb.ReleaseHandlesRequest(handles=["h0.none"]),
        ("CardKeys", "DeriveKeySet"): lambda: kpb.DeriveKeySetRequest(
            spec=_forged_channel().key_set),
        ("CardKeys", "OpenSecureChannel"): _forged_channel,
        ("CardKeys", "OpenSecureChannelBatch"): lambda: kpb.OpenSecureChannelBatchRequest(
            items=[_forged_channel(item=True)]),
        ("CardKeys", "WrapCommands"): lambda: kpb.WrapCommandsRequest(channel="h0.none"),
        ("CardKeys", "UnwrapResponses"): lambda: kpb.UnwrapResponsesRequest(channel="h0.none"),
        ("KeyBlocks", "GenerateBlock"): lambda: bpb.GenerateBlockRequest(
            token=HSM2, role=pb.MK_BLOCK, label=f"mk/{next(_serial)}", algorithm=pb.AES_128),
        ("KeyBlocks", "ListBlocks"): lambda: bpb.ListBlocksRequest(token=HSM1),
        ("KeyBlocks", "TransferBlocks"): lambda: bpb.TransferBlocksRequest(
            source_token=HSM2, target_token=HSM1, transport_label=TRANSPORT, labels=["mk/1"]),
        ("KeyBlocks", "EstablishTransportKey"): lambda: bpb.EstablishTransportRequest(
            source_token=HSM2, target_token=HSM1, label=_unique("transport/est"),
            algorithm=pb.AES_128),
        ("KeyBlocks", "BeginCeremony"): lambda: bpb.BeginCeremonyRequest(
            role=pb.TRANSPORT_KEY, label=_unique("transport/begun"), algorithm=pb.AES_128,
            components=2, source_token=HSM2, target_token=HSM1),
        ("KeyBlocks", "AddComponent"): component,
        ("KeyBlocks", "GetCeremony"): lambda: bpb.GetComponentCeremonyRequest(
            ceremony_id=_ceremony(world)),
        ("KeyBlocks", "CancelCeremony"): lambda: bpb.GetComponentCeremonyRequest(
            ceremony_id=_ceremony(world)),
        ("ProviderCa", "CreateRoot"): lambda: ppb.CreateRootRequest(
            provider_id=_unique("matrix")),
        ("ProviderCa", "GetRoot"): lambda: ppb.GetRootRequest(provider_id=PROVIDER_ID),
        ("ProviderCa", "IssueCardCertificates"): lambda: ppb.IssueCardCertificatesRequest(
            provider_id=PROVIDER_ID, cards=[ppb.CardPublicKeys(
                serial=_unique("CARD"), device_public_key=keys["device"],
                issuer_auth_public_key=keys["spki"])]),
        ("ProviderCa", "SignPack"): lambda: ppb.SignPackRequest(
            provider_id=PROVIDER_ID, pack_serial="P-1", sha256=bytes(32)),
        ("IssuerKeys", "CreateIssuerKey"): lambda: ppb.CreateIssuerKeyRequest(
            version=next(_issuer_version)),
        ("IssuerKeys", "GetIssuerKey"): lambda: ppb.GetIssuerKeyRequest(version=1),
        ("IssuerHsm", "CreateSeed"): lambda: ipb.CreateSeedRequest(version=next(_issuer_version)),
        ("IssuerHsm", "CreateDeviceAuthKek"): lambda: ipb.CreateDeviceAuthKekRequest(
            version=next(_issuer_version)),
        ("IssuerHsm", "GenerateDeviceAuthKeys"): lambda: ipb.GenerateDeviceAuthKeysRequest(
            count=1, kek_version=1),
        ("IssuerHsm", "SignWithDeviceAuthKey"): lambda: ipb.SignWithDeviceAuthKeyRequest(
            key=keys["device_auth"], challenge=os.urandom(16), serial="MATRIX-1"),
        ("IssuerHsm", "IssueBatch"): lambda: ipb.IssueBatchRequest(
            seed_version=1, issuer_key_version=1, items=[ipb.IssueItem(
                serial=_unique("CARD"), device_public_key=keys["device"], derivation_element=1,
                device_auth_public_key=keys["device_auth"].public_key,
                issuance_id=os.urandom(16), sequence=1)]),
        ("IssuerHsm", "SignIssuerFile"): lambda: ipb.SignIssuerFileRequest(
            issuer_key_version=1, purpose="matrix", sha256=bytes(32)),
        ("BureauHsm", "CreateBureauKey"): lambda: rpb.BureauKeyRequest(
            bureau=_unique("matrix")),
        ("BureauHsm", "GetBureauCertificate"): lambda: rpb.BureauKeyRequest(
            bureau=BUREAU_NAME),
        ("BureauHsm", "SignBureauFile"): lambda: rpb.SignBureauFileRequest(
            bureau=BUREAU_NAME, purpose="matrix", sha256=bytes(32)),
        ("BureauHsm", "SealCardCodes"): lambda: rpb.SealCardCodesRequest(
            bureau=BUREAU_NAME, file_serial=bytes(16), serial="MATRIX-1",
            device_public_key=keys["device"], challenge=bytes(16),
            mailer_public_key=world.mailer),
        ("MailerHsm", "CreateMailerKey"): lambda: rpb.MailerKeyRequest(
            mailer=_unique("matrix")),
        ("MailerHsm", "GetMailerKey"): lambda: rpb.MailerKeyRequest(mailer=MAILER_NAME),
        ("MailerHsm", "SignMailerFile"): lambda: rpb.SignMailerFileRequest(
            mailer=MAILER_NAME, purpose="matrix", sha256=bytes(32)),
        ("MailerHsm", "OpenMailerData"): lambda: rpb.OpenMailerDataRequest(
            mailer=MAILER_NAME, serial="MATRIX-1", mailer_data=bytes(256)),
    }


def _every_rpc() -> set[tuple[str, str]]:
    out = set()
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            out.update((service.name, m.name) for m in service.methods)
    return out


def documented() -> dict[tuple[str, str], dict[str, bool]]:
    """The matrix in docs/threat-model.md: {(service, rpc): {column: allowed}}."""
    text = DOC.read_text()
    block = text.split("<!-- rpc-matrix -->")[1]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    out = {}
    for line in rows[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        match = re.fullmatch(r"`(\w+)\.(\w+)`", cells[0])
        assert match, f"not an RPC cell: {cells[0]!r}"
        out[(match.group(1), match.group(2))] = {
            column: cell == "yes" for column, cell in zip(header[1:], cells[1:], strict=True)}
    return out


def test_the_documented_matrix_names_every_rpc() -> None:
    assert set(documented()) == _every_rpc()


def test_every_identity_gets_exactly_the_documented_rpcs(world: World, setup) -> None:
    doc = documented()
    requests = _requests(world, setup)
    assert set(requests) == _every_rpc()
    wrong = []
    for (service, method), make in sorted(requests.items()):
        for identity in IDENTITIES:
            code, _ = world.attempt(identity, service, method, make())
            allowed = code != grpc.StatusCode.PERMISSION_DENIED
            if allowed != doc[(service, method)][COLUMNS[identity]]:
                wrong.append(f"{identity} {service}.{method}: {code.name}")
    assert not wrong, "policy and docs/threat-model.md disagree:\n" + "\n".join(wrong)


def test_no_service_identity_has_a_wildcard_operation() -> None:
    from deploy.local import default_policy

    for identity, rules in default_policy()["identities"].items():
        for rule in rules:
            assert "*" not in rule["operations"], identity
