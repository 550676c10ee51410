"""The Users and Issuance services: users, issuance to the bureau, results and dispatch back
(seed 004).

Thin servicers like ``stock_service``: the caller is checked (``admin``
only), the request's fields are checked here, the store keeps the records
and the proxy's IssuerHsm makes everything secret. An issuance:

1. ``Store.begin_issuance`` takes one card per user from stock (first in,
   first out) and records who gets it, all or none;
2. IssuerHsm.GenerateDeviceAuthKeys makes the cards' device authentication
   keys (private halves wrapped under the issuer system KEK) and
   IssuerHsm.IssueBatch the payloads, each a few calls per batch;
3. each payload is checked against what was asked (card, device key,
   issuance id, sequence) before it goes into a file, so an answer for
   another card cannot slip into the bureau's file;
4. the personalization file (and, where the HSM made PIN and PUK, the
   mailing file) is written (``cms.perso_format``) and signed by the issuer
   key (IssuerHsm.SignIssuerFile); optionally sealed to the bureau;
5. ``Store.complete_issuance`` records what the HSMs returned.

``Reissue`` makes new payloads for the cards of an issuance still at the
bureau (its files lost on the way, or damaged): the same users and device
authentication keys, each card's sequence one higher, under a new file
serial, recorded only once the new files exist.

Any failure in 2 to 4 abandons the issuance: the cards return to stock and
nothing is recorded. A user may hold one card in flight (issued, no result
from the bureau yet); ``cms issue`` refuses a second until the result.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from access_server import activation, card_auth, packs
from access_server.stock_service import Upload
from access_server.store import (
    BureauRecord,
    CardDispatched,
    CardResult,
    IssuedCard,
    NewActivation,
    PreparedCard,
    Store,
    UserRecord,
)
from access_server.store.transactions import utc_now
from cardcore import personalization as perso
from cardcore.issuance import IssuanceError, check_serial
from cardcore.issuance_keys import rsa_from_spki
from cms import envelope, keynames, pack_format
from cms import perso_format as F
from cms.pack_format import ENVELOPE_SUFFIX, SIGNATURE_SUFFIX, PackFormatError
from cms.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    ServiceError,
    Unavailable,
    guard,
)
from cms.runtime.logs import fields
from cms.runtime.tls import caller
from cms.v1 import issuance_pb2 as pb
from cms.v1 import issuance_pb2_grpc
from cms.v1 import issuer_pb2 as ipb

log = logging.getLogger("access_server.issuance")

OPERATORS = frozenset({"admin"})
MAX_USERS = 10_000
"""Cards per issuance: ``Store.reserve_cards``' limit."""
KEYS_PER_CALL = 4096
"""IssuerHsm.GenerateDeviceAuthKeys' limit."""
ITEMS_PER_CALL = 1000
"""Cards per IssueBatch call: about 700 KB of answer, well under gRPC's message limit."""
HSM_TIMEOUT_S = 600.0
CHUNK = 1024 * 1024
"""Bytes per streamed piece of a file."""
DEFAULT_VERSION = 1


# -- users ---------------------------------------------------------------------------

def check_user(request: pb.AddUserRequest) -> tuple[str, str, str | None]:
    """Name, address and e-mail as the files will print them; InvalidArgument otherwise."""
    try:
        name = F.check_text("name", request.name.strip(), F.MAX_NAME)
        address = F.check_text("address", request.address.strip(), F.MAX_ADDRESS, lines=True)
        email = F.check_text("email", request.email.strip(), F.MAX_EMAIL, empty=True)
    except PackFormatError as exc:
        raise InvalidArgument(exc.reason) from None
    if email and ("@" not in email or " " in email):
        raise InvalidArgument(f"email {email[:64]!r} is not an e-mail address")
    return name, address, email or None


def user_message(user: UserRecord, store: Store | None = None) -> pb.User:
    message = pb.User(user_id=user.user_id, name=user.name, address=user.address,
                      email=user.email or "", derivation_element=user.derivation_element,
                      created=user.created)
    if store is not None:
        message.cards.extend(pb.UserCard(serial=c.serial, state=c.state.value, batch=c.batch,
                                         user_public_key=c.user_public_key or b"")
                             for c in store.user_cards(user.user_id))
    return message


