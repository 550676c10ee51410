"""The CardKeys servicer: card key sets and SCP03 channels held in the proxy.

Each request is checked and authorized here (every token and key label it
names, under the policy operation of the RPC), then sent to one worker: the
one that will own the new channel, or the one that owns an existing channel
or key set handle. What comes back to the caller is wrapped APDUs, handles,
KCVs and cryptograms; never a card key, R or a session key (see
``card_keys_ops`` for what the worker keeps in memory).
"""

from __future__ import annotations

from typing import Any

import grpc

from cardcore.issuance import MAX_CERTIFICATE
from cardcore.kcv import AES_KEY_LENGTHS
from cardcore.psd import ISD_AID
from cardcore.scp03 import VALID_SECURITY_LEVELS
from cardcore.sw import SW
from cms.runtime.errors import FailedPrecondition, InvalidArgument, ServiceError
from cms.v1 import card_channel_pb2 as chpb
from cms.v1 import card_keys_pb2 as pb
from cms.v1 import card_keys_pb2_grpc
from cms.v1 import hsm_pb2 as hpb
from hsm_proxy import card_keys_messages as cm
from hsm_proxy import key_classes as kc
from hsm_proxy.batches import BatchItem, run_batch
from hsm_proxy.core import Call, ProxyCore, rpc

MIN_AID_BYTES, MAX_AID_BYTES = 5, 16
MAX_ELEMENT_BYTES = 64
MAX_CRYPTOGRAM_BYTES = 512
MAX_COMMANDS = 32
MAX_APDU_BYTES = 4 + 3 + MAX_CERTIFICATE + 2
"""A command to wrap, extended length included: the longest is the issuance applet's PUT DATA
of a certificate (seed 004), up to the MAX_CERTIFICATE bytes the card keeps."""
MAX_RESPONSES = 64
CARD_KEY_SET_KIND = "card-key-set"
CHANNEL_KIND = "scp03-channel"
DIVERSIFIED_MASTERS = frozenset({hpb.MK_BLOCK, hpb.FACTORY_TRANSPORT_MASTER})
RANDOM_MASTERS = frozenset({hpb.MKRK_BLOCK})
CRYPTOGRAM_KEYS = frozenset({hpb.CRYPTOGRAM_PAIR})


def _check_foreseeable(commands: Any) -> None:
    """predict_responses foresees successes only: every command must expect 9000 alone."""
    for i, c in enumerate(commands):
        # A zero mask compares all 16 bits (the card channel's rule).
        if any(e.value != SW.OK or e.mask not in (0, 0xFFFF) for e in c.expect):
            raise InvalidArgument(f"commands[{i}]: predict_responses needs commands that "
                                  f"expect 9000 only (other answers cannot be foreseen)")


def _cryptogram_key(label: str, where: str) -> None:
    """A half of a cryptogram key pair is named, and of that class (PERMISSION_DENIED if not)."""
    if not label:
        raise InvalidArgument(f"{where}: required")
    kc.require_role(label, CRYPTOGRAM_KEYS, where)


