"""The ProviderCa and IssuerKeys servicers: the provider's root CA and the issuer keys.

Each RPC checks its request, authorizes the token and the label it names
under the policy (``provider-root/<id>`` on token ``provider``,
``issuer/<version>`` on token ``issuer``), and runs one worker operation
(``hsm_proxy.provider_ops``); ``@rpc`` writes one audit record. The inputs
a caller gives are the only parts of a signed structure it chooses: a
provider id, card serials and public keys (each checked: RSA-2048 with
e = 65537, a point on P-256), a pack's SHA-256. Responses carry
certificates, signatures and public keys, never a private key.
"""

from __future__ import annotations

import hashlib
import uuid

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cardcore import issuance
from cardcore import issuance_keys as ik
from cms import keynames
from cms import pack_format as pf
from cms.runtime.errors import InvalidArgument
from cms.v1 import provider_pb2 as pb
from cms.v1 import provider_pb2_grpc
from hsm_proxy import provider_ops as ops
from hsm_proxy import provider_x509 as px
from hsm_proxy.core import Call, ProxyCore, rpc
from hsm_proxy.errors import from_wire
from hsm_proxy.worker import Failure

CARDS_CHUNK = 8
"""Cards worth a worker of their own (each takes milliseconds, mostly building DER)."""


def _provider_id(value: str) -> str:
    try:
        keynames.provider_root_label(value)
    except ValueError as exc:
        raise InvalidArgument(f"provider_id: {exc}") from None
    return value


def _root_validity(days: int) -> int:
    if days == 0:
        return px.ROOT_VALIDITY_DAYS
    if days > px.MAX_ROOT_VALIDITY_DAYS:
        raise InvalidArgument(f"validity_days: at most {px.MAX_ROOT_VALIDITY_DAYS}")
    return days


def device_spki(der: bytes) -> bytes:
    """The canonical SubjectPublicKeyInfo of a device key: RSA-2048, e = 65537."""
    key = ik.rsa_from_spki(der)
    ik.check_device_key_shape(key)
    return ik.rsa_spki(key)


def issuer_auth_spki(der: bytes) -> bytes:
    """The canonical SubjectPublicKeyInfo of an issuer authentication key (P-256)."""
    return ik.ec_spki(ik.ec_point_from_spki(der))


def check_card(index: int, card: pb.CardPublicKeys, seen: set[str]) -> ops.CardKeys:
    """One card of a request, its keys checked; InvalidArgument naming the item."""
    where = f"cards[{index}]"
    try:
        serial = issuance.check_serial(card.serial)
    except issuance.IssuanceError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    where = f"{where} (serial {serial})"
    if serial in seen:
        raise InvalidArgument(f"{where}: the serial appears twice in the request")
    seen.add(serial)
    checked = []
    for field, check in (("device_public_key", device_spki),
                         ("issuer_auth_public_key", issuer_auth_spki)):
        try:
            checked.append(check(bytes(getattr(card, field))))
        except issuance.IssuanceError as exc:
            raise InvalidArgument(f"{where}: {field}: {exc}") from None
    return ops.CardKeys(serial, *checked)


def root_message(provider_id: str, der: bytes) -> pb.RootCertificate:
    return pb.RootCertificate(provider_id=provider_id, certificate=der,
                              fingerprint=hashlib.sha256(der).digest())


