"""The BureauHsm and MailerHsm servicers: the keys of the issuer's partners (seed 004, B4).

Each RPC checks its request, authorizes the token and the label it names
(``bureau/<name>`` on token ``bureau``, ``mailer/<name>`` and
``mailer-sign/<name>`` on token ``mailer``) and runs one worker operation
(``hsm_proxy.partners_ops``);
``@rpc`` writes one audit record, which names the file signed or the card
whose mailer data was opened, never a PIN. A caller chooses only a name, a
file's SHA-256 and a ciphertext: the signed attributes are the proxy's, and
the mailer key answers only PIN and PUK of what is mailer data.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import grpc

from cardcore import issuance
from cardcore import issuance_keys as ik
from cardcore.personalization import ISSUANCE_ID_LENGTH
from cms import keynames
from cms.runtime.errors import InvalidArgument
from cms.v1 import partners_pb2 as pb
from cms.v1 import partners_pb2_grpc
from hsm_proxy import partners_ops as ops
from hsm_proxy.core import Call, ProxyCore, rpc
from hsm_proxy.issuer_service import PURPOSE_PATTERN, check_codes
from hsm_proxy.provider_service import device_spki


def _label(kind: str, name: str) -> str:
    try:
        return keynames.partner_label(kind, name)
    except ValueError as exc:
        raise InvalidArgument(f"{kind}: {exc}") from None


def _ref(core: ProxyCore, call: Call, token: str, default: str, kind: str, name: str
         ) -> ops.PartnerRef:
    token = token or default
    label = _label(kind, name)
    call.authorize(token, label)
    core.require_token(token)
    return ops.PartnerRef(token, label)


def _create(core: ProxyCore, call: Call, op: str, ref: ops.PartnerRef,
            *beside: ops.PartnerRef) -> Any:
    """The worker's ``op`` making the key ``ref`` and the keys ``beside`` it, none of them
    there before; every worker then forgets what it knew of those labels."""
    made = [(r.token, r.label) for r in (ref, *beside)]
    with core.creating(made):
        answer = core.pool.call(op, ref, idempotent=False, timeout=call.timeout()).value
        core.pool.broadcast("invalidate", made)
    return answer


class FileToSign(Protocol):
    purpose: str
    sha256: bytes


def sign_file(core: ProxyCore, call: Call, op: str, ref: ops.PartnerRef,
              request: FileToSign) -> bytes:
    """A partner's detached CMS signature over a file's SHA-256 (the worker's ``op``), once
    the purpose and the digest are checked; the purpose goes to the audit record."""
    if not PURPOSE_PATTERN.match(request.purpose):
        raise InvalidArgument("purpose: 1 to 64 of letters, digits, space and ._:/- "
                              "(what is signed, for the audit log)")
    if len(request.sha256) != hashlib.sha256().digest_size:
        raise InvalidArgument(f"sha256: 32 bytes (the SHA-256 of the file), got "
                              f"{len(request.sha256)}")
    call.detail = f"{request.purpose}, sha256 {request.sha256.hex()}"
    return core.pool.call(op, ops.SignFile(ref, bytes(request.sha256)), idempotent=True,
                          timeout=call.timeout()).value


def bureau_message(name: str, der: bytes) -> pb.BureauCertificate:
    return pb.BureauCertificate(bureau=name, certificate=der,
                                fingerprint=hashlib.sha256(der).digest())


class BureauHsmServicer(partners_pb2_grpc.BureauHsmServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def _ref(self, call: Call, request: pb.BureauKeyRequest | pb.SignBureauFileRequest
             ) -> ops.PartnerRef:
        return _ref(self.core, call, request.token, keynames.BUREAU_TOKEN, keynames.BUREAU,
                    request.bureau)

    @rpc
    def CreateBureauKey(self, request: pb.BureauKeyRequest, context: grpc.ServicerContext,
                        call: Call) -> pb.BureauCertificate:
        ref = self._ref(call, request)
        codes = _ref(self.core, call, request.token, keynames.BUREAU_TOKEN,
                     keynames.BUREAU_CODES, request.bureau)
        return bureau_message(request.bureau, _create(self.core, call, "bureau.create", ref,
                                                      codes))

    @rpc
    def GetBureauCertificate(self, request: pb.BureauKeyRequest,
                             context: grpc.ServicerContext, call: Call) -> pb.BureauCertificate:
        ref = self._ref(call, request)
        der = self.core.pool.call("bureau.get", ref, idempotent=True,
                                  timeout=call.timeout()).value
        return bureau_message(request.bureau, der)

    @rpc
    def SignBureauFile(self, request: pb.SignBureauFileRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.SignBureauFileResponse:
        ref = self._ref(call, request)
        return pb.SignBureauFileResponse(signature=sign_file(
            self.core, call, "bureau.sign_file", ref, request))


    @rpc
    def SealCardCodes(self, request: pb.SealCardCodesRequest, context: grpc.ServicerContext,
                      call: Call) -> pb.SealCardCodesResponse:
        codes = _ref(self.core, call, request.token, keynames.BUREAU_TOKEN,
                     keynames.BUREAU_CODES, request.bureau)
        if len(request.file_serial) != ISSUANCE_ID_LENGTH:
            raise InvalidArgument(f"file_serial: {ISSUANCE_ID_LENGTH} bytes, got "
                                  f"{len(request.file_serial)}")
        try:
            serial = issuance.check_serial(request.serial)
            device_key = ik.rsa_from_spki(device_spki(bytes(request.device_public_key)))
        except issuance.IssuanceError as exc:
            raise InvalidArgument(f"serial or device_public_key: {exc}") from None
        if len(request.challenge) != issuance.CARD_CHALLENGE_LENGTH:
            raise InvalidArgument(f"challenge: {issuance.CARD_CHALLENGE_LENGTH} bytes (the "
                                  f"card's GET CHALLENGE), got {len(request.challenge)}")
        if not request.mailer_public_key:
            raise InvalidArgument("mailer_public_key: required (the codes are mailed)")
        lengths = check_codes(request)
        assert lengths is not None
        call.detail = f"file {request.file_serial.hex()}, card {serial}"
        sealed = self.core.pool.call("bureau.seal_codes", ops.SealCodes(
            codes, bytes(request.file_serial), serial, device_key, bytes(request.challenge),
            lengths.mailer_public_key, lengths.pin_length, lengths.puk_length),
            idempotent=True, timeout=call.timeout()).value
        return pb.SealCardCodesResponse(set_pin=sealed.set_pin, mailer_data=sealed.mailer_data)


class MailerHsmServicer(partners_pb2_grpc.MailerHsmServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def _ref(self, call: Call, request: pb.MailerKeyRequest | pb.OpenMailerDataRequest
             | pb.SignMailerFileRequest, kind: str = keynames.MAILER) -> ops.PartnerRef:
        return _ref(self.core, call, request.token, keynames.MAILER_TOKEN, kind,
                    request.mailer)

    def _message(self, request: pb.MailerKeyRequest, ref: ops.PartnerRef,
                 keys: ops.MailerKeys) -> pb.MailerKey:
        return pb.MailerKey(mailer=request.mailer, label=ref.label, public_key=keys.public_key,
                            certificate=keys.certificate)

    @rpc
    def CreateMailerKey(self, request: pb.MailerKeyRequest, context: grpc.ServicerContext,
                        call: Call) -> pb.MailerKey:
        ref = self._ref(call, request)
        sign = self._ref(call, request, keynames.MAILER_SIGN)
        return self._message(request, ref, _create(self.core, call, "mailer.create", ref,
                                                   sign))

    @rpc
    def GetMailerKey(self, request: pb.MailerKeyRequest, context: grpc.ServicerContext,
                     call: Call) -> pb.MailerKey:
        ref = self._ref(call, request)
        self._ref(call, request, keynames.MAILER_SIGN)
        keys = self.core.pool.call("mailer.get", ref, idempotent=True,
                                   timeout=call.timeout()).value
        return self._message(request, ref, keys)

    @rpc
    def SignMailerFile(self, request: pb.SignMailerFileRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.SignMailerFileResponse:
        ref = self._ref(call, request, keynames.MAILER_SIGN)
        return pb.SignMailerFileResponse(signature=sign_file(
            self.core, call, "mailer.sign_file", ref, request))

    @rpc
    def OpenMailerData(self, request: pb.OpenMailerDataRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.OpenMailerDataResponse:
        ref = self._ref(call, request)
        try:
            serial = issuance.check_serial(request.serial)
        except issuance.IssuanceError as exc:
            raise InvalidArgument(f"serial: {exc}") from None
        if len(request.mailer_data) != ops.MAILER_DATA_LENGTH:
            raise InvalidArgument(f"mailer_data: {ops.MAILER_DATA_LENGTH} bytes (RSA-2048), "
                                  f"got {len(request.mailer_data)}")
        call.detail = f"card {serial}"
        codes = self.core.pool.call("mailer.open", ops.OpenMailerData(
            ref, bytes(request.mailer_data)), idempotent=True, timeout=call.timeout()).value
        return pb.OpenMailerDataResponse(pin=codes.pin, puk=codes.puk)


def register(server: grpc.Server, core: ProxyCore) -> list[str]:
    partners_pb2_grpc.add_BureauHsmServicer_to_server(BureauHsmServicer(core), server)
    partners_pb2_grpc.add_MailerHsmServicer_to_server(MailerHsmServicer(core), server)
    return ["cms.v1.BureauHsm", "cms.v1.MailerHsm"]
