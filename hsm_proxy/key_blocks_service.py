"""The KeyBlocks servicer: key management's purposes, and the custodians' ceremonies.

Each RPC validates its request, checks the class of every label it names
(``hsm_proxy.key_classes``: a label of another class is PERMISSION_DENIED,
whatever the policy grants), authorizes every token and label under the
policy operation of the RPC, and runs one worker operation
(``hsm_proxy.key_blocks_ops``). One audit record per RPC (``@rpc``). No
response carries key material: labels, classes, origins and check values.
"""

from __future__ import annotations

from typing import Any

import grpc

from cardcore.kcv import KCV_LENGTH
from cms.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, ServiceError
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import key_blocks_pb2 as pb
from cms.v1 import key_blocks_pb2_grpc
from hsm_proxy import key_blocks_ops as ops
from hsm_proxy import key_classes as kc
from hsm_proxy.ceremonies import CANCELLED, COMPLETED, FAILED
from hsm_proxy.core import Call, ProxyCore, rpc
from hsm_proxy.errors import from_wire

MAX_COMPONENTS = 16
MAX_TRANSFER_LABELS = 64


def _enum(enum: Any, value: int, what: str, allowed: frozenset[int] | set[int]) -> int:
    if value not in allowed:
        names = ", ".join(sorted(enum.Name(v) for v in allowed))
        raise InvalidArgument(f"{what}: one of {names}")
    return value