class UsersServicer(issuance_pb2_grpc.UsersServicer):
    def __init__(self, store: Store) -> None:
        self.store = store

    @guard
    def AddUser(self, request, context):
        actor = caller(context, OPERATORS, "add users")
        name, address, email = check_user(request)
        user = self.store.add_user(name, address, email, actor)
        log.info("user added", extra=fields(user=user.user_id, actor=actor))
        return user_message(user)

    @guard
    def GetUser(self, request, context):
        caller(context, OPERATORS, "read users")
        return user_message(self.store.get_user(request.user_id), self.store)

    @guard
    def ListUsers(self, request, context):
        caller(context, OPERATORS, "read users")
        return pb.ListUsersResponse(users=[user_message(u) for u in self.store.list_users()])

    @guard
    def RemoveUser(self, request, context):
        actor = caller(context, OPERATORS, "remove users")
        user = self.store.remove_user(request.user_id)
        log.info("user removed", extra=fields(user=user.user_id, actor=actor))
        return user_message(user)


# -- issuance ------------------------------------------------------------------------

class IssueOptions(NamedTuple):
    batch: str
    user_ids: list[int]
    seed_version: int
    issuer_key_version: int
    kek_version: int
    mailer_public_key: bytes
    pin_length: int
    puk_length: int
    bureau: x509.Certificate | None
    online: bool = False
    valid_days: int = activation.DEFAULT_VALID_DAYS


def check_issue(request: pb.IssueRequest, *, reissue: bool = False) -> IssueOptions:
    if not pack_format.NAME_PATTERN.match(request.batch):
        raise InvalidArgument(f"batch {request.batch[:64]!r}: 1-64 of letters, digits, '.', "
                              "'_' and '-'")
    if not reissue and not 0 < len(request.user_ids) <= MAX_USERS:
        raise InvalidArgument(f"users: 1 to {MAX_USERS}, not {len(request.user_ids)}")
    mailer = bytes(request.mailer_public_key)
    if mailer:
        try:
            rsa_from_spki(mailer)
        except IssuanceError as exc:
            raise InvalidArgument(f"mailer public key: {exc}") from None
    elif request.pin_length or request.puk_length:
        raise InvalidArgument("PIN and PUK lengths apply only when the HSM makes them "
                              "(a mailer public key)")
    bureau = None
    if request.bureau_certificate:
        try:
            bureau = envelope.load_recipient(bytes(request.bureau_certificate))
        except envelope.EnvelopeError as exc:
            raise InvalidArgument(f"bureau certificate: {exc}") from None
    if request.online or request.valid_days:
        check_online(request, reissue=reissue)
    return IssueOptions(request.batch, list(request.user_ids),
                        request.seed_version or DEFAULT_VERSION,
                        request.issuer_key_version or DEFAULT_VERSION, request.kek_version,
                        mailer, request.pin_length, request.puk_length, bureau,
                        request.online, request.valid_days or activation.DEFAULT_VALID_DAYS)


def check_online(request: pb.IssueRequest, *, reissue: bool) -> None:
    """Online issuance: one user, PIN and PUK made by the HSM for the mailing house, no
    bureau; the code valid 1 to 365 days."""
    if not request.online:
        raise InvalidArgument("valid days apply only to an online issuance")
    if reissue:
        raise InvalidArgument("an online issuance is not reissued: issue the user a card anew")
    if len(request.user_ids) != 1:
        raise InvalidArgument("an online issuance is for one user")
    if not request.mailer_public_key:
        raise InvalidArgument("an online issuance needs HSM-made PIN and PUK (a mailer public "
                              "key): they reach the user by letter, apart from the code")
    if request.bureau_certificate:
        raise InvalidArgument("an online issuance has no bureau: the user's PC personalizes "
                              "the card")
    if not 0 <= request.valid_days <= activation.MAX_VALID_DAYS:
        raise InvalidArgument(f"valid days: 1 to {activation.MAX_VALID_DAYS}")


def check_file_serial(text: str) -> bytes:
    if len(text) != 2 * perso.ISSUANCE_ID_LENGTH or not all(c in "0123456789abcdef"
                                                            for c in text):
        raise InvalidArgument(f"file serial {text[:40]!r}: "
                              f"{2 * perso.ISSUANCE_ID_LENGTH} lower-case hex digits")
    return bytes.fromhex(text)


