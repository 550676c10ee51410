"""The Stock service: provider roots, pack import and the issuer's stock (seed 004, B2).

A thin servicer like ``operator``: it checks the caller (``admin`` only),
gathers the uploaded bytes within their limits, has ``packs`` verify them and
the store import them. A refused pack answers one status whose message names
the row and the reason: FAILED_PRECONDITION when the stock or the trusted
roots are what stand in the way (an unknown root, a card already in stock),
INVALID_ARGUMENT when the pack itself is wrong, ALREADY_EXISTS when the very
same pack was imported before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from access_server import packs
from access_server.store import PackRecord, ProviderRecord, StockState, Store
from access_server.store.transactions import utc_now
from cms import pack_format
from cms.runtime.errors import FailedPrecondition, InvalidArgument, ServiceError, guard
from cms.runtime.logs import fields
from cms.runtime.tls import caller
from cms.v1 import stock_pb2 as pb
from cms.v1 import stock_pb2_grpc

log = logging.getLogger("access_server.stock")

OPERATORS = frozenset({"admin"})
MAX_FILE_NAME = 255
STOCK_FIELDS = {StockState.IN_STOCK: "in_stock", StockState.RESERVED: "reserved",
                StockState.PERSONALIZED: "personalized", StockState.SHIPPED: "shipped",
                StockState.FAILED: "failed", StockState.QUARANTINED: "quarantined"}
"""PackStock's field for each state."""
IN_THE_WAY = frozenset({packs.Refusal.UNKNOWN_ROOT, packs.Refusal.IN_STOCK})
"""Refusals that the stock or the trusted roots cause, not the pack itself."""


class Upload:
    """A file and its signature gathered from the stream, each within its limit.

    ``field`` names the chunk's field that carries the file (``pack`` here, ``results``
    for a bureau's result file); the signature is always ``signature``.
    """

    def __init__(self, field: str = "pack", what: str = "pack file") -> None:
        self.field = field
        self.what = what
        self.content = bytearray()
        self.signature = bytearray()
        self.file_name = ""

    def add(self, chunk: Any) -> None:
        data = getattr(chunk, self.field)
        if len(self.content) + len(data) > pack_format.MAX_FILE_BYTES:
            raise InvalidArgument(f"{self.what} larger than {pack_format.MAX_FILE_BYTES} bytes")
        if len(self.signature) + len(chunk.signature) > packs.MAX_SIGNATURE_BYTES:
            raise InvalidArgument(f"signature larger than {packs.MAX_SIGNATURE_BYTES} bytes")
        self.content += data
        self.signature += chunk.signature
        if chunk.file_name and not self.file_name:
            self.file_name = chunk.file_name[:MAX_FILE_NAME]


def gather(chunks: Iterable[pb.ImportPackChunk]) -> Upload:
    upload = Upload()
    for chunk in chunks:
        upload.add(chunk)
    if not upload.content:
        raise InvalidArgument("no pack file in the upload")
    if not upload.signature:
        raise InvalidArgument("no signature in the upload: a pack comes with its .p7s")
    return upload


def refusal_error(name: str, exc: packs.PackRefused) -> ServiceError:
    kind = FailedPrecondition if exc.refusal in IN_THE_WAY else InvalidArgument
    return kind(f"pack {name} refused: {exc}")


def trusted_root(record: ProviderRecord) -> packs.Root:
    return packs.Root(record.provider_id, record.fingerprint, record.certificate,
                      record.subject, record.not_after)


def provider_message(record: ProviderRecord) -> pb.Provider:
    return pb.Provider(provider_id=record.provider_id, fingerprint=record.fingerprint,
                       subject=record.subject, not_after=record.not_after,
                       trusted_at=record.trusted_at,
                       root_certificate=record.certificate)


def pack_message(record: PackRecord) -> pb.Pack:
    return pb.Pack(pack_serial=record.pack_serial, provider_id=record.provider_id,
                   card_count=record.card_count, file_sha256=record.file_sha256,
                   import_order=record.import_order, created_at=record.created_at,
                   imported_at=record.imported_at, imported_by=record.imported_by,
                   root_fingerprint=record.root_fingerprint)


class StockServicer(stock_pb2_grpc.StockServicer):
    def __init__(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        self.store = store
        self.clock = clock

    @guard
    def TrustProvider(self, request, context):
        actor = caller(context, OPERATORS, "trust provider roots")
        try:
            root = packs.check_root(request.root_certificate, self.clock())
        except packs.RootRefused as exc:
            raise InvalidArgument(f"root certificate refused: {exc}") from None
        record, added = self.store.trust_root(root, actor)
        if added:
            log.info("provider root trusted", extra=fields(
                provider=record.provider_id, fingerprint=record.fingerprint, actor=actor))
        return provider_message(record)

    @guard
    def ListProviders(self, request, context):
        caller(context, OPERATORS, "read provider roots")
        return pb.ListProvidersResponse(
            providers=[provider_message(p) for p in self.store.list_roots()])

    @guard
    def ImportPack(self, request_iterator, context):
        actor = caller(context, OPERATORS, "import packs")
        upload = gather(request_iterator)
        name = upload.file_name or "(unnamed)"
        pack, signature = bytes(upload.content), bytes(upload.signature)
        try:
            roots = [trusted_root(p) for p in self.store.list_roots()]
            verified = packs.verify_pack(pack, signature, roots, self.clock())
            record = self.store.import_pack(verified, file_name=name, actor=actor,
                                            check_shared_primes=packs.check_shared_primes)
        except packs.PackRefused as exc:
            log.warning("pack refused", extra=fields(file=name, reason=str(exc), actor=actor))
            raise refusal_error(name, exc) from None
        log.info("pack imported", extra=fields(pack=record.pack_serial, cards=record.card_count,
                                               provider=record.provider_id, actor=actor))
        return pack_message(record)

    @guard
    def ListPacks(self, request, context):
        caller(context, OPERATORS, "read packs")
        return pb.ListPacksResponse(packs=[pack_message(p) for p in self.store.list_packs()])

    @guard
    def GetStock(self, request, context):
        caller(context, OPERATORS, "read the stock")
        return pb.StockCounts(packs=[
            pb.PackStock(pack_serial=s.pack_serial, import_order=s.import_order,
                         **{STOCK_FIELDS[state]: n for state, n in s.counts.items()})
            for s in self.store.stock_counts()])