class KeyBlocksServicer(key_blocks_pb2_grpc.KeyBlocksServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def _free(self, call: Call, pairs: list[tuple[str, str]]) -> None:
        taken = self.core.pool.call("blocks.labels_taken", pairs, idempotent=True,
                                    timeout=call.timeout()).value
        if taken:
            token, label = taken[0]
            raise AlreadyExists(f"a key labelled {label!r} already exists on token {token!r}")

    def _invalidate(self, pairs: list[tuple[str, str]]) -> None:
        # Every worker forgets cached handles of these labels before the answer.
        self.core.pool.broadcast("invalidate", pairs)

    # -- blocks ------------------------------------------------------------------------
    @rpc
    def GenerateBlock(self, request: pb.GenerateBlockRequest, context: grpc.ServicerContext,
                      call: Call) -> hpb.KeyInfo:
        core = self.core
        role = _enum(hpb.KeyRole, request.role, "role", kc.BLOCK_ROLES)
        if not request.label:
            raise InvalidArgument("label: required (the class's form, e.g. mk/3)")
        kc.require_role(request.label, {role}, "label")
        call.authorize(request.token or None, request.label)
        core.require_token(request.token)
        allowed = kc.ALGORITHMS[role]
        algorithm = _enum(hpb.KeyAlgorithm, request.algorithm, "algorithm", allowed)
        with core.creating([(request.token, request.label)]):
            raw = core.pool.call("blocks.generate", ops.GenerateBlock(
                request.token, role, request.label, algorithm), idempotent=False,
                timeout=call.timeout()).value
            self._invalidate([(request.token, request.label)])
        return hpb.KeyInfo.FromString(raw)

    @rpc
    def ListBlocks(self, request: pb.ListBlocksRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.ListBlocksResponse:
        roles = set(request.roles)
        unknown = [r for r in roles if r not in kc.ROLE_NAMES]
        if unknown:
            raise InvalidArgument(f"roles: unknown value(s) {sorted(unknown)}")
        keys = self.core.visible_keys(call, request.token, request.label_pattern)
        out = pb.ListBlocksResponse(keys=[k for k in keys if not roles or k.role in roles])
        call.items = len(out.keys)
        return out

    @rpc
    def TransferBlocks(self, request: pb.TransferBlocksRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.TransferBlocksResponse:
        core = self.core
        source, target = request.source_token, request.target_token
        if not request.transport_label:
            raise InvalidArgument("transport_label: required")
        kc.require_role(request.transport_label, {hpb.TRANSPORT_KEY}, "transport_label")
        labels = list(dict.fromkeys(request.labels))
        if not labels:
            raise InvalidArgument("labels: name the blocks to transfer (e.g. mk/2 mkrk/1 "
                                  "cryptogram/1)")
        if len(labels) > MAX_TRANSFER_LABELS:
            raise InvalidArgument(f"labels: at most {MAX_TRANSFER_LABELS} per call")
        for token in (source, target):
            call.authorize(token or None, request.transport_label)
        for label in labels:
            kc.require_role(label, kc.BLOCK_ROLES, "block")
            call.authorize(source or None, label)
            call.authorize(target or None, label)
        core.token_pair(source, target)
        call.items = len(labels)
        pairs = [(target, label) for label in labels]
        with core.creating(pairs):
            done = core.pool.call("blocks.transfer", ops.Transfer(
                source, target, request.transport_label, tuple(labels)), idempotent=False,
                timeout=call.timeout()).value
            self._invalidate(pairs)
        return pb.TransferBlocksResponse(blocks=[
            pb.BlockTransfer(label=t.label, role=t.role, kcv_source=t.kcv_source,
                             kcv_target=t.kcv_target, already_present=t.already_present)
            for t in done])

    @rpc
    def EstablishTransportKey(self, request: pb.EstablishTransportRequest,
                              context: grpc.ServicerContext,
                              call: Call) -> pb.EstablishTransportResponse:
        core = self.core
        label = request.label
        if not label:
            raise InvalidArgument("label: required (transport/<name>)")
        kc.require_role(label, {hpb.TRANSPORT_KEY}, "label")
        source, target = request.source_token, request.target_token
        call.authorize(source or None, label)
        call.authorize(target or None, label)
        core.token_pair(source, target)
        algorithm = _enum(hpb.KeyAlgorithm, request.algorithm, "algorithm", kc.AES)
        officer = core.pool.require_officer()
        pairs = [(source, label), (target, label)]
        with core.creating(pairs):
            self._free(call, pairs)
            kcv_source, kcv_target = core.pool.call(
                "blocks.establish", ops.Establish(source, target, label, algorithm),
                worker=officer, idempotent=False, timeout=call.timeout()).value
            self._invalidate(pairs)
        return pb.EstablishTransportResponse(label=label, kcv_source=kcv_source,
                                             kcv_target=kcv_target)

    # -- ceremonies -------------------------------------------------------------------
    @rpc
    def BeginCeremony(self, request: pb.BeginCeremonyRequest, context: grpc.ServicerContext,
                      call: Call) -> pb.ComponentCeremony:
        core = self.core
        role = _enum(hpb.KeyRole, request.role, "role", kc.CEREMONY_ROLES)
        label = request.label
        if not label:
            raise InvalidArgument("label: required")
        kc.require_role(label, {role}, "label")
        source, target = request.source_token, request.target_token
        if role == hpb.TRANSPORT_KEY:
            if not source or source == target:
                raise InvalidArgument("source_token: a transport key has a wrapping half in "
                                      "the source token and an unwrapping half in the target")
        elif source:
            raise InvalidArgument("source_token: a factory transport master lives in the "
                                  "target token only")
        for token in (source, target):
            if token:
                call.authorize(token, label)
                core.require_token(token)
        core.require_token(target, "target_token")
        algorithm = _enum(hpb.KeyAlgorithm, request.algorithm, "algorithm", kc.AES)
        if not 2 <= request.components <= MAX_COMPONENTS:
            raise InvalidArgument(f"components: 2 to {MAX_COMPONENTS} (one per custodian)")
        officer = core.pool.require_officer()
        pairs = [(t, label) for t in (source, target) if t]
        self._free(call, pairs)
        assert call.identity is not None
        record = core.ceremonies.new(role=role, label=label, algorithm=algorithm,
                                     source=source, target=target, needed=request.components,
                                     started_by=call.identity, worker=officer)
        call.detail = f"ceremony {record.ceremony_id}, {request.components} components"
        try:
            reply = core.pool.call("ceremony.begin", ops.CeremonyBegin(
                record.ceremony_id, role, label, algorithm, request.components, source, target),
                worker=officer, idempotent=False, timeout=call.timeout())
        except ServiceError as exc:
            core.ceremonies.end(record, FAILED, exc.message)
            raise
        core.ceremonies.activate(record, reply.incarnation, reply.generation)
        if core.pool.worker_state(officer) != (reply.incarnation, reply.generation):
            # The worker restarted between its reply and now: the state is gone.
            core.ceremonies.invalidate_worker(officer, core.pool.worker_state(officer))
        return core.ceremonies.get(record.ceremony_id).message()

    @rpc
    def AddComponent(self, request: pb.AddComponentRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.ComponentCeremony:
        core = self.core
        record = core.ceremonies.get(request.ceremony_id)
        for token in record.tokens:
            call.authorize(token, record.label)
        assert call.identity is not None
        if len(request.kcv) != KCV_LENGTH:
            raise InvalidArgument(f"kcv: {KCV_LENGTH} bytes (KCV_ZERO_BLOCK of the component)")
        with record.lock:
            record = core.ceremonies.live(request.ceremony_id)
            core.ceremonies.check_contributor(record, call.identity)
            current = core.pool.worker_state(record.worker)
            if current != (record.incarnation, record.generation):
                core.ceremonies.invalidate_worker(record.worker, current)
                record = core.ceremonies.live(request.ceremony_id)
            last = len(record.contributors) + 1 == record.needed
            pairs = [(t, record.label) for t in record.tokens]
            with core.creating(pairs if last else []):
                if last:
                    self._free(call, pairs)
                try:
                    received, needed, kcvs, error = core.pool.call(
                        "ceremony.add", ops.CeremonyAdd(record.ceremony_id, request.component,
                                                        request.kcv),
                        worker=record.worker, idempotent=False, timeout=call.timeout()).value
                except ServiceError as exc:
                    if not isinstance(exc, InvalidArgument):
                        # The officer worker lost the ceremony (restart) or failed mid-way.
                        core.ceremonies.end(record, FAILED, exc.message)
                    raise
                record.contributors.append(call.identity)
                call.detail = f"component {received} of {needed}"
                if error is not None:
                    failure = from_wire(error)
                    core.ceremonies.end(record, FAILED, failure.message)
                    raise failure
                if kcvs:
                    record.kcvs = dict(kcvs)
                    core.ceremonies.end(record, COMPLETED)
                    self._invalidate(pairs)
        return record.message()

    @rpc
    def GetCeremony(self, request: pb.GetComponentCeremonyRequest,
                    context: grpc.ServicerContext, call: Call) -> pb.ComponentCeremony:
        record = self.core.ceremonies.get(request.ceremony_id)
        for token in record.tokens:
            call.authorize(token, record.label)
        return record.message()

    @rpc
    def CancelCeremony(self, request: pb.GetComponentCeremonyRequest,
                       context: grpc.ServicerContext, call: Call) -> pb.ComponentCeremony:
        core = self.core
        record = core.ceremonies.get(request.ceremony_id)
        for token in record.tokens:
            call.authorize(token, record.label)
        if call.identity != record.started_by:
            raise FailedPrecondition(f"only {record.started_by!r}, which began ceremony "
                                     f"{record.ceremony_id}, may cancel it")
        with record.lock:
            record = core.ceremonies.live(request.ceremony_id)
            core.ceremonies.end(record, CANCELLED)
            core.pool.control(record.worker, "release", [record.ceremony_id],
                              timeout=call.timeout())
        return record.message()


def register(server: grpc.Server, core: ProxyCore) -> list[str]:
    key_blocks_pb2_grpc.add_KeyBlocksServicer_to_server(KeyBlocksServicer(core), server)
    return ["cms.v1.KeyBlocks"]

