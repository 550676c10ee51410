"""The IssuerHsm servicer: the issuer's seed, device authentication keys and payloads.

Each RPC checks its request, authorizes the token and every label it
touches under the policy (``issuer-seed/<v>`` and ``issuer/<v>`` on token
``issuer``, ``device-auth-kek/<v>`` on token ``issuer-system``), and runs
worker operations (``hsm_proxy.issuer_ops``); ``@rpc`` writes one audit
record. What a caller gives is only what a purpose needs: card serials,
public keys (RSA-2048 with e = 65537, points on P-256), derivation elements,
issuance ids and sequence numbers, a challenge, a file's SHA-256. What is
signed is built here or in the worker (the payload's signed part, the
issuer-authentication statement, CMS signed attributes), never taken from
the caller. No answer carries a seed, a user private key, a PIN or a PUK
in clear, nor a device authentication key but wrapped under the KEK.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc

from cardcore import issuance
from cardcore import issuance_keys as ik
from cardcore import personalization as perso
from cms import keynames
from cms.runtime.errors import InvalidArgument
from cms.v1 import issuer_pb2 as pb
from cms.v1 import issuer_pb2_grpc
from hsm_proxy import bip32
from hsm_proxy import issuer_ops as ops
from hsm_proxy.core import Call, ProxyCore, rpc
from hsm_proxy.errors import from_wire
from hsm_proxy.worker import Failure

ISSUE_CHUNK = 32
"""Cards one worker call issues with one reading of the seed."""
KEYS_CHUNK = 16
"""Device authentication key pairs one worker call generates."""
MAX_DEVICE_AUTH_KEYS = 4096
MAX_WRAPPED_KEY = 512
DEFAULT_PIN_LENGTH, DEFAULT_PUK_LENGTH = 6, 8
MAILER_KEY_BITS = range(2048, 4097)
PURPOSE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,63}$")
"""What a signed file is, as the audit log records it: "perso P-0001", "dispatch"."""


def _version(value: int, what: str) -> int:
    if value not in keynames.ISSUER_KEY_VERSIONS:
        raise InvalidArgument(f"{what}: 1 to 255, not {value}")
    return value


def _point(value: bytes, what: str) -> bytes:
    if len(value) != issuance.EC_POINT_LENGTH or value[0] != 0x04:
        raise InvalidArgument(f"{what}: an uncompressed P-256 point (65 bytes, 04 first)")
    try:
        ik.ec_spki(value)
    except issuance.IssuanceError as exc:
        raise InvalidArgument(f"{what}: {exc}") from None
    return value


def _device_key(der: bytes) -> issuance.RsaPublic:
    key = ik.rsa_from_spki(der)
    ik.check_device_key_shape(key)
    return key


def check_item(index: int, item: pb.IssueItem, seen: set[str]) -> ops.Item:
    """One card of IssueBatch; InvalidArgument naming the item."""
    where = f"items[{index}]"
    try:
        serial = issuance.check_serial(item.serial)
        where = f"{where} (serial {serial})"
        if serial in seen:
            raise InvalidArgument(f"{where}: the serial appears twice in the request")
        seen.add(serial)
        device_key = _device_key(bytes(item.device_public_key))
    except issuance.IssuanceError as exc:
        raise InvalidArgument(f"{where}: {exc}") from None
    if item.derivation_element >= bip32.HARDENED:
        raise InvalidArgument(f"{where}: derivation_element is 0 to 2^31-1 (the hardened "
                              f"index), not {item.derivation_element}")
    if len(item.issuance_id) != perso.ISSUANCE_ID_LENGTH:
        raise InvalidArgument(f"{where}: issuance_id is {perso.ISSUANCE_ID_LENGTH} bytes, "
                              f"not {len(item.issuance_id)}")
    if item.sequence == 0:
        raise InvalidArgument(f"{where}: sequence starts at 1")
    return ops.Item(serial, device_key, item.derivation_element,
                    _point(bytes(item.device_auth_public_key),
                           f"{where}: device_auth_public_key"),
                    bytes(item.issuance_id), item.sequence)


def _code_length(value: int, default: int, what: str) -> int:
    if value == 0:
        return default
    if value not in perso.PIN_LENGTHS:
        raise InvalidArgument(f"{what}: 4 to 12 digits, not {value}")
    return value


def check_codes(request: pb.IssueBatchRequest) -> ops.Codes | None:
    """The PIN and PUK the HSM makes when a mailing house's key is given (claim 8)."""
    if not request.mailer_public_key:
        if request.pin_length or request.puk_length:
            raise InvalidArgument("pin_length and puk_length apply only with "
                                  "mailer_public_key (the HSM makes PIN and PUK for a mailer)")
        return None
    try:
        key = ik.rsa_from_spki(bytes(request.mailer_public_key))
    except issuance.IssuanceError as exc:
        raise InvalidArgument(f"mailer_public_key: {exc}") from None
    bits = int.from_bytes(key.modulus, "big").bit_length()
    if bits not in MAILER_KEY_BITS or int.from_bytes(key.exponent, "big") != 65537:
        raise InvalidArgument(f"mailer_public_key: RSA of 2048 to 4096 bits with exponent "
                              f"65537, not {bits} bits")
    return ops.Codes(ik.rsa_spki(key),
                     _code_length(request.pin_length, DEFAULT_PIN_LENGTH, "pin_length"),
                     _code_length(request.puk_length, DEFAULT_PUK_LENGTH, "puk_length"))