def _slices(values: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def check_payload(card: PreparedCard, issued: ipb.IssuedItem) -> perso.Binding:
    """The payload the HSM answered is for this card, this issuance and this sequence."""
    try:
        payload = perso.decode_payload(bytes(issued.payload))
        fingerprint = perso.device_key_fingerprint(rsa_from_spki(card.card.device_public_key))
    except (perso.PayloadError, IssuanceError) as exc:
        raise ServiceError(f"the issuer HSM answered a bad payload for {card.card.serial}: "
                           f"{exc}") from None
    binding = payload.binding
    expected = (card.card.serial, fingerprint, card.issuance_id, card.sequence)
    if issued.serial != card.card.serial or tuple(binding[:4]) != expected:
        raise ServiceError(f"the issuer HSM answered a payload bound to another card or "
                           f"issuance for {card.card.serial}")
    if len(issued.user_public_key) != F.USER_PUBLIC_KEY_LENGTH:
        raise ServiceError(f"the issuer HSM answered no user public key for "
                           f"{card.card.serial}")
    return binding


class Made(NamedTuple):
    """What the issuer HSM made for an issuance: a payload per card, and the id of the
    issuer key that signed them."""

    items: list[ipb.IssuedItem]
    issuer_key_id: bytes


def hsm_error(exc: grpc.RpcError) -> ServiceError:
    """The issuer HSM's refusal as this service's error (the proxy's messages name no
    secret)."""
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return Unavailable(f"the issuer HSM is unavailable ({code.name}): {details}")
    return FailedPrecondition(f"the issuer HSM refused ({code.name}): {details}")


def device_auth_keys(hsm: Any, options: IssueOptions, count: int) -> list[ipb.DeviceAuthKey]:
    """One device authentication key per card, up to 4,096 a call."""
    keys: list[ipb.DeviceAuthKey] = []
    for start in range(0, count, KEYS_PER_CALL):
        keys.extend(hsm.GenerateDeviceAuthKeys(ipb.GenerateDeviceAuthKeysRequest(
            kek_version=options.kek_version, count=min(KEYS_PER_CALL, count - start)),
            timeout=HSM_TIMEOUT_S).keys)
    if len(keys) != count:
        raise ServiceError(f"the issuer system HSM made {len(keys)} device authentication "
                           f"keys for {count} cards")
    return keys


def make_payloads(hsm: Any, options: IssueOptions, cards: Sequence[PreparedCard],
                  auth_keys: Sequence[bytes]) -> Made:
    """The cards' payloads (``auth_keys``: their device authentication public keys), a
    few calls for the whole batch, each checked bound to its card."""
    items: list[ipb.IssuedItem] = []
    pairs = list(zip(cards, auth_keys, strict=True))
    for part in _slices(pairs, ITEMS_PER_CALL):
        answer = hsm.IssueBatch(ipb.IssueBatchRequest(
            seed_version=options.seed_version, issuer_key_version=options.issuer_key_version,
            mailer_public_key=options.mailer_public_key, pin_length=options.pin_length,
            puk_length=options.puk_length,
            items=[ipb.IssueItem(serial=c.card.serial, device_public_key=c.card.device_public_key,
                                 derivation_element=c.user.derivation_element,
                                 device_auth_public_key=key, issuance_id=c.issuance_id,
                                 sequence=c.sequence)
                   for c, key in part]), timeout=HSM_TIMEOUT_S)
        if len(answer.items) != len(part):
            raise ServiceError(f"the issuer HSM answered {len(answer.items)} payloads for "
                               f"{len(part)} cards")
        items.extend(answer.items)
    bindings = [check_payload(c, i) for c, i in zip(cards, items, strict=True)]
    if options.mailer_public_key and not all(i.mailer_data for i in items):
        raise ServiceError("the issuer HSM answered no mailer data")
    return Made(items, bindings[0].issuer_key_id)


class IssuerFile(NamedTuple):
    name: str
    data: bytes


def _signed(hsm: Any, options: IssueOptions, name: str, data: bytes,
            purpose: str) -> list[IssuerFile]:
    signature = hsm.SignIssuerFile(ipb.SignIssuerFileRequest(
        issuer_key_version=options.issuer_key_version, purpose=purpose,
        sha256=hashlib.sha256(data).digest()), timeout=HSM_TIMEOUT_S).signature
    return [IssuerFile(name, data), IssuerFile(name + SIGNATURE_SUFFIX, signature)]


def _header(options: IssueOptions, cards: Sequence[PreparedCard], made: Made,
            now: datetime) -> F.FileHeader:
    pin_maker = F.PinMaker.HSM if options.mailer_public_key else F.PinMaker.BUREAU
    return F.FileHeader(cards[0].issuance_id, len(cards), now,
                        issuer_key_id=made.issuer_key_id, pack=options.batch,
                        pin_puk_by=pin_maker)


def _mailing_files(hsm: Any, options: IssueOptions, cards: Sequence[PreparedCard],
                   made: Made, header: F.FileHeader) -> list[IssuerFile]:
    """The mailing file and its signature, where the HSM made PIN and PUK."""
    if not options.mailer_public_key:
        return []
    try:
        mailing = F.write_mailing(header, [
            F.MailingRow(c.card.serial, c.user.name, c.user.address, bytes(i.mailer_data))
            for c, i in zip(cards, made.items, strict=True)])
    except PackFormatError as exc:
        raise ServiceError(f"the mailing file cannot be written: {exc}") from None
    return _signed(hsm, options, options.batch + F.MAILING_SUFFIX, mailing,
                   f"mailing {options.batch}")


def issuer_files(hsm: Any, options: IssueOptions, cards: Sequence[PreparedCard], made: Made,
                 now: datetime) -> list[IssuerFile]:
    """The personalization file (sealed to the bureau when asked) and the mailing file.

    Online (the user's own PC personalizes the card) there is no personalization file:
    the payload waits at the access server behind the activation code.
    """
    header = _header(options, cards, made, now)
    mailing = _mailing_files(hsm, options, cards, made, header)
    if options.online:
        return mailing
    try:
        perso_data = F.write_perso(header, [
            F.PersoRow(c.card.serial, bytes(i.payload), c.user.name, c.user.address,
                       bytes(i.user_public_key)) for c, i in zip(cards, made.items, strict=True)])
    except PackFormatError as exc:
        raise ServiceError(f"the personalization file cannot be written: {exc}") from None
    files = _signed(hsm, options, options.batch + F.PERSO_SUFFIX, perso_data,
                    f"perso {options.batch}")
    if options.bureau is not None:
        files = [IssuerFile(f.name + ENVELOPE_SUFFIX, envelope.envelop(f.data, options.bureau))
                 for f in files]
    files += mailing
    assert [f.name for f in files] == F.file_names(
        options.batch, sealed=options.bureau is not None, mailing=bool(mailing))
    return files


def file_chunks(issuance_id: bytes, cards: Sequence[PreparedCard],
                files: Sequence[IssuerFile]) -> list[pb.IssueChunk]:
    """The answer's stream: the summary (file serial, cards, file names), then the files."""
    summary = pb.IssueSummary(file_serial=issuance_id.hex(),
                              serials=[c.card.serial for c in cards],
                              file_names=[f.name for f in files])
    chunks = [pb.IssueChunk(summary=summary)]
    for f in files:
        chunks.extend(pb.IssueChunk(file_name=f.name, data=f.data[start:start + CHUNK])
                      for start in range(0, len(f.data), CHUNK))
    return chunks


def online_activation(options: IssueOptions, cards: Sequence[PreparedCard], made: Made,
                      now: datetime) -> tuple[str | None, list[NewActivation]]:
    """An online issuance's code (answered once, never stored) and what the store keeps:
    the code's salted hash and the payload; (None, []) for a bureau's issuance."""
    if not options.online:
        return None, []
    code = activation.new_code()
    salt, digest = activation.hash_code(code)
    expires = now + timedelta(days=options.valid_days)
    return code, [NewActivation(c.card.serial, salt, digest, bytes(i.payload), expires)
                  for c, i in zip(cards, made.items, strict=True)]


# -- results -------------------------------------------------------------------------

def bureau_root(record: BureauRecord) -> packs.Root:
    return packs.Root(record.name, record.fingerprint, record.certificate, record.subject,
                      record.not_after)


def signed_upload(chunks: Iterable[Any], field: str, what: str) -> tuple[bytes, bytes]:
    """A partner's file (the chunks' ``field``) and its detached signature from the stream,
    each within its limit; InvalidArgument when either is missing."""
    upload = Upload(field, what.removeprefix("a "))
    for chunk in chunks:
        upload.add(chunk)
    if not upload.content or not upload.signature:
        raise InvalidArgument(f"{what} comes with its detached signature (.p7s)")
    return bytes(upload.content), bytes(upload.signature)


class Partner(NamedTuple):
    """Who signs a file the issuer imports, in its refusals' words."""
    what: str     # "results", "dispatch"
    who: str      # "a bureau", "a mailing house"
    trust: str    # the command that trusts one


BUREAU = Partner("results", "a bureau", "cms bureaus trust --cert FILE")
MAILER = Partner("dispatch", "a mailing house", "cms mailers trust --cert FILE")


def verified_file(partner: Partner, data: bytes, signature: bytes,
                  trusted: Sequence[BureauRecord], now: datetime,
                  read: Callable[[bytes], F.Table]) -> tuple[F.Table, str]:
    """A partner's file read by ``read``, once signed by a certificate the issuer trusts
    for such files, and the signer's name.

    The signature is checked as a pack's is (``packs.verify_signature``): by a trusted
    certificate, or one it issued.
    """
    try:
        signer = packs.verify_signature(data, signature, [bureau_root(b) for b in trusted],
                                        now)
    except packs.PackRefused as exc:
        if exc.refusal is packs.Refusal.UNKNOWN_ROOT:
            raise FailedPrecondition(f"{partner.what} refused: not signed by {partner.who} "
                                     f"the issuer trusts ({partner.trust})") from None
        raise InvalidArgument(f"{partner.what} refused: {exc.reason}") from None
    try:
        return read(data), signer.provider_id
    except PackFormatError as exc:
        raise InvalidArgument(f"{partner.what} refused: {exc}") from None


def verified_results(data: bytes, signature: bytes, bureaus: Sequence[BureauRecord],
                     now: datetime) -> F.Table:
    """The result file, once signed by a trusted bureau whose name its header carries."""
    table, signer = verified_file(BUREAU, data, signature, bureaus, now, F.read_results)
    if table.header.bureau != signer:
        raise InvalidArgument(f"results refused: the header names bureau "
                              f"{table.header.bureau}, the signature is {signer}'s")
    return table


def check_bureau(der: bytes, now: datetime, actor: str, what: str = "bureau") -> BureauRecord:
    """A bureau's (or, ``what``, a mailing house's) certificate the issuer can trust for
    its signed files; InvalidArgument why not."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        raise InvalidArgument(f"{what} certificate: not an X.509 certificate (DER)") from None
    if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
        raise InvalidArgument(f"{what} certificate: not valid now")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidArgument(f"{what} certificate: its key must be P-256 (its files are "
                              "signed ecdsa-with-SHA256)")
    names = [a.value for oid in (x509.oid.NameOID.ORGANIZATION_NAME,
                                 x509.oid.NameOID.COMMON_NAME)
             for a in cert.subject.get_attributes_for_oid(oid)]
    name = str(names[0]) if names else ""
    if not pack_format.NAME_PATTERN.match(name):
        raise InvalidArgument(f"{what} certificate: its organization (O) or common name "
                              f"{name[:64]!r} must be 1-64 of letters, digits, '.', '_', '-': "
                              "the issuer's files and records name it so")
    return BureauRecord(packs.fingerprint(der), name, der, cert.subject.rfc4514_string(),
                        cert.not_valid_after_utc, now, actor)


def card_serial(serial: str) -> str:
    try:
        return check_serial(serial)
    except IssuanceError as exc:
        raise InvalidArgument(f"serial: {exc}") from None


def card_challenge(challenge: bytes) -> bytes:
    if len(challenge) not in perso.CHALLENGE_LENGTHS:
        raise InvalidArgument(f"challenge: 16 to 64 bytes, not {len(challenge)}")
    return challenge


def bureau_message(record: BureauRecord) -> pb.Bureau:
    """A trusted partner's certificate: a bureau's or a mailing house's."""
    return pb.Bureau(name=record.name, fingerprint=record.fingerprint, subject=record.subject,
                     not_after=record.not_after, trusted_at=record.trusted_at)


class IssuanceServicer(issuance_pb2_grpc.IssuanceServicer):
    def __init__(self, store: Store, issuer_hsm: Any,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.hsm = issuer_hsm
        self.clock = clock
        self.challenges = card_auth.Challenges(clock)

    @guard
    def Issue(self, request, context):
        actor = caller(context, OPERATORS, "issue cards")
        options = check_issue(request)
        issuance_id = os.urandom(perso.ISSUANCE_ID_LENGTH)
        cards = self.store.begin_issuance(options.user_ids, batch=options.batch,
                                          issuance_id=issuance_id,
                                          hsm_pins=bool(options.mailer_public_key),
                                          actor=actor)
        try:
            try:
                keys = device_auth_keys(self.hsm, options, len(cards))
                made = make_payloads(self.hsm, options, cards, [k.public_key for k in keys])
                now = self.clock()
                files = issuer_files(self.hsm, options, cards, made, now)
            except grpc.RpcError as exc:
                raise hsm_error(exc) from None
            code, activations = online_activation(options, cards, made, now)
            self.store.complete_issuance(issuance_id, [
                IssuedCard(c.card.serial, bytes(k.public_key), bytes(k.wrapped_private_key),
                           k.kek_version, bytes(i.user_public_key))
                for c, k, i in zip(cards, keys, made.items, strict=True)], activations)
        except BaseException:
            returned = self.store.abandon_issuance(issuance_id)
            log.warning("issuance abandoned", extra=fields(
                issuance=issuance_id.hex(), batch=options.batch, cards=returned, actor=actor))
            raise
        log.info("cards issued", extra=fields(issuance=issuance_id.hex(), batch=options.batch,
                                              cards=len(cards), online=options.online,
                                              actor=actor))
        chunks = file_chunks(issuance_id, cards, files)
        if code is not None:
            chunks[0].summary.activation_code = activation.shown(code)
            chunks[0].summary.activation_expires.FromDatetime(activations[0].expires)
        return iter(chunks)

    @guard
    def Reissue(self, request, context):
        actor = caller(context, OPERATORS, "issue cards")
        old_id = check_file_serial(request.file_serial)
        options = check_issue(request.options, reissue=True)
        new_id = os.urandom(perso.ISSUANCE_ID_LENGTH)
        cards, auth_keys, hsm_pins = self.store.prepare_reissue(old_id, new_id)
        if hsm_pins != bool(options.mailer_public_key):
            raise FailedPrecondition(
                "these cards' PIN and PUK are the HSM's: a reissue makes new ones, with a "
                "mailer public key" if hsm_pins else
                "these cards' PIN and PUK are the bureau's: a reissue takes no mailer key")
        try:
            made = make_payloads(self.hsm, options, cards, auth_keys)
            files = issuer_files(self.hsm, options, cards, made, self.clock())
        except grpc.RpcError as exc:
            raise hsm_error(exc) from None
        self.store.complete_reissue(old_id, options.batch, cards, hsm_pins)
        log.info("cards reissued", extra=fields(issuance=new_id.hex(), replaces=old_id.hex(),
                                                batch=options.batch, cards=len(cards),
                                                actor=actor))
        return iter(file_chunks(new_id, cards, files))

    @guard
    def ImportResults(self, request_iterator, context):
        actor = caller(context, OPERATORS, "import results")
        data, signature = signed_upload(request_iterator, "results", "a result file")
        table = verified_results(data, signature, self.store.list_bureaus(), self.clock())
        results = [CardResult(r.serial, r.status is F.Status.PERSONALIZED, r.reason)
                   for r in table.rows]
        self.store.apply_results(table.header.file_serial, results)
        personalized = sum(r.personalized for r in results)
        log.info("results imported", extra=fields(
            issuance=table.header.file_serial.hex(), bureau=table.header.bureau,
            personalized=personalized, failed=len(results) - personalized, actor=actor))
        return pb.ResultsSummary(file_serial=table.header.file_serial.hex(),
                                 bureau=table.header.bureau, personalized=personalized,
                                 failed=len(results) - personalized)

    @guard
    def TrustBureau(self, request, context):
        actor = caller(context, OPERATORS, "trust bureaus")
        record, added = self.store.trust_bureau(
            check_bureau(bytes(request.certificate), self.clock(), actor))
        if added:
            log.info("bureau trusted", extra=fields(bureau=record.name,
                                                    fingerprint=record.fingerprint, actor=actor))
        return bureau_message(record)

    @guard
    def ListBureaus(self, request, context):
        caller(context, OPERATORS, "read bureaus")
        return pb.ListBureausResponse(bureaus=[bureau_message(b)
                                               for b in self.store.list_bureaus()])

    @guard
    def BeginCardAuthentication(self, request, context):
        actor = caller(context, OPERATORS, "authenticate cards")
        serial = card_serial(request.serial)
        card_auth.personalized(self.store.card_auth_keys(serial))
        challenge_id, made = self.challenges.issue(serial)
        log.info("card authentication begun", extra=fields(serial=serial, actor=actor))
        answer = pb.CardChallenge(challenge_id=challenge_id, challenge=made.challenge)
        answer.expires.FromDatetime(made.expires)
        return answer

    @guard
    def VerifyCardAuthentication(self, request, context):
        actor = caller(context, OPERATORS, "authenticate cards")
        serial = card_serial(request.serial)
        signature = bytes(request.signature)
        if not 0 < len(signature) <= card_auth.MAX_SIGNATURE:
            raise InvalidArgument(f"signature: 1 to {card_auth.MAX_SIGNATURE} bytes (DER), "
                                  f"not {len(signature)}")
        keys = card_auth.personalized(self.store.card_auth_keys(serial))
        challenge = self.challenges.take(request.challenge_id, serial)
        try:
            card_auth.verify_card(keys, challenge, signature)
        except ServiceError:
            log.warning("card authentication refused", extra=fields(serial=serial,
                                                                     actor=actor))
            raise
        log.info("card authenticated", extra=fields(serial=serial, actor=actor))
        return pb.VerifyCardAuthenticationResponse(serial=serial)

    @guard
    def AuthenticateToCard(self, request, context):
        actor = caller(context, OPERATORS, "authenticate to cards")
        serial = card_serial(request.serial)
        challenge = card_challenge(bytes(request.challenge))
        keys = card_auth.personalized(self.store.card_auth_keys(serial))
        try:
            signature = self.hsm.SignWithDeviceAuthKey(ipb.SignWithDeviceAuthKeyRequest(
                token=keynames.ISSUER_SYSTEM_TOKEN, serial=serial, challenge=challenge,
                key=ipb.DeviceAuthKey(public_key=keys.device_auth_public_key,
                                      wrapped_private_key=keys.device_auth_wrapped_key,
                                      kek_version=keys.device_auth_kek_version)),
                timeout=HSM_TIMEOUT_S).signature
        except grpc.RpcError as exc:
            raise hsm_error(exc) from None
        log.info("issuer authenticated to card", extra=fields(serial=serial, actor=actor))
        return pb.AuthenticateToCardResponse(signature=signature)

    @guard
    def ImportDispatch(self, request_iterator, context):
        actor = caller(context, OPERATORS, "import dispatch confirmations")
        data, signature = signed_upload(request_iterator, "dispatch",
                                        "a dispatch confirmation")
        table, mailer = verified_file(MAILER, data, signature, self.store.list_mailers(),
                                      self.clock(), F.read_dispatch)
        self.store.apply_dispatch(table.header.file_serial, [
            CardDispatched(r.serial, r.dispatched_at) for r in table.rows])
        log.info("dispatch imported", extra=fields(
            issuance=table.header.file_serial.hex(), mailer=mailer, shipped=len(table.rows),
            actor=actor))
        return pb.DispatchSummary(file_serial=table.header.file_serial.hex(), mailer=mailer,
                                  shipped=len(table.rows))

    @guard
    def TrustMailer(self, request, context):
        actor = caller(context, OPERATORS, "trust mailing houses")
        record, added = self.store.trust_mailer(
            check_bureau(bytes(request.certificate), self.clock(), actor, "mailing house"))
        if added:
            log.info("mailing house trusted", extra=fields(
                mailer=record.name, fingerprint=record.fingerprint, actor=actor))
        return bureau_message(record)

    @guard
    def ListMailers(self, request, context):
        caller(context, OPERATORS, "read mailing houses")
        return pb.ListBureausResponse(bureaus=[bureau_message(m)
                                               for m in self.store.list_mailers()])
