"""Key management: key blocks in HSM2, transport key ceremonies, transfer to HSM1.

The seed's second server works with HSM2 (token ``kms``): it generates the
versioned master key (MK) data blocks, the master key replacement key (MKRK)
data block and the RSA key pair whose public half makes the cryptograms
(claims 16, 27, 28), and moves them to HSM1 (token ``access``) wrapped under
a transport key that both HSMs share. Every key operation is a call to the
HSM proxy as identity ``key-mgmt``; this module never holds a key, only
labels, versions and check values.

Why the keys look the way they do:

* Blocks in HSM2 are sensitive and *extractable*: extractable is what lets
  ``C_WrapKey`` move them under the transport key, and sensitive keeps them
  from ever being read in clear. In HSM1 they are unwrapped sensitive and
  not extractable: there they are used (derivation, decryption) and go no
  further.
* A transport key is either combined in the proxy from custodians'
  components (no single person knows it; each component is checked by its
  KCV on entry) or generated in HSM2 and wrapped to an RSA-OAEP import key
  generated in HSM1 for the occasion and destroyed afterwards.
* The transfer is idempotent: a block already in HSM1 with the same check
  value is reported and left alone; a different key under the same label is
  an error, never overwritten.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from cms.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
)
from cms.runtime.logs import fields
from cms.v1 import hsm_pb2 as hpb
from cms.v1 import hsm_pb2_grpc
from key_mgmt.store import (
    CEREMONY_AWAITING,
    CEREMONY_CANCELLED,
    CEREMONY_COMPLETED,
    BlockRecord,
    CeremonyRecord,
    KeyStore,
    TransportRecord,
)

log = logging.getLogger("key_mgmt.core")

HSM2_TOKEN = "kms"
HSM1_TOKEN = "access"
PROXY_TIMEOUT_S = 60.0
KCV_LENGTH = 3
MAX_COMPONENTS = 9

# Block kinds: label prefix in both HSMs, and the algorithms each may use.
MK, MKRK, CRYPTOGRAM = "mk", "mkrk", "cryptogram"
AES_ALGORITHMS = {"AES_128": hpb.AES_128, "AES_256": hpb.AES_256}
RSA_ALGORITHMS = {"RSA_2048": hpb.RSA_2048, "RSA_3072": hpb.RSA_3072}
KIND_ALGORITHMS = {MK: AES_ALGORITHMS, MKRK: AES_ALGORITHMS, CRYPTOGRAM: RSA_ALGORITHMS}
DEFAULT_ALGORITHM = {MK: "AES_128", MKRK: "AES_128", CRYPTOGRAM: "RSA_2048"}

# Ceremony purposes.
TRANSPORT, FACTORY_MASTER = "transport", "factory-master"
LABEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

T = TypeVar("T")


class ProxyError(ServiceError):
    """A refusal or failure of the HSM proxy, passed on with its status."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def kcv_of_public(der: bytes) -> bytes:
    """Check value of a key pair: SHA-256 of its DER SubjectPublicKeyInfo, first 3 bytes."""
    return hashlib.sha256(der).digest()[:KCV_LENGTH]


def check_name(label: str, prefix: str) -> str:
    """``label`` must be ``prefix/NAME``: the proxy policy grants key management
    those label patterns and nothing else."""
    head, _, name = label.partition("/")
    if head != prefix or not LABEL_NAME.match(name):
        raise InvalidArgument(f"label must be {prefix}/NAME (NAME: letters, digits, '.', '_', "
                              f"'-', up to 64), got {label!r}")
    return label


@dataclass(frozen=True)
class Transferred:
    label: str
    kcv_hsm2: bytes
    kcv_hsm1: bytes
    already_present: bool


