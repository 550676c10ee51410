"""Key management end to end: blocks generated in HSM2, a transport key from custodians'
components (each entered straight to the proxy under the custodian's own certificate)
and one over RSA-OAEP, the transfer to HSM1, and flow A running on what arrived, through
the real processes of `cms dev up` (proxy, key management, access server) over mutual
TLS on SoftHSM2 tokens."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import grpc
import pytest

from access_server.store import Store
from card_agent.session import AgentInfo
from cardcore.kcv import kcv_zero_block
from cms.runtime.client import load_endpoints
from cms.v1 import access_pb2 as apb
from cms.v1 import access_pb2_grpc, hsm_pb2_grpc, key_blocks_pb2_grpc, key_mgmt_pb2_grpc
from cms.v1 import card_channel_pb2 as cpb
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_mgmt_pb2 as pb
from tests.support.card_keys import reproduces_card_keys
from tests.support.contacts import contact
from tests.support.launcher import cms, dev_stack
from virtual_psd.factory import create_card
from virtual_psd.isd import isd_state
from virtual_psd.state import load_state

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TRANSPORT_MASTER = bytes.fromhex("404142434445464748494A4B4C4D4E4F")
STATION = AgentInfo(role=cpb.PERSONALIZATION_STATION, label="station")
USER = AgentInfo(role=cpb.USER_PC, label="pc")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


class Stack:
    def __init__(self, endpoints_path: Path) -> None:
        self.path = endpoints_path
        eps = load_endpoints(endpoints_path)
        self.keys = key_mgmt_pb2_grpc.KeyManagementStub(eps.channel("key_mgmt", "admin"))
        self.hsm = hsm_pb2_grpc.HsmStub(eps.channel("hsm_proxy", "admin"))
        self.registry = access_pb2_grpc.PsdRegistryStub(eps.channel("access_server", "admin"))
        self.campaigns = access_pb2_grpc.CampaignsStub(eps.channel("access_server", "admin"))
        self.components: list[bytes] = []

    def attrs(self, token: str, label: str, key_class: int = 0) -> hpb.KeyInfo:
        return self.hsm.GetKeyAttributes(hpb.GetKeyAttributesRequest(
            key=hpb.KeyRef(token=token, label=label), key_class=key_class), timeout=30)

    def custodian(self, name: str) -> key_blocks_pb2_grpc.KeyBlocksStub:
        """A custodian's own client of the proxy (components never go to key management)."""
        return key_blocks_pb2_grpc.KeyBlocksStub(load_endpoints(self.path).channel(
            "hsm_proxy", name))

    def add(self, name: str, ceremony_id: str, part: bytes, kcv: bytes | None = None
            ) -> bpb.ComponentCeremony:
        return self.custodian(name).AddComponent(bpb.AddComponentRequest(
            ceremony_id=ceremony_id, component=part,
            kcv=kcv_zero_block(part) if kcv is None else kcv), timeout=30)

    def ceremony(self, label: str, key: bytes, custodians: list[str], **kw) -> pb.Ceremony:
        """A ceremony whose components XOR to ``key`` (the test must know it to compare)."""
        parts = [os.urandom(len(key)) for _ in custodians[1:]]
        first = key
        for p in parts:
            first = _xor(first, p)
        parts.insert(0, first)
        self.components += parts
        c = self.keys.StartCeremony(pb.StartCeremonyRequest(
            label=label, components=len(custodians), **kw), timeout=30)
        for name, part in zip(custodians, parts, strict=True):
            self.add(name, c.ceremony_id, part)
        return self.keys.GetCeremony(pb.GetCeremonyRequest(ceremony_id=c.ceremony_id),
                                     timeout=30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    directory = tmp_path_factory.mktemp("key-mgmt")
    with dev_stack(directory) as endpoints_path:
        yield Stack(endpoints_path)


@pytest.fixture(scope="module")
def blocks(stack: Stack) -> dict[str, pb.KeyBlock]:
    made = {}
    for kind, algorithm in ((pb.MK, pb.BLOCK_AES_128), (pb.MK, pb.BLOCK_AES_256),
                            (pb.MKRK, 0), (pb.CRYPTOGRAM_KEY_PAIR, 0)):
        block = stack.keys.CreateKeyBlock(pb.CreateKeyBlockRequest(kind=kind,
                                                                   algorithm=algorithm),
                                          timeout=120)
        made[block.label] = block
    return made


@pytest.fixture(scope="module")
def transport(stack: Stack) -> str:
    key = os.urandom(16)
    c = stack.ceremony("transport/2026-12", key, ["custodian-1", "custodian-2", "custodian-3"])
    assert c.state == pb.CEREMONY_COMPLETED
    return "transport/2026-12"


def test_blocks_are_versioned_sensitive_and_only_wrappable_in_hsm2(
        stack: Stack, blocks: dict[str, pb.KeyBlock]) -> None:
    assert sorted(blocks) == ["cryptogram/1", "mk/1", "mk/2", "mkrk/1"]
    assert blocks["mk/2"].algorithm == pb.BLOCK_AES_256
    assert all(len(b.kcv) == 3 and not b.in_hsm1 for b in blocks.values())
    for label in ("mk/1", "mk/2", "mkrk/1"):
        info = stack.attrs("kms", label)
        assert info.sensitive and info.extractable and info.local and info.kcv == blocks[label].kcv
        # Extractable only under a trusted key, usable for nothing, and fixed for good.
        assert info.wrap_with_trusted and not info.usages
        assert not info.modifiable and not info.copyable and not info.conformance
        assert (info.role, info.origin) == ({"mk": hpb.MK_BLOCK, "mkrk": hpb.MKRK_BLOCK}[
            label.split("/")[0]], hpb.GENERATED)
    private = stack.attrs("kms", "cryptogram/1", hpb.PRIVATE_KEY)
    assert private.sensitive and private.extractable and private.wrap_with_trusted
    assert not private.usages and private.role == hpb.CRYPTOGRAM_PAIR
    listed = stack.keys.ListKeyBlocks(pb.ListKeyBlocksRequest(kind=pb.MK), timeout=30).blocks
    assert [b.label for b in listed] == ["mk/1", "mk/2"]


def test_ceremony_checks_each_component_and_each_custodian(stack: Stack) -> None:
    key = os.urandom(16)
    first = os.urandom(16)
    second = _xor(key, first)
    c = stack.keys.StartCeremony(pb.StartCeremonyRequest(label="transport/checked",
                                                         components=2), timeout=30)
    assert c.state == pb.CEREMONY_AWAITING_COMPONENTS and c.components_needed == 2
    with pytest.raises(grpc.RpcError) as wrong:
        stack.add("custodian-1", c.ceremony_id, first, kcv_zero_block(second))
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "check value" in wrong.value.details()
    entered = stack.add("custodian-1", c.ceremony_id, first)
    assert entered.received == 1 and list(entered.contributors) == ["custodian-1"]
    c = stack.keys.GetCeremony(pb.GetCeremonyRequest(ceremony_id=c.ceremony_id), timeout=30)
    assert c.components_received == 1 and list(c.custodians) == ["custodian-1"]
    with pytest.raises(grpc.RpcError) as twice:
        stack.add("custodian-1", c.ceremony_id, second)
    assert twice.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "different custodian" in twice.value.details()
    # Key management began it: it may not enter a component itself.
    km = key_blocks_pb2_grpc.KeyBlocksStub(load_endpoints(stack.path).channel("hsm_proxy",
                                                                              "key-mgmt"))
    with pytest.raises(grpc.RpcError) as starter:
        km.AddComponent(bpb.AddComponentRequest(ceremony_id=c.ceremony_id, component=second,
                                                kcv=kcv_zero_block(second)), timeout=30)
    assert starter.value.code() == grpc.StatusCode.PERMISSION_DENIED
    stack.add("custodian-2", c.ceremony_id, second)
    c = stack.keys.GetCeremony(pb.GetCeremonyRequest(ceremony_id=c.ceremony_id), timeout=30)
    stack.components += [first, second]
    assert c.state == pb.CEREMONY_COMPLETED
    assert list(c.custodians) == ["custodian-1", "custodian-2"]
    # The same key in both HSMs, and it is the XOR of the components.
    assert {k.token: k.kcv for k in c.kcvs} == {"kms": kcv_zero_block(key),
                                                 "access": kcv_zero_block(key)}
    wrapping = stack.attrs("kms", "transport/checked")
    assert wrapping.trusted and list(wrapping.usages) == [hpb.WRAP]
    unwrapping = stack.attrs("access", "transport/checked")
    assert not unwrapping.trusted and list(unwrapping.usages) == [hpb.UNWRAP]
    for info in (wrapping, unwrapping):
        assert info.sensitive and not info.extractable and not info.modifiable
        assert info.origin == hpb.CEREMONY and not info.conformance
    labels = {t.label: t for t in stack.keys.ListTransportKeys(
        pb.ListTransportKeysRequest(), timeout=30).keys}
    assert labels["transport/checked"].method == "components"
    # A finished ceremony takes no more components.
    with pytest.raises(grpc.RpcError) as done:
        stack.add("custodian-3", c.ceremony_id, first)
    assert done.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_transfer_lands_sensitive_non_extractable_keys_in_hsm1_once(
        stack: Stack, blocks: dict[str, pb.KeyBlock], transport: str) -> None:
    labels = ["mk/1", "mk/2", "mkrk/1", "cryptogram/1"]
    reply = stack.keys.TransferKeyBlocks(pb.TransferKeyBlocksRequest(
        transport_label=transport, labels=labels), timeout=120)
    assert [b.label for b in reply.blocks] == labels
    for b in reply.blocks:
        assert not b.already_present and b.kcv_hsm1 == b.kcv_hsm2 == blocks[b.label].kcv
    for label in ("mk/1", "mk/2", "mkrk/1"):
        info = stack.attrs("access", label)
        assert info.sensitive and not info.extractable and not info.local
        assert list(info.usages) == [hpb.DERIVE] and info.kcv == blocks[label].kcv
        assert info.origin == hpb.TRANSFERRED and not info.modifiable and not info.conformance
    private = stack.attrs("access", "cryptogram/1", hpb.PRIVATE_KEY)
    assert private.sensitive and not private.extractable and list(private.usages) == [hpb.DECRYPT]
    public = stack.attrs("access", "cryptogram/1", hpb.PUBLIC_KEY)
    assert list(public.usages) == [hpb.ENCRYPT] and public.origin == hpb.TRANSFERRED
    kms_der = stack.hsm.GetPublicKey(hpb.GetPublicKeyRequest(
        key=hpb.KeyRef(token="kms", label="cryptogram/1")), timeout=30).public_key_der
    access_der = stack.hsm.GetPublicKey(hpb.GetPublicKeyRequest(
        key=hpb.KeyRef(token="access", label="cryptogram/1")), timeout=30).public_key_der
    assert kms_der == access_der
    # Nothing in HSM1 can be moved out again, not even by key management: a transfer
    # takes generated blocks only, and HSM1's transport half only unwraps.
    km = key_blocks_pb2_grpc.KeyBlocksStub(load_endpoints(stack.path).channel("hsm_proxy",
                                                                              "key-mgmt"))
    with pytest.raises(grpc.RpcError) as out:
        km.TransferBlocks(bpb.TransferBlocksRequest(source_token="access", target_token="kms",
                                                    transport_label=transport,
                                                    labels=["mk/1"]), timeout=30)
    assert out.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Again: idempotent.
    again = stack.keys.TransferKeyBlocks(pb.TransferKeyBlocksRequest(
        transport_label=transport, labels=labels), timeout=120)
    assert all(b.already_present for b in again.blocks)
    listed = stack.keys.ListKeyBlocks(pb.ListKeyBlocksRequest(), timeout=30).blocks
    assert all(b.in_hsm1 for b in listed)


def test_rsa_oaep_transport_key_matches_in_both_hsms_and_leaves_no_import_key(
        stack: Stack) -> None:
    t = stack.keys.EstablishTransportKey(pb.EstablishTransportKeyRequest(
        label="transport/oaep"), timeout=120)
    assert t.method == "rsa-oaep" and len(t.kcv_hsm2) == 3 and t.kcv_hsm1 == t.kcv_hsm2
    in_hsm1 = stack.attrs("access", "transport/oaep")
    assert in_hsm1.sensitive and not in_hsm1.extractable and list(in_hsm1.usages) == [hpb.UNWRAP]
    in_hsm2 = stack.attrs("kms", "transport/oaep")
    assert in_hsm2.trusted and not in_hsm2.extractable and list(in_hsm2.usages) == [hpb.WRAP]
    for info in (in_hsm1, in_hsm2):
        assert info.origin == hpb.ESTABLISHED and not info.modifiable and not info.conformance
    # The import keys were session objects: only the two halves remain.
    for token in ("kms", "access"):
        keys = stack.hsm.ListKeys(hpb.ListKeysRequest(token=token, label_pattern="*"),
                                  timeout=30).keys
        assert all(k.label.startswith(("mk/", "mkrk/", "cryptogram/", "transport/", "factory/",
                                       "audit/")) for k in keys)
    with pytest.raises(grpc.RpcError) as dup:
        stack.keys.EstablishTransportKey(pb.EstablishTransportKeyRequest(
            label="transport/oaep"), timeout=60)
    assert dup.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_flow_a_runs_on_transferred_blocks_and_a_factory_master_from_a_ceremony(
        stack: Stack, blocks: dict[str, pb.KeyBlock], transport: str, tmp_path: Path) -> None:
    stack.keys.TransferKeyBlocks(pb.TransferKeyBlocksRequest(
        transport_label=transport, labels=list(blocks)), timeout=120)
    c = stack.ceremony("factory/transport-master", TRANSPORT_MASTER,
                       ["custodian-2", "custodian-3"], purpose=pb.TRANSPORT_MASTER)
    assert [k.token for k in c.kcvs] == ["access"]
    assert c.kcvs[0].kcv == kcv_zero_block(TRANSPORT_MASTER)
    card = tmp_path / "card.json"
    psd_id = create_card(card, transport_master=TRANSPORT_MASTER).psd_id
    stack.registry.RegisterPsds(apb.RegisterPsdsRequest(psd_ids=[psd_id]), timeout=30)
    report = contact(stack.path, card, STATION)
    assert report.done.outcome == cpb.SessionDone.OK, report.done.message
    psd = stack.registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert (psd.mk_version, psd.mkrk_version) == (2, 1)     # the newest blocks HSM1 holds
    # Replace the AES-256 block's card keys with the AES-128 block's.
    stack.campaigns.StartCampaign(apb.StartCampaignRequest(
        from_mk_version=2, to_mk_version=1, filter=apb.CampaignFilter(psd_ids=[psd_id])),
        timeout=30)
    report = contact(stack.path, card, USER)
    assert report.done.outcome == cpb.SessionDone.OK, report.done.message
    assert set(isd_state(load_state(card)).key_sets) == {0x70, 0x01}
    psd = stack.registry.GetPsd(apb.GetPsdRequest(psd_id=psd_id), timeout=30)
    assert psd.mk_version == 1 and psd.state == apb.PSD_ACTIVE
    store = Store.from_url(f"sqlite:///{stack.path.parent / 'data' / 'access.db'}")
    try:
        stored = store.get_cryptogram(psd_id)
    finally:
        store.close()
    assert stored.key_label == "cryptogram/1"
    assert reproduces_card_keys(stack.path, card, psd_id, mk_version=1,
                                cryptogram=stored.ciphertext)


@pytest.mark.parametrize(("request_", "code", "words"), [
    (pb.CreateKeyBlockRequest(kind=pb.TRANSPORT_MASTER), grpc.StatusCode.INVALID_ARGUMENT,
     "ceremony"),
    (pb.CreateKeyBlockRequest(kind=pb.MK, algorithm=pb.BLOCK_RSA_2048),
     grpc.StatusCode.INVALID_ARGUMENT, "AES_128 or AES_256"),
    (pb.CreateKeyBlockRequest(kind=pb.CRYPTOGRAM_KEY_PAIR, algorithm=pb.BLOCK_AES_128),
     grpc.StatusCode.INVALID_ARGUMENT, "RSA_2048 or RSA_3072"),
    (pb.StartCeremonyRequest(label="transport/one", components=1),
     grpc.StatusCode.INVALID_ARGUMENT, "2 to 9"),
    (pb.StartCeremonyRequest(label="mk/7", components=2), grpc.StatusCode.INVALID_ARGUMENT,
     "transport/NAME"),
    (pb.GetCeremonyRequest(ceremony_id="nope"), grpc.StatusCode.NOT_FOUND, "no ceremony"),
    (pb.TransferKeyBlocksRequest(transport_label="transport/none", labels=["mk/1"]),
     grpc.StatusCode.NOT_FOUND, "no transport key"),
    (pb.EstablishTransportKeyRequest(label="transport/x", algorithm=pb.BLOCK_RSA_2048),
     grpc.StatusCode.INVALID_ARGUMENT, "AES_128 or AES_256"),
])
def test_bad_requests_get_clear_statuses(stack: Stack, request_, code, words: str) -> None:
    method = {pb.CreateKeyBlockRequest: stack.keys.CreateKeyBlock,
              pb.StartCeremonyRequest: stack.keys.StartCeremony,
              pb.GetCeremonyRequest: stack.keys.GetCeremony,
              pb.TransferKeyBlocksRequest: stack.keys.TransferKeyBlocks,
              pb.EstablishTransportKeyRequest: stack.keys.EstablishTransportKey}[type(request_)]
    with pytest.raises(grpc.RpcError) as err:
        method(request_, timeout=30)
    assert err.value.code() == code
    assert words in err.value.details()


def test_transfer_of_an_unknown_block_changes_nothing(stack: Stack, transport: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stack.keys.TransferKeyBlocks(pb.TransferKeyBlocksRequest(
            transport_label=transport, labels=["mk/99"]), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    keys = stack.hsm.ListKeys(hpb.ListKeysRequest(token="access", label_pattern="mk/99"),
                              timeout=30).keys
    assert not keys


def test_only_admin_changes_keys_and_the_card_agent_reads_nothing(stack: Stack) -> None:
    eps = load_endpoints(stack.path)
    agent = key_mgmt_pb2_grpc.KeyManagementStub(eps.channel("key_mgmt", "card-agent"))
    with pytest.raises(grpc.RpcError) as err:
        agent.ListKeyBlocks(pb.ListKeyBlocksRequest(), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    access = key_mgmt_pb2_grpc.KeyManagementStub(eps.channel("key_mgmt", "access-server"))
    access.ListKeyBlocks(pb.ListKeyBlocksRequest(), timeout=30)
    with pytest.raises(grpc.RpcError) as err:
        access.CreateKeyBlock(pb.CreateKeyBlockRequest(kind=pb.MK), timeout=30)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_cli_reports_bad_input_in_one_line(stack: Stack, tmp_path: Path) -> None:
    eps = ["keys", "--endpoints", str(stack.path)]
    done = cms(*eps, "transfer", "--transport", "transport/none", "mk/1", check=False)
    assert done.returncode == 1 and "NOT_FOUND" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.hex"
    bad.write_text("not hex")
    done = cms(*eps, "ceremony", "submit", "x", "--custodian", "a", "--component-file",
               str(bad), "--kcv", "000000", check=False)
    assert done.returncode == 1 and "not hexadecimal" in done.stderr
    listed = cms(*eps, "list")
    assert "mk/1" in listed.stdout and "LABEL" in listed.stdout


def test_custodians_run_a_ceremony_with_the_cli(stack: Stack, tmp_path: Path) -> None:
    eps = ["keys", "--endpoints", str(stack.path)]
    sheets = []
    for name in ("c1", "c2"):
        sheet = tmp_path / f"{name}.hex"
        made = cms(*eps, "ceremony", "new-component", "--out", str(sheet))
        assert oct(sheet.stat().st_mode & 0o777) == "0o600"
        component = bytes.fromhex(sheet.read_text().strip())
        assert len(component) == 16 and kcv_zero_block(component).hex() in made.stdout
        assert component.hex() not in made.stdout
        sheets.append((sheet, component))
    again = cms(*eps, "ceremony", "new-component", "--out", str(sheets[0][0]), check=False)
    assert again.returncode == 1 and "never overwritten" in again.stderr
    started = cms(*eps, "ceremony", "start", "transport/by-cli", "--components", "2").stdout
    ceremony_id = started.split()[1]
    for custodian, (sheet, component) in zip(("custodian-1", "custodian-2"), sheets,
                                             strict=True):
        out = cms(*eps, "ceremony", "submit", ceremony_id, "--custodian", custodian,
                  "--component-file", str(sheet), "--kcv", kcv_zero_block(component).hex())
    key = _xor(sheets[0][1], sheets[1][1])
    assert "completed  2/2 components (entered by custodian-2)" in out.stdout
    assert f"kcv in kms: {kcv_zero_block(key).hex()}" in out.stdout
    assert f"kcv in access: {kcv_zero_block(key).hex()}" in out.stdout
    status = cms(*eps, "ceremony", "status", ceremony_id).stdout
    assert "completed" in status and "custodians: custodian-1, custodian-2" in status
    listed = cms(*eps, "transports").stdout
    assert "transport/by-cli  components" in listed
    stack.components += [component for _, component in sheets]


def test_no_component_or_key_appears_in_records_or_logs(
        stack: Stack, blocks: dict[str, pb.KeyBlock], transport: str) -> None:
    secrets = [c for c in stack.components if c] + [TRANSPORT_MASTER]
    assert secrets
    directory = stack.path.parent
    haystacks: list[bytes] = []
    for path in [*directory.glob("data/*.db*"), *directory.glob("logs/*.log"),
                 *directory.glob("audit/*")]:
        haystacks.append(path.read_bytes())
    rows = sqlite3.connect(directory / "data" / "key-mgmt.db").execute(
        "select * from events").fetchall()
    assert rows, "key management recorded nothing"
    haystacks.append(repr(rows).encode())
    for secret in secrets:
        for form in (secret, secret.hex().encode(), secret.hex().upper().encode()):
            assert not any(form in h for h in haystacks)

