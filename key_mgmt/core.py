"""Key management: key blocks in HSM2, transport key ceremonies, transfer to HSM1.

The seed's second server works with HSM2 (token ``kms``): it generates the
versioned master key (MK) data blocks, the master key replacement key (MKRK)
data block and the RSA key pair whose public half makes the cryptograms
(claims 16, 27, 28), and moves them to HSM1 (token ``access``) wrapped under
a transport key that both HSMs share. Every key operation is a purpose of
the HSM proxy's KeyBlocks service, called as identity ``key-mgmt``; this
module never holds a key, only labels, versions and check values, and it
cannot ask for anything but those purposes: the proxy picks every key's
template from its class (``hsm_proxy.key_classes``).

Why the keys look the way they do:

* Blocks in HSM2 are sensitive and extractable only under a trusted key
  (CKA_WRAP_WITH_TRUSTED), and usable for nothing else. In HSM1 they are
  unwrapped sensitive and never extractable, with the one usage their class
  needs (derivation; decryption for the cryptogram key).
* A transport key is combined in the proxy from custodians' components,
  each entered by its custodian straight to the proxy under the custodian's
  own certificate (``cms keys ceremony submit``): this server begins the
  ceremony and follows it, but never sees a component. Or it is generated in
  HSM2 and reaches HSM1 wrapped under a one-time RSA-OAEP import key, inside
  the proxy. Its HSM2 half is trusted (it may wrap blocks) and only wraps;
  its HSM1 half only unwraps.
* The transfer is idempotent: a block already in HSM1 with the same check
  value is reported and left alone; a different key under the same label is
  an error, never overwritten.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from cms import keynames
from cms.keynames import CRYPTOGRAM, HSM1_TOKEN, HSM2_TOKEN, MK, MKRK
from cms.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from cms.runtime.logs import fields
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import key_blocks_pb2 as bpb
from cms.v1 import key_blocks_pb2_grpc
from key_mgmt.store import (
    CEREMONY_AWAITING,
    CEREMONY_CANCELLED,
    CEREMONY_COMPLETED,
    CEREMONY_EXPIRED,
    CEREMONY_FAILED,
    BlockRecord,
    CeremonyRecord,
    KeyStore,
    TransportRecord,
)

log = logging.getLogger("key_mgmt.core")

PROXY_TIMEOUT_S = 60.0
MAX_COMPONENTS = 9

# Block kinds: label prefix in both HSMs, and the algorithms each may use.
AES_ALGORITHMS = {"AES_128": hpb.AES_128, "AES_256": hpb.AES_256}
RSA_ALGORITHMS = {"RSA_2048": hpb.RSA_2048, "RSA_3072": hpb.RSA_3072}
KIND_ALGORITHMS = {MK: AES_ALGORITHMS, MKRK: AES_ALGORITHMS, CRYPTOGRAM: RSA_ALGORITHMS}
DEFAULT_ALGORITHM = {MK: "AES_128", MKRK: "AES_128", CRYPTOGRAM: "RSA_2048"}
KIND_ROLES = {MK: hpb.MK_BLOCK, MKRK: hpb.MKRK_BLOCK, CRYPTOGRAM: hpb.CRYPTOGRAM_PAIR}

# Ceremony purposes.
TRANSPORT, FACTORY_MASTER = "transport", "factory-master"
CEREMONY_STATES = {
    bpb.COMPONENT_CEREMONY_AWAITING: CEREMONY_AWAITING,
    bpb.COMPONENT_CEREMONY_COMPLETED: CEREMONY_COMPLETED,
    bpb.COMPONENT_CEREMONY_CANCELLED: CEREMONY_CANCELLED,
    bpb.COMPONENT_CEREMONY_EXPIRED: CEREMONY_EXPIRED,
    bpb.COMPONENT_CEREMONY_FAILED: CEREMONY_FAILED,
}

T = TypeVar("T")


class ProxyError(ServiceError):
    """A refusal or failure of the HSM proxy, passed on with its status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def check_name(label: str, prefix: str) -> str:
    """``label`` must be ``prefix/NAME``: the proxy policy grants key management
    those label patterns and nothing else."""
    parsed = keynames.parse_named_label(label)
    if parsed is None or parsed[0] != prefix:
        raise InvalidArgument(f"label must be {prefix}/NAME (NAME: letters, digits, '.', '_', "
                              f"'-', up to 64), got {label!r}")
    return label