class CardKeysServicer(card_keys_pb2_grpc.CardKeysServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    # -- request checks ------------------------------------------------------------
    def _source(self, call: Call, spec: pb.KeySetSpec, what: str,
                workers: set[int]) -> tuple[cm.KeySetSource, str]:
        """The checked, authorized source of a key set, and the label naming it in handles.

        Each source takes masters of fixed classes (card_keys.proto): a label
        of another class is refused here (PERMISSION_DENIED), before any HSM
        work; the worker checks the key itself (its origin and template).
        """
        match spec.WhichOneof("source"):
            case "handle":
                return self._held_set(call, spec.handle, what, workers)
            case "diversified":
                return self._diversified(call, spec, what)
            case "new_random":
                return self._new_random(call, spec, what)
            case "from_cryptogram":
                return self._from_cryptogram(call, spec, what)
            case _:
                raise InvalidArgument(f"{what}: give a source (diversified, new_random, "
                                      f"from_cryptogram or handle)")

    def _held_set(self, call: Call, handle: str, what: str, workers: set[int]
                  ) -> tuple[cm.KeySetHandle, str]:
        record = self.core.handles.lookup(call.identity, handle,
                                          worker_state=self.core.pool.worker_state)
        if record.kind != CARD_KEY_SET_KIND:
            raise InvalidArgument(f"{what}.handle is not a card key set")
        call.authorize(record.token, record.label)
        workers.add(record.worker)
        return cm.KeySetHandle(record.token, handle), record.label

    def _checked_master(self, call: Call, spec: pb.KeySetSpec, kind: str,
                        masters: frozenset[int], what: str) -> str:
        """What every derived source checks first (the key length, the token, a master of
        ``masters`` the caller may use); the token."""
        token = spec.token
        if spec.key_length not in AES_KEY_LENGTHS:
            raise InvalidArgument(f"{what}.key_length: 16, 24 or 32")
        self.core.require_token(token, f"{what}.token")
        master_label = getattr(spec, kind).master_label
        if not master_label:
            raise InvalidArgument(f"{what}.{kind}.master_label: required")
        kc.require_role(master_label, masters, f"{what}.{kind}.master_label")
        call.authorize(token, master_label)
        return token

    def _diversified(self, call: Call, spec: pb.KeySetSpec, what: str
                     ) -> tuple[cm.Diversified, str]:
        token = self._checked_master(call, spec, "diversified", DIVERSIFIED_MASTERS, what)
        source = spec.diversified
        if not 1 <= len(source.element) <= MAX_ELEMENT_BYTES:
            raise InvalidArgument(f"{what}.diversified.element: 1 to "
                                  f"{MAX_ELEMENT_BYTES} bytes (e.g. the 10-byte PSD id)")
        return cm.Diversified(token, spec.key_length, source.master_label,
                              bytes(source.element)), source.master_label

    def _new_random(self, call: Call, spec: pb.KeySetSpec, what: str
                    ) -> tuple[cm.NewRandom, str]:
        token = self._checked_master(call, spec, "new_random", RANDOM_MASTERS, what)
        source = spec.new_random
        _cryptogram_key(source.public_key_label, f"{what}.new_random.public_key_label")
        call.authorize(token, source.public_key_label)
        return cm.NewRandom(token, spec.key_length, source.master_label,
                            source.public_key_label), source.master_label

    def _from_cryptogram(self, call: Call, spec: pb.KeySetSpec, what: str
                         ) -> tuple[cm.FromCryptogram, str]:
        token = self._checked_master(call, spec, "from_cryptogram", RANDOM_MASTERS, what)
        source = spec.from_cryptogram
        _cryptogram_key(source.private_key_label, f"{what}.from_cryptogram.private_key_label")
        if not 1 <= len(source.cryptogram) <= MAX_CRYPTOGRAM_BYTES:
            raise InvalidArgument(f"{what}.from_cryptogram.cryptogram: 1 to "
                                  f"{MAX_CRYPTOGRAM_BYTES} bytes")
        call.authorize(token, source.private_key_label)
        return cm.FromCryptogram(token, spec.key_length, source.master_label,
                                 source.private_key_label,
                                 bytes(source.cryptogram)), source.master_label

    def _commands(self, call: Call, commands: Any, workers: set[int]) -> tuple[cm.Command, ...]:
        if len(commands) > MAX_COMMANDS:
            raise InvalidArgument(f"commands: at most {MAX_COMMANDS} per call")
        out = []
        for i, c in enumerate(commands):
            kind = c.WhichOneof("command")
            if kind == "apdu":
                if not 4 <= len(c.apdu) <= MAX_APDU_BYTES:
                    raise InvalidArgument(f"commands[{i}].apdu: 4 to {MAX_APDU_BYTES} bytes")
                out.append(cm.Command(apdu=bytes(c.apdu)))
            elif kind == "put_key_set":
                p = c.put_key_set
                if not 1 <= p.new_kvn <= 0xFF or not 0 <= p.replace_kvn <= 0xFF:
                    raise InvalidArgument(f"commands[{i}].put_key_set: KVNs are 1..255")
                if p.key_set.WhichOneof("source") == "handle":
                    raise InvalidArgument(f"commands[{i}].put_key_set.key_set: a key set handle "
                                          f"opens channels; a PUT KEY derives the set it "
                                          f"installs inside the call (give its source)")
                source, _ = self._source(call, p.key_set, f"commands[{i}].put_key_set.key_set",
                                         workers)
                out.append(cm.Command(put=source, new_kvn=p.new_kvn, replace_kvn=p.replace_kvn))
            else:
                raise InvalidArgument(f"commands[{i}]: an apdu or a put_key_set")
        return tuple(out)

    @staticmethod
    def _pin(workers: set[int]) -> int | None:
        if len(workers) > 1:
            raise FailedPrecondition("the key set handles of one request live in different "
                                     "proxy workers; derive them in one request")
        return next(iter(workers), None)

    def _answer(self, commands: list[Any], expect: list[list[Any]], offset: int
                ) -> tuple[list[pb.WrappedCommand], list[pb.SpecCryptogram], list[pb.PutKeyInfo]]:
        wrapped, cryptograms, puts = [], [], []
        for i, w in enumerate(commands):
            wrapped.append(pb.WrappedCommand(apdu=w.apdu, expect=expect[i],
                                             expected_put_key_response=w.expected_put_key_response,
                                             expected_response=w.expected_response))
            if w.cryptogram:
                cryptograms.append(pb.SpecCryptogram(position=offset + i, cryptogram=w.cryptogram))
            if w.put is not None:
                kvn, enc, mac, dek = w.put
                puts.append(pb.PutKeyInfo(index=offset + i, new_kvn=kvn, kcv_enc=enc,
                                          kcv_mac=mac, kcv_dek=dek))
        return wrapped, cryptograms, puts

    # -- RPCs --------------------------------------------------------------------------
    @rpc
    def DeriveKeySet(self, request: pb.DeriveKeySetRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.KeySet:
        core = self.core
        workers: set[int] = set()
        source, label = self._source(call, request.spec, "spec", workers)
        record = core.new_handle(call, CARD_KEY_SET_KIND, source.token, label,
                                 worker=self._pin(workers))
        enc, mac, dek, cryptogram = core.create_state(
            call, record, "card_keys.derive_set", cm.DeriveSet(record.handle, source),
            idempotent=False)
        return pb.KeySet(handle=record.handle, kcv_enc=enc, kcv_mac=mac, kcv_dek=dek,
                         cryptogram=cryptogram)

    def _open_payload(self, call: Call, request: pb.OpenSecureChannelRequest
                      ) -> tuple[cm.OpenChannel, int | None, Any]:
        """The checked, authorized worker payload of one OpenSecureChannel.

        Also the worker it must run in (None: any), and the handle record the
        channel will live under (None with ``predict_responses``: nothing
        stays in the worker).
        """
        if request.security_level not in VALID_SECURITY_LEVELS:
            raise InvalidArgument("security_level: one of 0x00, 0x01, 0x03, 0x11, 0x13, 0x33")
        if not 1 <= request.kvn <= 0xFF:
            raise InvalidArgument("kvn: 1..255")
        if len(request.host_challenge) not in (8, 16):
            raise InvalidArgument("host_challenge: 8 bytes (S8) or 16 bytes (S16)")
        if not 13 <= len(request.initialize_update_response) <= 64:
            raise InvalidArgument("initialize_update_response: the card's answer without SW")
        if request.aid and not MIN_AID_BYTES <= len(request.aid) <= MAX_AID_BYTES:
            raise InvalidArgument(f"aid: {MIN_AID_BYTES} to {MAX_AID_BYTES} bytes (the "
                                  f"security domain the card's challenge was made for)")
        workers: set[int] = set()
        source, label = self._source(call, request.key_set, "key_set", workers)
        commands = self._commands(call, request.commands, workers)
        record = None
        if request.predict_responses:
            _check_foreseeable(request.commands)
            worker = self._pin(workers)
        else:
            record = self.core.new_handle(call, CHANNEL_KIND, source.token, label,
                                          worker=self._pin(workers))
            worker = record.worker
        payload = cm.OpenChannel("" if record is None else record.handle, source, request.kvn,
                                 bytes(request.host_challenge),
                                 bytes(request.initialize_update_response),
                                 request.security_level, commands,
                                 # A pseudo-random card challenge is always checked:
                                 # against the ISD when the caller names no domain.
                                 bytes(request.aid) if request.aid else ISD_AID,
                                 predict=request.predict_responses)
        return payload, worker, record

    def _opened(self, request: pb.OpenSecureChannelRequest, wrapped: list[Any],
                channel: str = "") -> pb.OpenSecureChannelResponse:
        expect = [[chpb.ExpectedStatus(value=SW.OK, mask=0xFFFF)]]
        expect += [list(c.expect) for c in request.commands]
        commands, cryptograms, puts = self._answer(wrapped, expect, 0)
        return pb.OpenSecureChannelResponse(channel=channel, commands=commands,
                                            cryptograms=cryptograms, put_keys=puts)

    @rpc
    def OpenSecureChannel(self, request: pb.OpenSecureChannelRequest,
                          context: grpc.ServicerContext,
                          call: Call) -> pb.OpenSecureChannelResponse:
        core = self.core
        call.items = len(request.commands)
        payload, worker, record = self._open_payload(call, request)
        if record is None:
            wrapped = core.pool.call("card_keys.open", payload, worker=worker,
                                     idempotent=False, timeout=call.timeout()).value
            return self._opened(request, wrapped)
        wrapped = core.create_state(call, record, "card_keys.open", payload, idempotent=False)
        return self._opened(request, wrapped, record.handle)

    @rpc
    def OpenSecureChannelBatch(self, request: pb.OpenSecureChannelBatchRequest,
                               context: grpc.ServicerContext,
                               call: Call) -> pb.OpenSecureChannelBatchResponse:
        """Many cards' channels in one call: what the access server's contacts send together.

        One unary call costs this frontend about as much CPU as a quarter of
        a card's HSM work; under load, the access server gathers the channels
        its concurrent contacts open and sends them here at once. Each item
        is checked and authorized as OpenSecureChannel checks it (a denial
        fails the whole call, as in the Hsm batches); other item failures
        come back in the item. Items run spread over the workers.
        """
        def check(item: pb.OpenSecureChannelRequest) -> BatchItem:
            if not item.predict_responses:
                raise InvalidArgument("predict_responses: required in a batch (a batch "
                                      "keeps no channel open)")
            payload, worker, _ = self._open_payload(call, item)
            return BatchItem(payload, worker)

        return run_batch(self.core, call, request.items, check, "card_keys.open",
                         pb.OpenSecureChannelBatchResponse(), "opened", idempotent=False,
                         min_chunk=1, answer=lambda item, wrapped, _: self._opened(item, wrapped))

    def _channel(self, call: Call, handle: str) -> Any:
        record = self.core.handles.lookup(call.identity, handle,
                                          worker_state=self.core.pool.worker_state)
        if record.kind != CHANNEL_KIND:
            raise InvalidArgument("channel: not a secure channel handle")
        call.authorize(record.token, record.label)
        return record

    @rpc
    def WrapCommands(self, request: pb.WrapCommandsRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.WrapCommandsResponse:
        record = self._channel(call, request.channel)
        workers = {record.worker}
        commands = self._commands(call, request.commands, workers)
        self._pin(workers)
        call.items = len(commands)
        reply = self.core.pool.call("card_keys.wrap", cm.Wrap(record.handle, commands),
                                    worker=record.worker, idempotent=False,
                                    timeout=call.timeout())
        # Cryptogram positions count the commands of this call from 1 (0 is no key set).
        wrapped, cryptograms, puts = self._answer(
            reply.value, [list(c.expect) for c in request.commands], 1)
        for p in puts:
            p.index -= 1
        return pb.WrapCommandsResponse(commands=wrapped, cryptograms=cryptograms, put_keys=puts)

    @rpc
    def UnwrapResponses(self, request: pb.UnwrapResponsesRequest, context: grpc.ServicerContext,
                        call: Call) -> pb.UnwrapResponsesResponse:
        core = self.core
        record = self._channel(call, request.channel)
        if len(request.responses) > MAX_RESPONSES:
            raise InvalidArgument(f"responses: at most {MAX_RESPONSES}")
        responses = []
        for i, r in enumerate(request.responses):
            if not 0 <= r.sw <= 0xFFFF or len(r.data) > 0x10000:
                raise InvalidArgument(f"responses[{i}]: status word or data out of range")
            responses.append((bytes(r.data), r.sw))
        call.items = len(responses)
        try:
            reply = core.pool.call("card_keys.unwrap",
                                   cm.Unwrap(record.handle, tuple(responses), request.close),
                                   worker=record.worker, idempotent=False,
                                   timeout=call.timeout())
        except ServiceError as exc:
            if exc.code == grpc.StatusCode.DATA_LOSS:
                self._release(record, call)
            raise
        if request.close:
            # The worker freed the state with the answers; the handle goes too.
            core.handles.release(call.identity, [record.handle])
            core.update_handle_gauge()
        return pb.UnwrapResponsesResponse(
            responses=[chpb.ApduResponse(data=data, sw=sw) for data, sw in reply.value])

    def _release(self, record: Any, call: Call) -> None:
        core = self.core
        for released in core.handles.release(call.identity, [record.handle]):
            core.pool.control(released.worker, "release", [released.handle],
                              timeout=call.timeout())
        core.update_handle_gauge()


def register(server: grpc.Server, core: ProxyCore) -> list[str]:
    card_keys_pb2_grpc.add_CardKeysServicer_to_server(CardKeysServicer(core), server)
    return ["cms.v1.CardKeys"]
