"""KeyBlocks through a real proxy: blocks, transfers, transport keys, ceremonies.

Happy paths with every landing checked (check values equal on both sides,
the class's attributes in the token), and bad input with clear statuses.
The attacks on these purposes are in tests/security.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from cardcore.kcv import kcv_zero_block
from cms.v1 import hsm_pb2 as pb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_blocks_pb2_grpc
from hsm_proxy.key_classes import Tag
from tests.hsm_proxy.helpers import TIMEOUT, ceremony, rpc_error, unique
from tests.support.token import RawToken

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
DENIED = grpc.StatusCode.PERMISSION_DENIED
_versions = iter(range(100, 10_000))


@pytest.fixture(scope="module")
def blocks(proxy) -> key_blocks_pb2_grpc.KeyBlocksStub:
    return key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel("access-server"))


@pytest.fixture(scope="module")
def transport(proxy) -> str:
    label = unique("transport/blocks")
    done = ceremony(proxy, label, os.urandom(16))
    assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED
    return label


def _custodian(proxy, name: str) -> key_blocks_pb2_grpc.KeyBlocksStub:
    return key_blocks_pb2_grpc.KeyBlocksStub(proxy.channel(name))


def _mk() -> str:
    return f"mk/{next(_versions)}"


def _generate(blocks, label: str, role: int = pb.MK_BLOCK, algorithm: int = pb.AES_128):
    return blocks.GenerateBlock(bpb.GenerateBlockRequest(token="kms", role=role, label=label,
                                                         algorithm=algorithm), timeout=TIMEOUT)


def _transfer(blocks, transport: str, *labels: str) -> bpb.TransferBlocksResponse:
    return blocks.TransferBlocks(bpb.TransferBlocksRequest(
        source_token="kms", target_token="access", transport_label=transport,
        labels=list(labels)), timeout=TIMEOUT)


def test_a_ceremony_combines_the_custodians_components_in_both_tokens(proxy, blocks):
    value = os.urandom(32)
    label = unique("transport/combined")
    done = ceremony(proxy, label, value, custodians=("custodian-1", "custodian-2",
                                                    "custodian-3"))
    assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED and done.received == 3
    assert list(done.contributors) == ["custodian-1", "custodian-2", "custodian-3"]
    assert done.started_by == "access-server"
    assert {k.token: k.kcv for k in done.kcvs} == {"kms": kcv_zero_block(value),
                                                   "access": kcv_zero_block(value)}
    listed = {(k.ref.token, k.label): k for token in ("kms", "access")
              for k in blocks.ListBlocks(bpb.ListBlocksRequest(
                  token=token, roles=[pb.TRANSPORT_KEY], label_pattern=label),
                  timeout=TIMEOUT).keys}
    wrapping, unwrapping = listed[("kms", label)], listed[("access", label)]
    assert wrapping.trusted and list(wrapping.usages) == [pb.WRAP]
    assert list(unwrapping.usages) == [pb.UNWRAP] and not unwrapping.trusted
    for key in (wrapping, unwrapping):
        assert key.origin == pb.CEREMONY and not key.conformance and not key.extractable
        assert key.kcv == kcv_zero_block(value)


def test_a_ceremony_refuses_a_wrong_component_and_keeps_waiting(proxy, blocks):
    begun = blocks.BeginCeremony(bpb.BeginCeremonyRequest(
        role=pb.TRANSPORT_KEY, label=unique("transport/waits"), algorithm=pb.AES_128,
        components=2, source_token="kms", target_token="access"), timeout=TIMEOUT)
    first, second = os.urandom(16), os.urandom(16)
    c1 = _custodian(proxy, "custodian-1")
    err = rpc_error(c1.AddComponent, bpb.AddComponentRequest(
        ceremony_id=begun.ceremony_id, component=first, kcv=kcv_zero_block(second)))
    assert err.code() == INVALID and "check value" in err.details()
    err = rpc_error(c1.AddComponent, bpb.AddComponentRequest(
        ceremony_id=begun.ceremony_id, component=os.urandom(32),
        kcv=kcv_zero_block(os.urandom(32))))
    assert err.code() == INVALID and "16 bytes" in err.details()
    status = blocks.GetCeremony(bpb.GetComponentCeremonyRequest(
        ceremony_id=begun.ceremony_id), timeout=TIMEOUT)
    assert status.state == bpb.COMPONENT_CEREMONY_AWAITING and status.received == 0
    # A wrong component does not use up the custodian's turn.
    step = c1.AddComponent(bpb.AddComponentRequest(
        ceremony_id=begun.ceremony_id, component=first, kcv=kcv_zero_block(first)),
        timeout=TIMEOUT)
    assert step.received == 1
    cancelled = blocks.CancelCeremony(bpb.GetComponentCeremonyRequest(
        ceremony_id=begun.ceremony_id), timeout=TIMEOUT)
    assert cancelled.state == bpb.COMPONENT_CEREMONY_CANCELLED
    err = rpc_error(_custodian(proxy, "custodian-2").AddComponent, bpb.AddComponentRequest(
        ceremony_id=begun.ceremony_id, component=second, kcv=kcv_zero_block(second)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "cancelled" in err.details()


@pytest.mark.parametrize(("request_", "code", "words"), [
    (bpb.BeginCeremonyRequest(role=pb.TRANSPORT_KEY, label="transport/one",
                              algorithm=pb.AES_128, components=1, source_token="kms",
                              target_token="access"), INVALID, "components"),
    (bpb.BeginCeremonyRequest(role=pb.FACTORY_TRANSPORT_MASTER,
                              label="factory/transport-master", algorithm=pb.AES_128,
                              components=2, source_token="kms", target_token="access"),
     INVALID, "target token only"),
    (bpb.BeginCeremonyRequest(role=pb.TRANSPORT_KEY, label="transport/same",
                              algorithm=pb.AES_128, components=2, source_token="access",
                              target_token="access"), INVALID, "source_token"),
    (bpb.BeginCeremonyRequest(role=pb.TRANSPORT_KEY, label="mk/5", algorithm=pb.AES_128,
                              components=2, source_token="kms", target_token="access"),
     DENIED, "mk-block"),
    (bpb.BeginCeremonyRequest(role=pb.MK_BLOCK, label="mk/5", algorithm=pb.AES_128,
                              components=2, source_token="kms", target_token="access"),
     INVALID, "role"),
    (bpb.BeginCeremonyRequest(role=pb.TRANSPORT_KEY, label="transport/rsa",
                              algorithm=pb.RSA_2048, components=2, source_token="kms",
                              target_token="access"), INVALID, "algorithm"),
    (bpb.GenerateBlockRequest(token="kms", role=pb.MK_BLOCK, label="mk/7",
                              algorithm=pb.RSA_2048), INVALID, "algorithm"),
    (bpb.GenerateBlockRequest(token="kms", role=pb.MK_BLOCK, label="mkrk/7",
                              algorithm=pb.AES_128), DENIED, "mkrk-block"),
    (bpb.GenerateBlockRequest(token="kms", role=pb.TRANSPORT_KEY, label="transport/g",
                              algorithm=pb.AES_128), INVALID, "role"),
    (bpb.GenerateBlockRequest(token="nosuch", role=pb.MK_BLOCK, label="mk/7",
                              algorithm=pb.AES_128), grpc.StatusCode.NOT_FOUND, "nosuch"),
    (bpb.TransferBlocksRequest(source_token="kms", target_token="access",
                               transport_label="transport/none", labels=[]), INVALID, "labels"),
    (bpb.TransferBlocksRequest(source_token="kms", target_token="kms",
                               transport_label="transport/none", labels=["mk/1"]),
     INVALID, "same token"),
    (bpb.GetComponentCeremonyRequest(ceremony_id="nope"), grpc.StatusCode.NOT_FOUND,
     "no ceremony"),
])
def test_bad_requests_get_clear_statuses(blocks, request_, code, words):
    method = {bpb.BeginCeremonyRequest: blocks.BeginCeremony,
              bpb.GenerateBlockRequest: blocks.GenerateBlock,
              bpb.TransferBlocksRequest: blocks.TransferBlocks,
              bpb.GetComponentCeremonyRequest: blocks.GetCeremony}[type(request_)]
    err = rpc_error(method, request_)
    assert err.code() == code, err.details()
    assert words in err.details()


def test_blocks_are_generated_once_and_transferred_once(blocks, transport):
    mk, pair = _mk(), f"cryptogram/{next(_versions)}"
    made = _generate(blocks, mk, algorithm=pb.AES_256)
    assert made.role == pb.MK_BLOCK and made.origin == pb.GENERATED and len(made.kcv) == 3
    assert made.wrap_with_trusted and made.extractable and not made.usages
    err = rpc_error(blocks.GenerateBlock, bpb.GenerateBlockRequest(
        token="kms", role=pb.MK_BLOCK, label=mk, algorithm=pb.AES_128))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    rsa = _generate(blocks, pair, role=pb.CRYPTOGRAM_PAIR, algorithm=pb.RSA_2048)
    assert rsa.key_class == pb.KEY_PAIR and rsa.kcv_method == pb.KCV_SPKI_SHA256
    moved = _transfer(blocks, transport, mk, pair)
    assert [(b.label, b.already_present) for b in moved.blocks] == [(mk, False), (pair, False)]
    assert moved.blocks[0].kcv_source == moved.blocks[0].kcv_target == made.kcv
    assert moved.blocks[1].kcv_source == moved.blocks[1].kcv_target == rsa.kcv
    again = _transfer(blocks, transport, mk, pair)
    assert all(b.already_present for b in again.blocks)
    there = {k.label: k for k in blocks.ListBlocks(bpb.ListBlocksRequest(
        token="access", roles=[pb.MK_BLOCK, pb.CRYPTOGRAM_PAIR]), timeout=TIMEOUT).keys}
    assert there[mk].origin == pb.TRANSFERRED and list(there[mk].usages) == [pb.DERIVE]
    assert there[mk].kcv == made.kcv and not there[mk].extractable
    assert there[pair].kcv == rsa.kcv and not there[pair].conformance
    err = rpc_error(blocks.TransferBlocks, bpb.TransferBlocksRequest(
        source_token="kms", target_token="access", transport_label=transport,
        labels=["mk/9999999"]))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_a_different_key_under_the_label_in_hsm1_is_never_overwritten(proxy, proxy_env,
                                                                      blocks, transport):
    mk = _mk()
    RawToken(proxy_env.hsm, "access").create_aes(
        mk, os.urandom(16), ["DERIVE"], tag=Tag(pb.MK_BLOCK, pb.TRANSFERRED).encode(),
        fixed=True)
    made = _generate(blocks, mk)
    err = rpc_error(blocks.TransferBlocks, bpb.TransferBlocksRequest(
        source_token="kms", target_token="access", transport_label=transport, labels=[mk]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another key" in err.details() and made.kcv.hex() in err.details()


def test_a_transport_key_over_rsa_oaep_lands_in_both_tokens(blocks):
    label = unique("transport/oaep")
    made = blocks.EstablishTransportKey(bpb.EstablishTransportRequest(
        source_token="kms", target_token="access", label=label, algorithm=pb.AES_256),
        timeout=TIMEOUT)
    assert len(made.kcv_source) == 3 and made.kcv_source == made.kcv_target
    halves = {token: blocks.ListBlocks(bpb.ListBlocksRequest(
        token=token, label_pattern=label), timeout=TIMEOUT).keys for token in ("kms", "access")}
    assert [k.label for k in halves["kms"]] == [label] == [k.label for k in halves["access"]]
    assert halves["kms"][0].trusted and halves["kms"][0].origin == pb.ESTABLISHED
    assert not halves["kms"][0].conformance and not halves["access"][0].conformance
    err = rpc_error(blocks.EstablishTransportKey, bpb.EstablishTransportRequest(
        source_token="kms", target_token="access", label=label, algorithm=pb.AES_256))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_ceremony_ends_when_the_officer_worker_restarts(proxy, blocks):
    begun = blocks.BeginCeremony(bpb.BeginCeremonyRequest(
        role=pb.TRANSPORT_KEY, label=unique("transport/lost"), algorithm=pb.AES_128,
        components=2, source_token="kms", target_token="access"), timeout=TIMEOUT)
    officer = max(proxy.worker_pids())       # started last
    os.kill(officer, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        status = blocks.GetCeremony(bpb.GetComponentCeremonyRequest(
            ceremony_id=begun.ceremony_id), timeout=TIMEOUT)
        if status.state != bpb.COMPONENT_CEREMONY_AWAITING:
            break
        assert time.monotonic() < deadline, "the ceremony outlived its worker"
        time.sleep(0.1)
    assert status.state == bpb.COMPONENT_CEREMONY_EXPIRED and "restarted" in status.problem
    part = os.urandom(16)
    err = rpc_error(_custodian(proxy, "custodian-1").AddComponent, bpb.AddComponentRequest(
        ceremony_id=begun.ceremony_id, component=part, kcv=kcv_zero_block(part)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in err.details()
    # The restarted officer runs the next ceremony.
    deadline = time.monotonic() + 30
    while len(proxy.worker_pids()) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    done = ceremony(proxy, unique("transport/after"), os.urandom(16))
    assert done.state == bpb.COMPONENT_CEREMONY_COMPLETED