@dataclass(frozen=True)
class Transferred:
    label: str
    kcv_hsm2: bytes
    kcv_hsm1: bytes
    already_present: bool


@dataclass(frozen=True)
class Hsm1Block:
    """A block as the proxy describes it in HSM1."""

    kcv: bytes
    origin: int
    conformance: str

    @property
    def usable(self) -> bool:
        """Landed by a transfer and matching its class's template."""
        return self.origin == hpb.TRANSFERRED and not self.conformance


class KeyManager:
    """Key blocks, ceremonies and transfers, over the proxy's KeyBlocks purposes and the store."""

    def __init__(self, blocks: key_blocks_pb2_grpc.KeyBlocksStub, store: KeyStore, *,
                 hsm2_token: str = HSM2_TOKEN, hsm1_token: str = HSM1_TOKEN) -> None:
        self.blocks = blocks
        self.store = store
        self.hsm2 = hsm2_token
        self.hsm1 = hsm1_token
        self._create_lock = threading.Lock()
        self._ceremony_lock = threading.Lock()
        self._transfer_lock = threading.Lock()

    # -- calls to the proxy ---------------------------------------------------------
    def _call(self, what: str, fn: Callable[..., T], request: object) -> T:
        try:
            return fn(request, timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise ProxyError(grpc.StatusCode.UNAVAILABLE,
                                 f"HSM proxy unavailable during {what}: {details}") from None
            raise ProxyError(code, f"{what}: {details}") from None

    def _listed(self, token: str, roles: list[int], pattern: str = "") -> list[hpb.KeyInfo]:
        return list(self._call(f"listing keys in {token}", self.blocks.ListBlocks,
                               bpb.ListBlocksRequest(token=token, roles=roles,
                                                     label_pattern=pattern)).keys)

    # -- key blocks (claims 16, 27: generated in HSM2) ------------------------------------
    def create_block(self, kind: str, algorithm: str, actor: str) -> BlockRecord:
        if kind not in KIND_ALGORITHMS:
            raise InvalidArgument(f"a key block is one of {', '.join(KIND_ALGORITHMS)}; the "
                                  f"factory transport master is made by a key ceremony")
        algorithm = algorithm or DEFAULT_ALGORITHM[kind]
        allowed = KIND_ALGORITHMS[kind]
        if algorithm not in allowed:
            raise InvalidArgument(f"a {kind} block is {' or '.join(allowed)}, not {algorithm}")
        with self._create_lock:
            in_hsm2 = self._versions_in(self.hsm2, kind)
            version = self.store.next_version(kind, at_least=max(in_hsm2, default=0) + 1)
            label = keynames.block_label(kind, version)
            info = self._call(f"generating {label}", self.blocks.GenerateBlock,
                              bpb.GenerateBlockRequest(token=self.hsm2, role=KIND_ROLES[kind],
                                                       label=label,
                                                       algorithm=allowed[algorithm]))
            record = self.store.add_block(label=label, kind=kind, version=version,
                                          algorithm=algorithm, kcv=info.kcv, actor=actor)
        log.info("key block created", extra=fields(label=label, algorithm=algorithm,
                                                   kcv=info.kcv.hex(), actor=actor))
        return record

    def _versions_in(self, token: str, kind: str) -> set[int]:
        found = set()
        for key in self._listed(token, [KIND_ROLES[kind]], keynames.label_pattern(kind)):
            parsed = keynames.parse_block_label(key.label)
            if parsed is not None and parsed[0] == kind:
                found.add(parsed[1])
        return found

    def blocks_in_hsm1(self) -> dict[str, Hsm1Block]:
        """Blocks HSM1 holds, with check value, origin and conformance as the proxy reads them."""
        return {key.label: Hsm1Block(key.kcv, key.origin, key.conformance)
                for key in self._listed(self.hsm1, list(KIND_ROLES.values()))}

    def list_blocks(self, kind: str | None = None) -> list[tuple[BlockRecord, bool]]:
        """Every recorded block, and whether HSM1 holds it as transferred, with the same
        check value, matching its class."""
        records = self.store.blocks(kind)
        present = self.blocks_in_hsm1()
        listed = []
        for record in records:
            there = present.get(record.label)
            in_hsm1 = (there is not None and there.usable
                       and hmac.compare_digest(there.kcv, record.kcv))
            listed.append((record, in_hsm1))
        return listed

    # -- ceremonies: a key from custodians' components ---------------------------------
    def start_ceremony(self, *, label: str, purpose: str, algorithm: str, components: int,
                       tokens: list[str], actor: str) -> CeremonyRecord:
        if purpose == TRANSPORT:
            check_name(label, keynames.TRANSPORT)
            tokens = tokens or [self.hsm2, self.hsm1]
            if sorted(tokens) != sorted({self.hsm2, self.hsm1}):
                raise InvalidArgument(f"a transport key is made in both {self.hsm2} (HSM2) and "
                                      f"{self.hsm1} (HSM1)")
            role, source = hpb.TRANSPORT_KEY, self.hsm2
        elif purpose == FACTORY_MASTER:
            if label != keynames.FACTORY_TRANSPORT_MASTER:
                raise InvalidArgument(f"the factory transport master is labelled "
                                      f"{keynames.FACTORY_TRANSPORT_MASTER}")
            tokens = tokens or [self.hsm1]
            if tokens != [self.hsm1]:
                raise InvalidArgument(f"a factory transport master lives in {self.hsm1} (HSM1) "
                                      f"only, where cards are first opened")
            role, source = hpb.FACTORY_TRANSPORT_MASTER, ""
        else:
            raise InvalidArgument("purpose is a transport key or a factory transport master")
        algorithm = algorithm or "AES_128"
        if algorithm not in AES_ALGORITHMS:
            raise InvalidArgument(f"a ceremony key is {' or '.join(AES_ALGORITHMS)}")
        if not 2 <= components <= MAX_COMPONENTS:
            raise InvalidArgument(f"a ceremony needs 2 to {MAX_COMPONENTS} components, "
                                  f"got {components}")
        if any(t.label == label for t in self.store.transports()):
            raise AlreadyExists(f"transport key {label!r} already exists")
        started = self._call("beginning the ceremony", self.blocks.BeginCeremony,
                             bpb.BeginCeremonyRequest(
                                 role=role, label=label, algorithm=AES_ALGORITHMS[algorithm],
                                 components=components, source_token=source,
                                 target_token=self.hsm1))
        record = CeremonyRecord(
            ceremony_id=started.ceremony_id, label=label, purpose=purpose, algorithm=algorithm,
            tokens=list(tokens), needed=components, custodians=[], state=CEREMONY_AWAITING,
            proxy_handle=started.ceremony_id, kcvs={})
        self.store.add_ceremony(record, actor)
        log.info("ceremony started", extra=fields(ceremony=record.ceremony_id, label=label,
                                                  components=components, actor=actor))
        return record

    def ceremony(self, ceremony_id: str, actor: str) -> CeremonyRecord:
        """The ceremony as the proxy reports it now; the record follows (custodians, state,
        check values) and a completed transport key is recorded."""
        with self._ceremony_lock:
            record = self.store.ceremony(ceremony_id)
            if record.state != CEREMONY_AWAITING:
                return record
            try:
                now = self._call("reading the ceremony", self.blocks.GetCeremony,
                                 bpb.GetComponentCeremonyRequest(ceremony_id=ceremony_id))
            except ProxyError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise
                self.store.update_ceremony(ceremony_id, actor=actor, action="ceremony-expired",
                                           state=CEREMONY_EXPIRED,
                                           detail={"reason": "the proxy no longer knows it"})
                return self.store.ceremony(ceremony_id)
            return self._follow(record, now, actor)

    def _follow(self, record: CeremonyRecord, now: bpb.ComponentCeremony,
                actor: str) -> CeremonyRecord:
        state = CEREMONY_STATES.get(now.state, CEREMONY_FAILED)
        custodians = list(now.contributors)
        if state == record.state and custodians == record.custodians:
            return record
        kcvs = {k.token: k.kcv for k in now.kcvs}
        action = {CEREMONY_AWAITING: "component", CEREMONY_COMPLETED: "ceremony-completed",
                  CEREMONY_CANCELLED: "ceremony-cancelled", CEREMONY_EXPIRED: "ceremony-expired",
                  CEREMONY_FAILED: "ceremony-failed"}[state]
        detail: dict = {"custodians": custodians}
        if now.problem:
            detail["problem"] = now.problem
        if kcvs:
            detail["kcvs"] = {t: v.hex() for t, v in kcvs.items()}
        self.store.update_ceremony(record.ceremony_id, actor=actor, action=action,
                                   custodians=custodians, state=state,
                                   kcvs=kcvs if kcvs else None, detail=detail)
        if state == CEREMONY_COMPLETED and record.purpose == TRANSPORT and not any(
                t.label == record.label for t in self.store.transports()):
            self.store.add_transport(TransportRecord(
                record.label, "components", kcvs.get(self.hsm2, b""),
                kcvs.get(self.hsm1, b"")), actor)
            log.info("ceremony completed", extra=fields(ceremony=record.ceremony_id,
                                                        label=record.label,
                                                        custodians=len(custodians)))
        return self.store.ceremony(record.ceremony_id)

    def cancel_ceremony(self, ceremony_id: str, actor: str) -> CeremonyRecord:
        with self._ceremony_lock:
            record = self.store.ceremony(ceremony_id)
            if record.state != CEREMONY_AWAITING:
                raise FailedPrecondition(f"ceremony {ceremony_id} is {record.state}")
            try:
                self._call("cancelling the ceremony", self.blocks.CancelCeremony,
                           bpb.GetComponentCeremonyRequest(ceremony_id=ceremony_id))
            except ProxyError as exc:
                if exc.code not in (grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION):
                    raise
            self.store.update_ceremony(ceremony_id, actor=actor, action="ceremony-cancelled",
                                       state=CEREMONY_CANCELLED)
            return self.store.ceremony(ceremony_id)

    # -- transport key by RSA-OAEP import key ----------------------------------------------
    def establish_transport(self, label: str, algorithm: str, actor: str) -> TransportRecord:
        """HSM2 generates the transport key; it reaches HSM1 wrapped under a one-time
        RSA-OAEP import key that HSM1 made, all inside the proxy (KeyBlocks)."""
        check_name(label, keynames.TRANSPORT)
        algorithm = algorithm or "AES_256"
        if algorithm not in AES_ALGORITHMS:
            raise InvalidArgument(f"a transport key is {' or '.join(AES_ALGORITHMS)}")
        if any(t.label == label for t in self.store.transports()):
            raise AlreadyExists(f"transport key {label!r} already exists")
        made = self._call("establishing the transport key", self.blocks.EstablishTransportKey,
                          bpb.EstablishTransportRequest(source_token=self.hsm2,
                                                        target_token=self.hsm1, label=label,
                                                        algorithm=AES_ALGORITHMS[algorithm]))
        record = TransportRecord(label, "rsa-oaep", made.kcv_source, made.kcv_target)
        self.store.add_transport(record, actor)
        log.info("transport key established", extra=fields(label=label,
                                                           kcv=made.kcv_source.hex()))
        return record

    def transports(self) -> list[TransportRecord]:
        return self.store.transports()

    # -- transfer to HSM1 (claims 16, 28) --------------------------------------------------
    def transfer(self, transport: str, labels: list[str], actor: str) -> list[Transferred]:
        if not any(t.label == transport for t in self.store.transports()):
            raise NotFound(f"no transport key {transport!r} (see 'cms keys transports')")
        if not labels:
            raise InvalidArgument("name the key blocks to transfer (e.g. mk/2 mkrk/1 "
                                  "cryptogram/1)")
        records = [self.store.block(label) for label in dict.fromkeys(labels)]
        with self._transfer_lock:
            reply = self._call("transferring key blocks", self.blocks.TransferBlocks,
                               bpb.TransferBlocksRequest(
                                   source_token=self.hsm2, target_token=self.hsm1,
                                   transport_label=transport,
                                   labels=[r.label for r in records]))
            done = []
            by_label = {r.label: r for r in records}
            for block in reply.blocks:
                record = by_label[block.label]
                if not hmac.compare_digest(block.kcv_source, record.kcv):
                    raise FailedPrecondition(
                        f"HSM2's {block.label} has check value {block.kcv_source.hex()}, the "
                        f"record says {record.kcv.hex()}: the key is not the one recorded")
                if not block.already_present or record.transferred is None:
                    self.store.mark_transferred(record.label, transport, actor, block.kcv_target)
                log.info("key block in HSM1", extra=fields(
                    label=record.label, transport=transport, kcv=block.kcv_target.hex(),
                    already_present=block.already_present))
                done.append(Transferred(block.label, block.kcv_source, block.kcv_target,
                                        block.already_present))
        return done
