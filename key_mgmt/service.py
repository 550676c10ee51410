"""The KeyManagement gRPC service: a thin layer over ``key_mgmt.core``.

Who may call: ``admin`` (the operator) creates blocks, starts ceremonies and
transfers; ``admin`` and ``access-server`` may list. Custodians enter their
components straight to the HSM proxy, never here. No response carries key
material: labels, versions and check values only.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from cms.runtime.errors import InvalidArgument, enum_filter, guard
from cms.runtime.tls import caller
from cms.v1 import key_mgmt_pb2 as pb
from cms.v1 import key_mgmt_pb2_grpc
from key_mgmt.core import CRYPTOGRAM, FACTORY_MASTER, MK, MKRK, TRANSPORT, KeyManager
from key_mgmt.store import (
    CEREMONY_AWAITING,
    CEREMONY_CANCELLED,
    CEREMONY_COMPLETED,
    CEREMONY_EXPIRED,
    CEREMONY_FAILED,
    BlockRecord,
    CeremonyRecord,
    TransportRecord,
)

WRITERS = frozenset({"admin"})
READERS = WRITERS | {"access-server"}

KIND_FROM_PB = {pb.MK: MK, pb.MKRK: MKRK, pb.CRYPTOGRAM_KEY_PAIR: CRYPTOGRAM}
KIND_TO_PB = {v: k for k, v in KIND_FROM_PB.items()}
ALGORITHM_FROM_PB = {pb.BLOCK_AES_128: "AES_128", pb.BLOCK_AES_256: "AES_256",
                     pb.BLOCK_RSA_2048: "RSA_2048", pb.BLOCK_RSA_3072: "RSA_3072"}
ALGORITHM_TO_PB = {v: k for k, v in ALGORITHM_FROM_PB.items()}
CEREMONY_STATE_TO_PB = {CEREMONY_AWAITING: pb.CEREMONY_AWAITING_COMPONENTS,
                        CEREMONY_COMPLETED: pb.CEREMONY_COMPLETED,
                        CEREMONY_CANCELLED: pb.CEREMONY_CANCELLED,
                        CEREMONY_EXPIRED: pb.CEREMONY_EXPIRED,
                        CEREMONY_FAILED: pb.CEREMONY_FAILED}


def _timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _algorithm(value: int) -> str:
    if value == pb.BLOCK_ALGORITHM_UNSPECIFIED:
        return ""
    if value not in ALGORITHM_FROM_PB:
        raise InvalidArgument(f"unknown algorithm {value}")
    return ALGORITHM_FROM_PB[value]


def block_message(record: BlockRecord, in_hsm1: bool) -> pb.KeyBlock:
    return pb.KeyBlock(kind=KIND_TO_PB[record.kind], version=record.version,
                       algorithm=ALGORITHM_TO_PB[record.algorithm], label=record.label,
                       kcv=record.kcv, in_hsm1=in_hsm1, created=_timestamp(record.created),
                       transferred=record.transferred is not None)


def ceremony_message(record: CeremonyRecord) -> pb.Ceremony:
    return pb.Ceremony(
        ceremony_id=record.ceremony_id, label=record.label,
        state=CEREMONY_STATE_TO_PB[record.state], components_needed=record.needed,
        components_received=len(record.custodians), custodians=record.custodians,
        kcvs=[pb.TokenKcv(token=t, kcv=k) for t, k in sorted(record.kcvs.items())])



def transport_message(record: TransportRecord) -> pb.TransportKey:
    return pb.TransportKey(label=record.label, kcv_hsm2=record.kcv_hsm2,
                           kcv_hsm1=record.kcv_hsm1, method=record.method)


class KeyManagementServicer(key_mgmt_pb2_grpc.KeyManagementServicer):
    def __init__(self, manager: KeyManager) -> None:
        self.manager = manager

    @guard
    def CreateKeyBlock(self, request, context):
        actor = caller(context, WRITERS, "create key blocks")
        if request.kind not in KIND_FROM_PB:
            raise InvalidArgument("kind is MK, MKRK or CRYPTOGRAM_KEY_PAIR (a factory transport "
                                  "master is made by a key ceremony)")
        record = self.manager.create_block(KIND_FROM_PB[request.kind],
                                           _algorithm(request.algorithm), actor)
        return block_message(record, False)

    @guard
    def ListKeyBlocks(self, request, context):
        caller(context, READERS, "list key blocks")
        kind = enum_filter(request.kind, KIND_FROM_PB, "no key blocks of kind")
        return pb.ListKeyBlocksResponse(blocks=[
            block_message(record, in_hsm1) for record, in_hsm1 in self.manager.list_blocks(kind)])

    @guard
    def StartCeremony(self, request, context):
        actor = caller(context, WRITERS, "start key ceremonies")
        purpose = FACTORY_MASTER if request.purpose == pb.TRANSPORT_MASTER else TRANSPORT
        if request.purpose not in (pb.KEY_BLOCK_KIND_UNSPECIFIED, pb.TRANSPORT_MASTER):
            raise InvalidArgument("purpose is unspecified (a transport key) or TRANSPORT_MASTER")
        return ceremony_message(self.manager.start_ceremony(
            label=request.label, purpose=purpose, algorithm=_algorithm(request.algorithm),
            components=request.components, tokens=list(request.tokens), actor=actor))

    @guard
    def GetCeremony(self, request, context):
        actor = caller(context, READERS, "read key ceremonies")
        return ceremony_message(self.manager.ceremony(request.ceremony_id, actor))

    @guard
    def CancelCeremony(self, request, context):
        actor = caller(context, WRITERS, "cancel key ceremonies")
        return ceremony_message(self.manager.cancel_ceremony(request.ceremony_id, actor))

    @guard
    def EstablishTransportKey(self, request, context):
        actor = caller(context, WRITERS, "establish transport keys")
        return transport_message(self.manager.establish_transport(
            request.label, _algorithm(request.algorithm), actor))

    @guard
    def ListTransportKeys(self, request, context):
        caller(context, READERS, "list transport keys")
        return pb.ListTransportKeysResponse(
            keys=[transport_message(t) for t in self.manager.transports()])

    @guard
    def TransferKeyBlocks(self, request, context):
        actor = caller(context, WRITERS, "transfer key blocks")
        done = self.manager.transfer(request.transport_label, list(request.labels), actor)
        return pb.TransferKeyBlocksResponse(blocks=[
            pb.TransferredBlock(label=t.label, kcv_hsm2=t.kcv_hsm2, kcv_hsm1=t.kcv_hsm1,
                                already_present=t.already_present) for t in done])