class ProviderCaServicer(provider_pb2_grpc.ProviderCaServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def _root(self, call: Call, token: str, provider_id: str) -> ops.RootRef:
        """The authorized root of a request (token default ``provider``)."""
        token = token or keynames.PROVIDER_TOKEN
        label = keynames.provider_root_label(_provider_id(provider_id))
        call.authorize(token, label)
        self.core.require_token(token)
        return ops.RootRef(token, label)

    @rpc
    def CreateRoot(self, request: pb.CreateRootRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.RootCertificate:
        core = self.core
        root = self._root(call, request.token, request.provider_id)
        days = _root_validity(request.validity_days)
        with core.creating([(root.token, root.label)]):
            der = core.pool.call("provider.create_root", ops.CreateRoot(
                root.token, root.label, request.provider_id, days), idempotent=False,
                timeout=call.timeout()).value
            core.pool.broadcast("invalidate", [(root.token, root.label)])
        return root_message(request.provider_id, der)

    @rpc
    def GetRoot(self, request: pb.GetRootRequest, context: grpc.ServicerContext,
                call: Call) -> pb.RootCertificate:
        root = self._root(call, request.token, request.provider_id)
        der = self.core.pool.call("provider.get_root", root, idempotent=True,
                                  timeout=call.timeout()).value
        return root_message(request.provider_id, der)

    @rpc
    def IssueCardCertificates(self, request: pb.IssueCardCertificatesRequest,
                              context: grpc.ServicerContext,
                              call: Call) -> pb.IssueCardCertificatesResponse:
        core = self.core
        root = self._root(call, request.token, request.provider_id)
        call.items = core.batch_size(len(request.cards))
        seen: set[str] = set()
        cards = [check_card(i, card, seen) for i, card in enumerate(request.cards)]
        call.detail = f"cards {cards[0].serial} to {cards[-1].serial}"
        now, call_id = px.utc_now(), uuid.uuid4().hex
        # Each card costs milliseconds (two certificates built and signed): the cards
        # are spread over the workers, and the first that fails fails the call.
        issued = core.pool.batch("provider.issue", [ops.IssueCard(
            root.token, root.label, request.provider_id, card, request.validity_days, now,
            call_id)
            for card in cards], idempotent=True, timeout=call.timeout(), min_chunk=CARDS_CHUNK)
        failed = next((i for i in issued if isinstance(i, Failure)), None)
        if failed is not None:
            raise from_wire(tuple(failed))
        return pb.IssueCardCertificatesResponse(certificates=[
            pb.CardCertificates(serial=i.serial, device_certificate=i.device,
                                issuer_auth_certificate=i.issuer_auth) for i in issued])

    @rpc
    def SignPack(self, request: pb.SignPackRequest, context: grpc.ServicerContext,
                 call: Call) -> pb.SignPackResponse:
        root = self._root(call, request.token, request.provider_id)
        try:
            pf.check_name("pack_serial", request.pack_serial)
        except pf.PackFormatError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(request.sha256) != hashlib.sha256().digest_size:
            raise InvalidArgument(f"sha256: {hashlib.sha256().digest_size} bytes (the "
                                  f"SHA-256 of the pack file), got {len(request.sha256)}")
        call.detail = f"pack {request.pack_serial}, sha256 {request.sha256.hex()}"
        signed = self.core.pool.call("provider.sign_pack", ops.SignPack(
            root.token, root.label, bytes(request.sha256)), idempotent=True,
            timeout=call.timeout()).value
        when = Timestamp()
        when.FromDatetime(signed.signing_time)
        return pb.SignPackResponse(signature=signed.signature, signing_time=when)


def _issuer_version(version: int, *, newest: bool) -> int:
    if version == 0 and newest:
        return 0
    if version not in keynames.ISSUER_KEY_VERSIONS:
        raise InvalidArgument(f"version: 1 to 255{' (0: the newest)' if newest else ''}, "
                              f"not {version}")
    return version


def issuer_message(answer: ops.IssuerKeyAnswer) -> pb.IssuerKey:
    point = ik.ec_point_from_spki(answer.public_key)
    return pb.IssuerKey(label=answer.label, version=answer.version,
                        public_key=answer.public_key, key_id=issuance.issuer_key_id(point))


class IssuerKeysServicer(provider_pb2_grpc.IssuerKeysServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    @rpc
    def CreateIssuerKey(self, request: pb.CreateIssuerKeyRequest,
                        context: grpc.ServicerContext, call: Call) -> pb.IssuerKey:
        core = self.core
        token = request.token or keynames.ISSUER_TOKEN
        version = _issuer_version(request.version, newest=False)
        label = keynames.issuer_key_label(version)
        call.authorize(token, label)
        core.require_token(token)
        with core.creating([(token, label)]):
            answer = core.pool.call("issuer.create", ops.IssuerKeyRef(token, version),
                                    idempotent=False, timeout=call.timeout()).value
            core.pool.broadcast("invalidate", [(token, label)])
        return issuer_message(answer)

    @rpc
    def GetIssuerKey(self, request: pb.GetIssuerKeyRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.IssuerKey:
        core = self.core
        token = request.token or keynames.ISSUER_TOKEN
        version = _issuer_version(request.version, newest=True)
        # The newest version is known only once the worker looked: then the token is
        # authorized first, and the key it found before the answer leaves.
        call.authorize(token, keynames.issuer_key_label(version) if version else None)
        core.require_token(token)
        answer = core.pool.call("issuer.get", ops.IssuerKeyRef(token, version),
                                idempotent=True, timeout=call.timeout()).value
        if not version:
            call.authorize(token, answer.label)
        return issuer_message(answer)


def register(server: grpc.Server, core: ProxyCore) -> list[str]:
    provider_pb2_grpc.add_ProviderCaServicer_to_server(ProviderCaServicer(core), server)
    provider_pb2_grpc.add_IssuerKeysServicer_to_server(IssuerKeysServicer(core), server)
    return ["cms.v1.ProviderCa", "cms.v1.IssuerKeys"]
