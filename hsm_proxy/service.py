"""The ``cms.v1.Hsm`` servicer: validate, authorize, route to workers, answer.

Every method validates its request (malformed -> INVALID_ARGUMENT before any
HSM work), authorizes each key it touches (a new key's label is checked like
any other), checks the key's class (this service creates and uses operator
keys only: any other class is PERMISSION_DENIED, whatever the policy says;
inspection and public keys excepted), resolves handles to their worker, and
sends a ``hsm_proxy.messages`` payload to the worker pool. Batches run
through ``hsm_proxy.batches``: a denied key denies the whole batch, while
per-item problems (unknown key, bad data) come back per item; SignBatch
authorizes each distinct key once.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import grpc

from cms.runtime.errors import (
    InvalidArgument,
    ServiceError,
    Unavailable,
)
from cms.v1 import hsm_pb2 as pb
from cms.v1 import hsm_pb2_grpc
from hsm_proxy import key_classes as kc
from hsm_proxy import messages as m
from hsm_proxy.batches import BatchItem, HandleItem, run_batch
from hsm_proxy.core import Call, ProxyCore, Target, rpc
from hsm_proxy.handles import HandleRecord

AES_BLOCK = 16
ECDSA_DIGEST_SIZES = (20, 28, 32, 48, 64)
MAX_SIGNATURE_BYTES = 1024
MAX_SPKI_BYTES = 4096
AES_KEY_BYTES = {pb.AES_128: 16, pb.AES_192: 24, pb.AES_256: 32}
PAIR_ALGORITHMS = (pb.EC_P256, pb.EC_SECP256K1, pb.RSA_2048, pb.RSA_3072)
SECRET_ALGORITHMS = (pb.AES_128, pb.AES_192, pb.AES_256, pb.GENERIC_SECRET)
SIGN_MECHANISMS = frozenset(v for v in pb.SignMechanism.values() if v)
OAEP_NOTE = "RSA-OAEP is offered with SHA-1 and MGF1-SHA1 only (what SoftHSM2 implements)"
OPERATOR = frozenset({pb.OPERATOR_KEY})


def operator_key(target: Target, what: str = "key") -> Target:
    """``target`` when it names an operator key; KeyClassError (PERMISSION_DENIED) otherwise."""
    kc.require_role(target.label, OPERATOR, what)
    return target


def _enum_name(enum: Any, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def _check_enum(enum: Any, value: int, what: str, note: str = "") -> int:
    if value == 0 or value not in enum.values():
        names = ", ".join(n for n in enum.keys() if enum.Value(n) != 0)
        extra = f"; {note}" if note else ""
        raise InvalidArgument(f"{what}: unknown or unspecified value {value} (one of {names})"
                              f"{extra}")
    return value


class HsmServicer(hsm_pb2_grpc.HsmServicer):
    def __init__(self, core: ProxyCore):
        self.core = core

    # -- helpers --------------------------------------------------------------------
    def _key_info(self, raw: bytes, record: HandleRecord | None = None) -> pb.KeyInfo:
        info = pb.KeyInfo.FromString(raw)
        if record is not None:
            info.expires.FromNanoseconds(int(record.expires_at * 1e9))
        return info

    def _create(self, call: Call, op: str, token: str, template: m.Template,
                payload_for: Any, *, kind: str = "key", idempotent: bool = False
                ) -> tuple[Any, HandleRecord | None]:
        """Run a key-creating worker operation: a session key gets a handle (and is
        bound to its worker), a persistent key is created under the label lock."""
        core = self.core
        if template.session:
            record = core.new_handle(call, kind, token, template.label)
            return core.create_state(call, record, op, payload_for(template._replace(
                handle=record.handle)), idempotent=idempotent), record
        with core.creating([(token, template.label)]):
            reply = core.pool.call(op, payload_for(template), idempotent=False,
                                   timeout=call.timeout())
            # A worker may hold the label's objects from before (a public key that
            # completes a pair joins a private key already cached): all forget it.
            core.pool.broadcast("invalidate", [(token, template.label)])
        return reply.value, None

    def _call(self, call: Call, op: str, payload: Any, target: Target | None = None, *,
              idempotent: bool = True) -> Any:
        worker = target.worker if target is not None else None
        return self.core.pool.call(op, payload, worker=worker, idempotent=idempotent,
                                   timeout=call.timeout()).value

    # -- tokens and listing -------------------------------------------------------------
    @rpc
    def ListTokens(self, request: pb.ListTokensRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.ListTokensResponse:
        core = self.core
        core.policy.check(call.identity, "ListTokens")
        assert call.identity is not None
        visible = [t for t in core.tokens if core.policy.allowed(call.identity, "ListTokens", t)]
        for t in visible:
            call.touch(t)
        try:
            infos = {i["label"]: i for i in self._call(call, "tokens", None)}
        except Unavailable:
            infos = {}
        out = pb.ListTokensResponse()
        for label in visible:
            info = infos.get(label, {"label": label, "available": False})
            out.tokens.add(label=label, manufacturer=info.get("manufacturer", ""),
                           model=info.get("model", ""), serial=info.get("serial", ""),
                           logged_in=bool(info.get("logged_in")),
                           available=bool(info.get("available")))
        return out

    @rpc
    def ListKeys(self, request: pb.ListKeysRequest, context: grpc.ServicerContext,
                 call: Call) -> pb.ListKeysResponse:
        if request.key_class and request.key_class not in pb.KeyClass.values():
            raise InvalidArgument(f"key_class: unknown value {request.key_class}")
        out = pb.ListKeysResponse(keys=self.core.visible_keys(
            call, request.token, request.label_pattern, request.key_class))
        call.items = len(out.keys)
        return out

    # -- generation -------------------------------------------------------------------
    def _generation(self, call: Call, request: Any, allowed: Collection[int], kind: str,
                    other_rpc: str) -> tuple[m.Template, int]:
        """The checked template and algorithm of a generation request: authorized for
        its token and label first, then an algorithm of the ``kind`` this RPC makes."""
        core = self.core
        call.authorize(request.token or None, request.template.label or None)
        core.require_token(request.token)
        template = core.template(request.template)
        algorithm = _check_enum(pb.KeyAlgorithm, request.algorithm, "algorithm")
        if algorithm not in allowed:
            raise InvalidArgument(f"algorithm {_enum_name(pb.KeyAlgorithm, algorithm)} is not a "
                                  f"{kind} algorithm; use {other_rpc}")
        return template, algorithm

    @rpc
    def GenerateSecretKey(self, request: pb.GenerateSecretKeyRequest,
                          context: grpc.ServicerContext, call: Call) -> pb.KeyInfo:
        template, algorithm = self._generation(call, request, SECRET_ALGORITHMS,
                                               "secret key", "GenerateKeyPair")
        raw, record = self._create(call, "generate_secret", request.token, template,
                                   lambda t: m.GenerateSecret(request.token, algorithm,
                                                              request.length_bytes, t))
        return self._key_info(raw, record)

    @rpc
    def GenerateKeyPair(self, request: pb.GenerateKeyPairRequest,
                        context: grpc.ServicerContext, call: Call) -> pb.KeyInfo:
        template, algorithm = self._generation(call, request, PAIR_ALGORITHMS,
                                               "key pair", "GenerateSecretKey")
        raw, record = self._create(call, "generate_pair", request.token, template,
                                   lambda t: m.GeneratePair(request.token, algorithm, t))
        return self._key_info(raw, record)

    # -- derivation ---------------------------------------------------------------------
    def _derive_item(self, call: Call, req: pb.DeriveKeyRequest) -> tuple[Target, m.DeriveItem]:
        core = self.core
        base = operator_key(core.key_target(call, req.base_key, "base_key",
                                            operation="DeriveKey"), "base_key")
        call.authorize(base.token, req.template.label or None, operation="DeriveKey")
        template = core.template(req.template)
        mechanism = _check_enum(pb.DeriveMechanism, req.mechanism, "mechanism")
        algorithm = _check_enum(pb.KeyAlgorithm, req.algorithm, "algorithm")
        if algorithm in AES_KEY_BYTES:
            size = AES_KEY_BYTES[algorithm]
        elif algorithm == pb.GENERIC_SECRET:
            size = req.length_bytes
        else:
            raise InvalidArgument("algorithm: a derived key is AES_128/192/256 or GENERIC_SECRET")
        data = core.data(req.data)
        if not data or len(data) % AES_BLOCK:
            raise InvalidArgument(f"data: derivation data must be a non-empty multiple of "
                                  f"{AES_BLOCK} bytes, got {len(data)}")
        if len(data) < size:
            raise InvalidArgument(f"data: {len(data)} bytes cannot make a {size}-byte key")
        if mechanism == pb.AES_CBC_ENCRYPT_DATA:
            if len(req.iv) != AES_BLOCK:
                raise InvalidArgument(f"iv: AES_CBC_ENCRYPT_DATA needs a {AES_BLOCK}-byte IV")
        elif req.iv:
            raise InvalidArgument("iv: AES_ECB_ENCRYPT_DATA takes no IV")
        item = m.DeriveItem(base.ref, mechanism, data, bytes(req.iv), algorithm,
                            req.length_bytes, template)
        return base, item

    @rpc
    def DeriveKey(self, request: pb.DeriveKeyRequest, context: grpc.ServicerContext,
                  call: Call) -> pb.KeyInfo:
        core = self.core
        base, item = self._derive_item(call, request)
        t = item.template
        if t.session:
            # The new key lives beside its base when the base is a handle.
            record = core.new_handle(call, "key", base.token, t.label, worker=base.worker)
            raw = core.create_state(call, record, "derive", item._replace(
                template=t._replace(handle=record.handle)), idempotent=True)
            return self._key_info(raw, record)
        with core.creating([(base.token, t.label)]):
            raw = core.pool.call("derive", item, worker=base.worker, idempotent=False,
                                 timeout=call.timeout()).value
        return self._key_info(raw)

    @rpc
    def DeriveKeyBatch(self, request: pb.DeriveKeyBatchRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.DeriveKeyBatchResponse:
        def check(req: pb.DeriveKeyRequest) -> BatchItem | HandleItem:
            base, item = self._derive_item(call, req)
            t = item.template
            if not t.session:
                return BatchItem(item, base.worker, creates=(base.token, t.label))
            # The new key lives beside its base when the base is a handle.
            return HandleItem("key", base.token, t.label, lambda handle: item._replace(
                template=t._replace(handle=handle)), worker=base.worker)

        return run_batch(self.core, call, request.items, check, "derive",
                         pb.DeriveKeyBatchResponse(), "key",
                         answer=lambda _, raw, record: self._key_info(raw, record))

    # -- public keys ----------------------------------------------------------------------
    @rpc
    def ImportPublicKey(self, request: pb.ImportPublicKeyRequest,
                        context: grpc.ServicerContext, call: Call) -> pb.KeyInfo:
        core = self.core
        call.authorize(request.token or None, request.label or None)
        core.require_token(request.token)
        if not request.public_key_der or len(request.public_key_der) > MAX_SPKI_BYTES:
            raise InvalidArgument(f"public_key_der: 1 to {MAX_SPKI_BYTES} bytes of DER")
        template = core.template(pb.KeyTemplate(label=request.label, usages=request.usages,
                                                session=request.session))
        raw, record = self._create(call, "import_public", request.token, template,
                                   lambda t: m.ImportPublic(request.token,
                                                            request.public_key_der, t))
        return self._key_info(raw, record)

    # -- ciphers ------------------------------------------------------------------------
    def _cipher_item(self, call: Call, req: pb.CipherRequest, decrypt: bool,
                     operation: str) -> tuple[Target, m.CipherItem]:
        core = self.core
        target = operator_key(core.key_target(call, req.key, operation=operation))
        mechanism = _check_enum(pb.CipherMechanism, req.mechanism, "mechanism", OAEP_NOTE)
        data = core.data(req.data, allow_empty=False)
        if mechanism in (pb.CIPHER_AES_ECB, pb.CIPHER_AES_CBC) and len(data) % AES_BLOCK:
            raise InvalidArgument(f"data: {_enum_name(pb.CipherMechanism, mechanism)} takes "
                                  f"whole {AES_BLOCK}-byte blocks (no padding), got "
                                  f"{len(data)} bytes")
        if mechanism == pb.CIPHER_AES_CBC:
            if len(req.iv) != AES_BLOCK:
                raise InvalidArgument(f"iv: CIPHER_AES_CBC needs a {AES_BLOCK}-byte IV")
        elif req.iv:
            raise InvalidArgument(f"iv: {_enum_name(pb.CipherMechanism, mechanism)} takes no IV")
        return target, m.CipherItem(target.ref, mechanism, bytes(req.iv), data, decrypt)

    @rpc
    def Encrypt(self, request: pb.CipherRequest, context: grpc.ServicerContext,
                call: Call) -> pb.CipherResponse:
        target, item = self._cipher_item(call, request, False, "Encrypt")
        return pb.CipherResponse(data=self._call(call, "cipher", item, target))

    @rpc
    def Decrypt(self, request: pb.CipherRequest, context: grpc.ServicerContext,
                call: Call) -> pb.CipherResponse:
        target, item = self._cipher_item(call, request, True, "Decrypt")
        return pb.CipherResponse(data=self._call(call, "cipher", item, target))

    @rpc
    def EncryptBatch(self, request: pb.CipherBatchRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.CipherBatchResponse:
        def check(req: pb.CipherRequest) -> BatchItem:
            target, item = self._cipher_item(call, req, False, "EncryptBatch")
            return BatchItem(item, target.worker)

        return run_batch(self.core, call, request.items, check, "cipher",
                         pb.CipherBatchResponse(), "data")

    # -- signatures -------------------------------------------------------------------
    def _sign_item(self, call: Call, req: pb.SignRequest, operation: str
                   ) -> tuple[Target, m.SignItem]:
        core = self.core
        target = operator_key(core.key_target(call, req.key, operation=operation))
        mechanism = _check_enum(pb.SignMechanism, req.mechanism, "mechanism")
        data = core.data(req.data)
        if mechanism == pb.ECDSA and len(data) not in ECDSA_DIGEST_SIZES:
            raise InvalidArgument(f"data: ECDSA signs a digest of {ECDSA_DIGEST_SIZES} bytes, "
                                  f"got {len(data)} (use ECDSA_SHA256 to sign a message)")
        return target, m.SignItem(target.ref, mechanism, data)

    @rpc
    def Sign(self, request: pb.SignRequest, context: grpc.ServicerContext,
             call: Call) -> pb.SignResponse:
        target, item = self._sign_item(call, request, "Sign")
        return pb.SignResponse(signature=self._call(call, "sign", item, target))

    @rpc
    def SignBatch(self, request: pb.SignBatchRequest, context: grpc.ServicerContext,
                  call: Call) -> pb.SignBatchResponse:
        core = self.core
        # Hot path: authorize each distinct key once; only an item whose mechanism
        # or data looks wrong is checked in full, to answer it as Sign would.
        targets: dict[tuple[str, str, str], Target | ServiceError] = {}
        limit = core.limits.max_data_bytes

        def check(req: pb.SignRequest) -> BatchItem:
            ref = req.key
            k = (ref.token, ref.label, ref.handle)
            target = targets.get(k)
            if target is None:
                try:
                    target = operator_key(core.key_target(call, ref, operation="SignBatch"))
                except ServiceError as exc:
                    if exc.code == grpc.StatusCode.PERMISSION_DENIED:
                        raise
                    target = exc
                targets[k] = target
            if isinstance(target, ServiceError):
                # Every item naming this key gets the same answer (raised afresh).
                raise target.with_traceback(None)
            mechanism, data = req.mechanism, req.data
            if (mechanism not in SIGN_MECHANISMS or len(data) > limit
                    or (mechanism == pb.ECDSA and len(data) not in ECDSA_DIGEST_SIZES)):
                self._sign_item(call, req, "SignBatch")
            return BatchItem(m.SignItem(target.ref, mechanism, data), target.worker)

        return run_batch(core, call, request.items, check, "sign", pb.SignBatchResponse(),
                         "signature")

    @rpc
    def Verify(self, request: pb.VerifyRequest, context: grpc.ServicerContext,
               call: Call) -> pb.VerifyResponse:
        core = self.core
        target = operator_key(core.key_target(call, request.key))
        mechanism = _check_enum(pb.SignMechanism, request.mechanism, "mechanism")
        data = core.data(request.data)
        if mechanism == pb.ECDSA and len(data) not in ECDSA_DIGEST_SIZES:
            raise InvalidArgument(f"data: ECDSA verifies a digest of {ECDSA_DIGEST_SIZES} "
                                  f"bytes, got {len(data)}")
        if not request.signature or len(request.signature) > MAX_SIGNATURE_BYTES:
            raise InvalidArgument(f"signature: 1 to {MAX_SIGNATURE_BYTES} bytes")
        valid = self._call(call, "verify", m.VerifyItem(target.ref, mechanism, data,
                                                        request.signature), target)
        return pb.VerifyResponse(valid=valid)

    # -- misc ------------------------------------------------------------------------------
    @rpc
    def GenerateRandom(self, request: pb.GenerateRandomRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.GenerateRandomResponse:
        core = self.core
        call.authorize(request.token or None)
        core.require_token(request.token)
        if not 1 <= request.length <= core.limits.max_data_bytes:
            raise InvalidArgument(f"length: 1 to {core.limits.max_data_bytes} bytes")
        call.items = request.length
        return pb.GenerateRandomResponse(
            data=self._call(call, "random", m.Random(request.token, request.length)))

    @rpc
    def GetPublicKey(self, request: pb.GetPublicKeyRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.GetPublicKeyResponse:
        target = self.core.key_target(call, request.key)
        der, algorithm = self._call(call, "public_key", target.ref, target)
        return pb.GetPublicKeyResponse(public_key_der=der, algorithm=algorithm)

    @rpc
    def GetKeyAttributes(self, request: pb.GetKeyAttributesRequest,
                         context: grpc.ServicerContext, call: Call) -> pb.KeyInfo:
        target = self.core.key_target(call, request.key)
        if request.key_class and request.key_class not in pb.KeyClass.values():
            raise InvalidArgument(f"key_class: unknown value {request.key_class}")
        raw = self._call(call, "describe", m.Describe(target.ref, request.key_class), target)
        return self._key_info(raw, target.record)

    @rpc
    def DestroyKey(self, request: pb.DestroyKeyRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.DestroyKeyResponse:
        core = self.core
        target = operator_key(core.key_target(call, request.key))
        if target.record is not None:
            count = self._call(call, "destroy", m.Destroy(target.ref), target, idempotent=False)
            core.handles.end(target.record, "was destroyed")
            core.update_handle_gauge()
            return pb.DestroyKeyResponse(destroyed=count)
        with core.creating([(target.token, target.label)]):
            count = self._call(call, "destroy", m.Destroy(target.ref), idempotent=False)
            # Every worker forgets the label's cached handles before we answer, so
            # no later call can reach a destroyed (or reassigned) object handle.
            core.pool.broadcast("invalidate", [(target.token, target.label)])
        return pb.DestroyKeyResponse(destroyed=count)

    @rpc
    def ReleaseHandles(self, request: pb.ReleaseHandlesRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.ReleaseHandlesResponse:
        core = self.core
        # Releasing one's own handles only gives up access: any identity the
        # policy knows may do it (unknown identities were refused by @rpc).
        assert call.identity is not None
        released = core.handles.release(call.identity, list(request.handles))
        by_worker: dict[int, list[str]] = {}
        for record in released:
            call.touch(record.token, record.label, record.handle)
            by_worker.setdefault(record.worker, []).append(record.handle)
        for worker, handles in by_worker.items():
            # A worker that restarted has lost the state anyway.
            core.pool.control(worker, "release", handles, timeout=call.timeout())
        call.items = len(request.handles)
        core.update_handle_gauge()
        return pb.ReleaseHandlesResponse(released=len(released))