def _groups(items: list[ops.Item], size: int) -> list[tuple[int, tuple[ops.Item, ...]]]:
    return [(i, tuple(items[i:i + size])) for i in range(0, len(items), size)]


def _first_failure(results: list[object]) -> None:
    failed = next((r for r in results if isinstance(r, Failure)), None)
    if failed is not None:
        raise from_wire(tuple(failed))  # type: ignore[arg-type]


class IssuerHsmServicer(issuer_pb2_grpc.IssuerHsmServicer):
    def __init__(self, core: ProxyCore) -> None:
        self.core = core

    def _ref(self, call: Call, token: str, default: str, label: str) -> ops.KeyRef:
        token = token or default
        call.authorize(token, label)
        self.core.require_token(token)
        return ops.KeyRef(token, label)

    def _create(self, call: Call, op: str, token: str, label_of: Callable[[int], str],
                version: int) -> Any:
        """Make the key of ``version`` (its label from ``label_of``) once, under its lock."""
        core = self.core
        ref = self._ref(call, token, token, label_of(_version(version, "version")))
        with core.creating([(ref.token, ref.label)]):
            answer = core.pool.call(op, ref, idempotent=False, timeout=call.timeout()).value
            core.pool.broadcast("invalidate", [(ref.token, ref.label)])
        return answer

    @rpc
    def CreateSeed(self, request: pb.CreateSeedRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.SeedInfo:
        seed = self._create(call, "issuer.create_seed", request.token or keynames.ISSUER_TOKEN,
                            keynames.issuer_seed_label, request.version)
        return pb.SeedInfo(label=seed.label, version=request.version, seed_id=seed.seed_id)

    @rpc
    def CreateDeviceAuthKek(self, request: pb.CreateDeviceAuthKekRequest,
                            context: grpc.ServicerContext, call: Call) -> pb.DeviceAuthKekInfo:
        kek = self._create(call, "issuer.create_kek",
                           request.token or keynames.ISSUER_SYSTEM_TOKEN,
                           keynames.device_auth_kek_label, request.version)
        return pb.DeviceAuthKekInfo(label=kek.label, version=request.version, kcv=kek.kcv)

    def _kek(self, call: Call, token: str, version: int) -> tuple[ops.KeyRef, int]:
        """The KEK of ``version`` (0: the newest, authorized once it is known)."""
        token = token or keynames.ISSUER_SYSTEM_TOKEN
        if version == 0:
            call.authorize(token)
            self.core.require_token(token)
            version = self.core.pool.call("issuer.newest_kek", token, idempotent=True,
                                          timeout=call.timeout()).value
        version = _version(version, "kek_version")
        return self._ref(call, token, token, keynames.device_auth_kek_label(version)), version

    @rpc
    def GenerateDeviceAuthKeys(self, request: pb.GenerateDeviceAuthKeysRequest,
                               context: grpc.ServicerContext,
                               call: Call) -> pb.GenerateDeviceAuthKeysResponse:
        if not 1 <= request.count <= MAX_DEVICE_AUTH_KEYS:
            raise InvalidArgument(f"count: 1 to {MAX_DEVICE_AUTH_KEYS}, not {request.count}")
        call.items = self.core.batch_size(request.count)
        ref, version = self._kek(call, request.token, request.kek_version)
        sizes = [min(KEYS_CHUNK, request.count - i) for i in range(0, request.count, KEYS_CHUNK)]
        made = self.core.pool.batch("issuer.generate_device_auth_keys", [
            ops.GenerateKeys(ref, n) for n in sizes], idempotent=True, timeout=call.timeout(),
            min_chunk=1)
        _first_failure(made)
        return pb.GenerateDeviceAuthKeysResponse(keys=[
            pb.DeviceAuthKey(public_key=k.public_key, wrapped_private_key=k.wrapped_private_key,
                             kek_version=version) for group in made for k in group])

    @rpc
    def SignWithDeviceAuthKey(self, request: pb.SignWithDeviceAuthKeyRequest,
                              context: grpc.ServicerContext,
                              call: Call) -> pb.SignWithDeviceAuthKeyResponse:
        key = request.key
        if key.kek_version == 0:
            raise InvalidArgument("key.kek_version: the version GenerateDeviceAuthKeys "
                                  "answered with the key (1 to 255)")
        ref, _ = self._kek(call, request.token, key.kek_version)
        point = _point(bytes(key.public_key), "key.public_key")
        wrapped = bytes(key.wrapped_private_key)
        if not 0 < len(wrapped) <= MAX_WRAPPED_KEY:
            raise InvalidArgument(f"key.wrapped_private_key: 1 to {MAX_WRAPPED_KEY} bytes, "
                                  f"not {len(wrapped)}")
        try:
            statement = perso.issuer_auth_statement(request.serial, bytes(request.challenge))
        except (perso.PayloadError, issuance.IssuanceError) as exc:
            raise InvalidArgument(str(exc)) from None
        call.detail = f"serial {request.serial}"
        signature = self.core.pool.call("issuer.sign_device_auth", ops.SignDeviceAuth(
            ref, ops.DeviceAuthKey(point, wrapped), statement), idempotent=True,
            timeout=call.timeout()).value
        return pb.SignWithDeviceAuthKeyResponse(signature=signature)

    @rpc
    def IssueBatch(self, request: pb.IssueBatchRequest, context: grpc.ServicerContext,
                   call: Call) -> pb.IssueBatchResponse:
        core = self.core
        seed = self._ref(call, request.token, keynames.ISSUER_TOKEN, keynames.issuer_seed_label(
            _version(request.seed_version, "seed_version")))
        issuer = self._ref(call, request.token, keynames.ISSUER_TOKEN, keynames.issuer_key_label(
            _version(request.issuer_key_version, "issuer_key_version")))
        call.items = core.batch_size(len(request.items))
        seen: set[str] = set()
        items = [check_item(i, item, seen) for i, item in enumerate(request.items)]
        codes = check_codes(request)
        call.detail = (f"cards {items[0].serial} to {items[-1].serial}"
                       f"{', PIN and PUK for the mailer' if codes else ''}")
        # One worker call per group reads the seed once; the groups are spread over the
        # workers, and the first that fails fails the call.
        issued = core.pool.batch("issuer.issue", [
            ops.IssueGroup(seed, issuer, group, codes, first)
            for first, group in _groups(items, ISSUE_CHUNK)], idempotent=True,
            timeout=call.timeout(), min_chunk=1)
        _first_failure(issued)
        return pb.IssueBatchResponse(items=[
            pb.IssuedItem(serial=i.serial, payload=i.payload, user_public_key=i.user_public_key,
                          mailer_data=i.mailer_data) for group in issued for i in group])

    @rpc
    def SignIssuerFile(self, request: pb.SignIssuerFileRequest, context: grpc.ServicerContext,
                       call: Call) -> pb.SignIssuerFileResponse:
        issuer = self._ref(call, request.token, keynames.ISSUER_TOKEN, keynames.issuer_key_label(
            _version(request.issuer_key_version, "issuer_key_version")))
        if not PURPOSE_PATTERN.match(request.purpose):
            raise InvalidArgument("purpose: 1 to 64 of letters, digits, space and ._:/- "
                                  "(what is signed, for the audit log)")
        if len(request.sha256) != 32:
            raise InvalidArgument(f"sha256: 32 bytes (the SHA-256 of the file), got "
                                  f"{len(request.sha256)}")
        call.detail = f"{request.purpose}, sha256 {request.sha256.hex()}"
        # The issuer key's certificate is made on its first signature: one at a time.
        with self.core.creating([(issuer.token, issuer.label)]):
            signed = self.core.pool.call("issuer.sign_file", ops.SignFile(
                issuer, bytes(request.sha256)), idempotent=False, timeout=call.timeout()).value
        return pb.SignIssuerFileResponse(signature=signed.signature)


def register(server: grpc.Server, core: ProxyCore) -> list[str]:
    issuer_pb2_grpc.add_IssuerHsmServicer_to_server(IssuerHsmServicer(core), server)
    return ["cms.v1.IssuerHsm"]