class KeyManager:
    """Key blocks, ceremonies and transfers, over the proxy and the store."""

    def __init__(self, hsm: hsm_pb2_grpc.HsmStub, store: KeyStore, *,
                 hsm2_token: str = HSM2_TOKEN, hsm1_token: str = HSM1_TOKEN) -> None:
        self.hsm = hsm
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

    def _find(self, token: str, label: str, key_class: int = hpb.KEY_CLASS_UNSPECIFIED
              ) -> hpb.KeyInfo | None:
        try:
            return self._call(f"reading {label} in {token}", self.hsm.GetKeyAttributes,
                              hpb.GetKeyAttributesRequest(
                                  key=hpb.KeyRef(token=token, label=label), key_class=key_class))
        except ProxyError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def _public_der(self, token: str, label: str) -> bytes:
        return self._call(f"reading the public key of {label} in {token}", self.hsm.GetPublicKey,
                          hpb.GetPublicKeyRequest(key=hpb.KeyRef(token=token, label=label))
                          ).public_key_der

    def _destroy_quietly(self, ref: hpb.KeyRef) -> None:
        try:
            if ref.handle:
                self.hsm.ReleaseHandles(hpb.ReleaseHandlesRequest(handles=[ref.handle]),
                                        timeout=PROXY_TIMEOUT_S)
            else:
                self.hsm.DestroyKey(hpb.DestroyKeyRequest(key=ref), timeout=PROXY_TIMEOUT_S)
        except grpc.RpcError:
            log.warning("cleanup failed", extra=fields(key=ref.label or "handle"))

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
            label = f"{kind}/{version}"
            if kind == CRYPTOGRAM:
                # Private half: DECRYPT (opens cryptograms in HSM1); public half:
                # ENCRYPT (makes them). Extractable so it can travel wrapped.
                self._call(f"generating {label}", self.hsm.GenerateKeyPair,
                           hpb.GenerateKeyPairRequest(
                               token=self.hsm2, algorithm=allowed[algorithm],
                               template=hpb.KeyTemplate(label=label, usages=[hpb.DECRYPT],
                                                        extractable=True)))
                kcv = kcv_of_public(self._public_der(self.hsm2, label))
            else:
                info = self._call(f"generating {label}", self.hsm.GenerateSecretKey,
                                  hpb.GenerateSecretKeyRequest(
                                      token=self.hsm2, algorithm=allowed[algorithm],
                                      template=hpb.KeyTemplate(label=label, usages=[hpb.DERIVE],
                                                               extractable=True)))
                kcv = info.kcv
            record = self.store.add_block(label=label, kind=kind, version=version,
                                          algorithm=algorithm, kcv=kcv, actor=actor)
        log.info("key block created", extra=fields(label=label, algorithm=algorithm,
                                                   kcv=kcv.hex(), actor=actor))
        return record

    def _versions_in(self, token: str, kind: str) -> set[int]:
        reply = self._call(f"listing {kind} keys in {token}", self.hsm.ListKeys,
                           hpb.ListKeysRequest(token=token, label_pattern=f"{kind}/*"))
        found = set()
        for key in reply.keys:
            _, _, version = key.label.partition("/")
            if version.isdigit():
                found.add(int(version))
        return found

    def labels_in_hsm1(self) -> dict[str, bytes]:
        """Labels of key blocks present in HSM1, with the secret keys' check values."""
        present: dict[str, bytes] = {}
        for kind in KIND_ALGORITHMS:
            reply = self._call(f"listing {kind} keys in HSM1", self.hsm.ListKeys,
                               hpb.ListKeysRequest(token=self.hsm1, label_pattern=f"{kind}/*"))
            for key in reply.keys:
                present.setdefault(key.label, key.kcv)
        return present

    def list_blocks(self, kind: str | None = None) -> list[tuple[BlockRecord, bool]]:
        """Every recorded block, and whether HSM1 holds it (with the same check value)."""
        records = self.store.blocks(kind)
        present = self.labels_in_hsm1()
        listed = []
        for record in records:
            kcv = present.get(record.label)
            if kcv is None:
                in_hsm1 = False
            elif record.kind == CRYPTOGRAM:
                in_hsm1 = record.transferred is not None
            else:
                in_hsm1 = hmac.compare_digest(kcv, record.kcv)
            listed.append((record, in_hsm1))
        return listed

    # -- ceremonies: a key from custodians' components ---------------------------------
    def start_ceremony(self, *, label: str, purpose: str, algorithm: str, components: int,
                       tokens: list[str], actor: str) -> CeremonyRecord:
        if purpose == TRANSPORT:
            check_name(label, "transport")
            tokens = tokens or [self.hsm2, self.hsm1]
            if sorted(tokens) != sorted({self.hsm2, self.hsm1}):
                raise InvalidArgument(f"a transport key is made in both {self.hsm2} (HSM2) and "
                                      f"{self.hsm1} (HSM1)")
            usages = [hpb.WRAP, hpb.UNWRAP]
        elif purpose == FACTORY_MASTER:
            check_name(label, "factory")
            tokens = tokens or [self.hsm1]
            if tokens != [self.hsm1]:
                raise InvalidArgument(f"a factory transport master lives in {self.hsm1} (HSM1) "
                                      f"only, where cards are first opened")
            usages = [hpb.DERIVE]
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
        for token in tokens:
            if self._find(token, label) is not None:
                raise AlreadyExists(f"a key labelled {label!r} already exists in {token}")
        started = self._call("starting the component import", self.hsm.BeginComponentImport,
                             hpb.BeginComponentImportRequest(
                                 tokens=tokens, algorithm=AES_ALGORITHMS[algorithm],
                                 components=components,
                                 template=hpb.KeyTemplate(label=label, usages=usages)))
        record = CeremonyRecord(
            ceremony_id=secrets.token_hex(8), label=label, purpose=purpose, algorithm=algorithm,
            tokens=list(tokens), needed=components, custodians=[], state=CEREMONY_AWAITING,
            proxy_handle=started.handle, kcvs={})
        self.store.add_ceremony(record, actor)
        log.info("ceremony started", extra=fields(ceremony=record.ceremony_id, label=label,
                                                  components=components, actor=actor))
        return record

    def submit_component(self, ceremony_id: str, custodian: str, component: bytes, kcv: bytes,
                         actor: str) -> CeremonyRecord:
        custodian = custodian.strip()
        if not custodian:
            raise InvalidArgument("name the custodian entering this component")
        if len(kcv) != KCV_LENGTH:
            raise InvalidArgument(f"the component's check value is {KCV_LENGTH} bytes "
                                  f"(6 hex digits) as printed for its custodian")
        with self._ceremony_lock:
            record = self.store.ceremony(ceremony_id)
            if record.state != CEREMONY_AWAITING:
                raise FailedPrecondition(f"ceremony {ceremony_id} is {record.state}")
            if custodian in record.custodians:
                raise FailedPrecondition(f"custodian {custodian!r} already entered a component: "
                                         f"each component comes from a different custodian")
            try:
                reply = self.hsm.AddKeyComponent(hpb.AddKeyComponentRequest(
                    handle=record.proxy_handle, component=component, kcv=kcv),
                    timeout=PROXY_TIMEOUT_S)
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    self.store.update_ceremony(ceremony_id, actor=actor, action="ceremony-expired",
                                               state=CEREMONY_CANCELLED)
                    raise FailedPrecondition(
                        f"ceremony {ceremony_id} expired in the HSM proxy before all components "
                        f"arrived; start a new one") from None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self.store.update_ceremony(ceremony_id, actor=actor,
                                               action="component-rejected",
                                               detail={"custodian": custodian})
                    raise InvalidArgument(f"component of {custodian} rejected: {exc.details()}; "
                                          f"the ceremony still waits for it") from None
                raise ProxyError(code, f"adding a component: {exc.details()}") from None
            custodians = [*record.custodians, custodian]
            if not reply.completed:
                self.store.update_ceremony(ceremony_id, actor=actor, action="component",
                                           custodians=custodians, detail={"custodian": custodian})
                return self.store.ceremony(ceremony_id)
            kcvs = {info.ref.token: info.kcv for info in reply.keys}
            self.store.update_ceremony(ceremony_id, actor=actor, action="ceremony-completed",
                                       custodians=custodians, state=CEREMONY_COMPLETED,
                                       kcvs=kcvs, detail={"custodian": custodian,
                                                          "kcvs": {t: v.hex()
                                                                   for t, v in kcvs.items()}})
            if record.purpose == TRANSPORT:
                self.store.add_transport(TransportRecord(
                    record.label, "components", kcvs.get(self.hsm2, b""),
                    kcvs.get(self.hsm1, b"")), actor)
            log.info("ceremony completed", extra=fields(ceremony=ceremony_id, label=record.label,
                                                        custodians=len(custodians)))
            return self.store.ceremony(ceremony_id)

    def cancel_ceremony(self, ceremony_id: str, actor: str) -> CeremonyRecord:
        with self._ceremony_lock:
            record = self.store.ceremony(ceremony_id)
            if record.state != CEREMONY_AWAITING:
                raise FailedPrecondition(f"ceremony {ceremony_id} is {record.state}")
            self._destroy_quietly(hpb.KeyRef(handle=record.proxy_handle))
            self.store.update_ceremony(ceremony_id, actor=actor, action="ceremony-cancelled",
                                       state=CEREMONY_CANCELLED)
            return self.store.ceremony(ceremony_id)

    # -- transport key by RSA-OAEP import key ----------------------------------------------
    def establish_transport(self, label: str, algorithm: str, actor: str) -> TransportRecord:
        """HSM1 makes an RSA import key pair; HSM2 makes the transport key and wraps it
        to HSM1's public key (RSA-OAEP); HSM1 unwraps it and checks its KCV."""
        check_name(label, "transport")
        algorithm = algorithm or "AES_256"
        if algorithm not in AES_ALGORITHMS:
            raise InvalidArgument(f"a transport key is {' or '.join(AES_ALGORITHMS)}")
        if any(t.label == label for t in self.store.transports()):
            raise AlreadyExists(f"transport key {label!r} already exists")
        for token in (self.hsm2, self.hsm1):
            if self._find(token, label) is not None:
                raise AlreadyExists(f"a key labelled {label!r} already exists in {token}")
        import_label = f"{label}/import"
        cleanup: list[hpb.KeyRef] = []
        try:
            if self._find(self.hsm1, import_label) is not None:
                self._destroy_quietly(hpb.KeyRef(token=self.hsm1, label=import_label))
            self._call("generating HSM1's import key", self.hsm.GenerateKeyPair,
                       hpb.GenerateKeyPairRequest(
                           token=self.hsm1, algorithm=hpb.RSA_2048,
                           template=hpb.KeyTemplate(label=import_label, usages=[hpb.UNWRAP])))
            cleanup.append(hpb.KeyRef(token=self.hsm1, label=import_label))
            der = self._public_der(self.hsm1, import_label)
            public = self._call("importing HSM1's import key into HSM2", self.hsm.ImportPublicKey,
                                hpb.ImportPublicKeyRequest(token=self.hsm2, public_key_der=der,
                                                           label=import_label, usages=[hpb.WRAP],
                                                           session=True))
            cleanup.append(public.ref)
            made = self._call("generating the transport key in HSM2", self.hsm.GenerateSecretKey,
                              hpb.GenerateSecretKeyRequest(
                                  token=self.hsm2, algorithm=AES_ALGORITHMS[algorithm],
                                  template=hpb.KeyTemplate(label=label,
                                                           usages=[hpb.WRAP, hpb.UNWRAP],
                                                           extractable=True)))
            try:
                wrapped = self._call("wrapping the transport key to HSM1", self.hsm.WrapKey,
                                     hpb.WrapKeyRequest(
                                         wrapping_key=public.ref,
                                         key=hpb.KeyRef(token=self.hsm2, label=label),
                                         mechanism=hpb.RSA_OAEP_SHA1)).wrapped
                landed = self._call("unwrapping the transport key in HSM1", self.hsm.UnwrapKey,
                                    hpb.UnwrapKeyRequest(
                                        unwrapping_key=hpb.KeyRef(token=self.hsm1,
                                                                  label=import_label),
                                        wrapped=wrapped, mechanism=hpb.RSA_OAEP_SHA1,
                                        key_class=hpb.SECRET_KEY,
                                        algorithm=AES_ALGORITHMS[algorithm],
                                        template=hpb.KeyTemplate(label=label,
                                                                 usages=[hpb.UNWRAP]),
                                        expected_kcv=made.kcv))
            except ServiceError:
                self._destroy_quietly(hpb.KeyRef(token=self.hsm2, label=label))
                raise
        finally:
            for ref in cleanup:
                self._destroy_quietly(ref)
        record = TransportRecord(label, "rsa-oaep", made.kcv, landed.kcv)
        self.store.add_transport(record, actor)
        log.info("transport key established", extra=fields(label=label, kcv=made.kcv.hex()))
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
        done = []
        with self._transfer_lock:
            for record in records:
                if record.kind == CRYPTOGRAM:
                    result = self._transfer_pair(transport, record)
                else:
                    result = self._transfer_secret(transport, record)
                if not result.already_present or record.transferred is None:
                    self.store.mark_transferred(record.label, transport, actor, result.kcv_hsm1)
                log.info("key block in HSM1", extra=fields(
                    label=record.label, transport=transport, kcv=result.kcv_hsm1.hex(),
                    already_present=result.already_present))
                done.append(result)
        return done

    def _transfer_secret(self, transport: str, record: BlockRecord) -> Transferred:
        present = self._find(self.hsm1, record.label)
        if present is not None:
            if not hmac.compare_digest(present.kcv, record.kcv):
                raise FailedPrecondition(
                    f"HSM1 holds another key labelled {record.label} (KCV {present.kcv.hex()}, "
                    f"HSM2's is {record.kcv.hex()}); it is not overwritten")
            return Transferred(record.label, record.kcv, present.kcv, True)
        wrapped = self._call(f"wrapping {record.label} in HSM2", self.hsm.WrapKey,
                             hpb.WrapKeyRequest(
                                 wrapping_key=hpb.KeyRef(token=self.hsm2, label=transport),
                                 key=hpb.KeyRef(token=self.hsm2, label=record.label),
                                 mechanism=hpb.AES_KEY_WRAP_PAD))
        landed = self._call(f"unwrapping {record.label} in HSM1", self.hsm.UnwrapKey,
                            hpb.UnwrapKeyRequest(
                                unwrapping_key=hpb.KeyRef(token=self.hsm1, label=transport),
                                wrapped=wrapped.wrapped, mechanism=hpb.AES_KEY_WRAP_PAD,
                                key_class=hpb.SECRET_KEY,
                                algorithm=AES_ALGORITHMS[record.algorithm],
                                template=hpb.KeyTemplate(label=record.label,
                                                         usages=[hpb.DERIVE]),
                                expected_kcv=record.kcv))
        return Transferred(record.label, record.kcv, landed.kcv, False)

    def _transfer_pair(self, transport: str, record: BlockRecord) -> Transferred:
        already = True
        private = self._find(self.hsm1, record.label, hpb.PRIVATE_KEY)
        if private is None:
            already = False
            wrapped = self._call(f"wrapping {record.label} in HSM2", self.hsm.WrapKey,
                                 hpb.WrapKeyRequest(
                                     wrapping_key=hpb.KeyRef(token=self.hsm2, label=transport),
                                     key=hpb.KeyRef(token=self.hsm2, label=record.label),
                                     mechanism=hpb.AES_KEY_WRAP_PAD))
            self._call(f"unwrapping {record.label} in HSM1", self.hsm.UnwrapKey,
                       hpb.UnwrapKeyRequest(
                           unwrapping_key=hpb.KeyRef(token=self.hsm1, label=transport),
                           wrapped=wrapped.wrapped, mechanism=hpb.AES_KEY_WRAP_PAD,
                           key_class=hpb.PRIVATE_KEY,
                           algorithm=RSA_ALGORITHMS[record.algorithm],
                           template=hpb.KeyTemplate(label=record.label, usages=[hpb.DECRYPT])))
        # The private key's own modulus, before any public object joins it.
        kcv_hsm1 = kcv_of_public(self._public_der(self.hsm1, record.label))
        if not hmac.compare_digest(kcv_hsm1, record.kcv):
            if not already:
                self._destroy_quietly(hpb.KeyRef(token=self.hsm1, label=record.label))
            raise FailedPrecondition(
                f"HSM1's {record.label} has check value {kcv_hsm1.hex()}, HSM2's "
                f"{record.kcv.hex()}" + ("; the unwrapped key was destroyed" if not already
                                         else "; it is not overwritten"))
        if self._find(self.hsm1, record.label, hpb.PUBLIC_KEY) is None:
            already = False
            self._call(f"importing the public half of {record.label} into HSM1",
                       self.hsm.ImportPublicKey,
                       hpb.ImportPublicKeyRequest(token=self.hsm1,
                                                  public_key_der=self._public_der(
                                                      self.hsm2, record.label),
                                                  label=record.label, usages=[hpb.ENCRYPT]))
        return Transferred(record.label, record.kcv, kcv_hsm1, already)
