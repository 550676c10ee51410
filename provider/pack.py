"""Initializing a pack of cards and writing its files (seed 004, B1-B2).

``initialize_cards`` runs :class:`provider.initializer.CardInitialization`
over cards reached by a ``transmit`` callable each, a few at a time, so the
root certifies the cards of a batch in one ProviderCa call. ``write_pack_files``
writes ``<pack serial>.csv`` (:func:`cms.pack_format.write_pack`) and its
detached signature ``.csv.p7s`` made in the HSM (ProviderCa.SignPack over
the file's SHA-256), or both sealed to the issuer as ``.p7m`` files
(:mod:`provider.envelope`), in which case no plaintext copy is kept.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import grpc
from cryptography import x509

from cardcore.link import TransportError
from cms.envelope import KeyTransport, envelop
from cms.pack_format import ENVELOPE_SUFFIX, SIGNATURE_SUFFIX, PackHeader, PackRow, write_pack
from cms.v1 import provider_pb2 as ppb
from provider.initializer import (
    PROXY_TIMEOUT_S,
    AlreadyInitialized,
    Answers,
    CardFailed,
    CardInitialization,
)

CERTIFY_BATCH = 8
"""Cards certified per IssueCardCertificates call."""
PACK_SUFFIX = ".csv"


class CardLink(NamedTuple):
    """A card to initialize: its name in reports, and the raw link to it."""

    name: str
    transmit: Callable[[bytes], bytes]
    close: Callable[[], None]


class Outcome(NamedTuple):
    """What came of one card: its row, or why it has none (``skipped``: not factory-fresh)."""

    name: str
    row: PackRow | None = None
    reason: str | None = None
    skipped: bool = False


def run_script(transmit: Callable[[bytes], bytes], script: list[bytes]) -> Answers:
    """Each command in turn, stopping after the first answer other than 9000."""
    answers: Answers = []
    for apdu in script:
        try:
            raw = transmit(apdu)
        except TransportError as exc:
            raise CardFailed(f"the card went away ({exc})") from None
        if len(raw) < 2:
            raise CardFailed("the card answered without a status word")
        answers.append((raw[:-2], int.from_bytes(raw[-2:], "big")))
        if answers[-1][1] != 0x9000:
            break
    return answers


class Certifier:
    """ProviderCa.IssueCardCertificates for a batch; a refused batch is retried card by
    card, so one bad card fails alone."""

    def __init__(self, provider_ca: Any, provider_id: str) -> None:
        self._stub = provider_ca
        self._provider_id = provider_id

    def _call(self, cards: Sequence[ppb.CardPublicKeys]) -> list[ppb.CardCertificates]:
        reply = self._stub.IssueCardCertificates(ppb.IssueCardCertificatesRequest(
            provider_id=self._provider_id, cards=list(cards)), timeout=PROXY_TIMEOUT_S)
        if len(reply.certificates) != len(cards):
            raise CardFailed(f"the provider CA answered {len(reply.certificates)} "
                             f"certificate pairs for {len(cards)} cards")
        return list(reply.certificates)

    def certify(self, cards: Sequence[ppb.CardPublicKeys]
                ) -> list[ppb.CardCertificates | CardFailed]:
        try:
            return list(self._call(cards))
        except grpc.RpcError as exc:
            if len(cards) > 1 and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                return [self.certify([card])[0] for card in cards]
            return [CardFailed(f"card {card.serial}: the provider CA answered "
                               f"{exc.code().name}: {exc.details()}") for card in cards]
        except CardFailed as exc:
            return [exc for _ in cards]


def _runner(link: CardLink) -> Callable[[list[bytes]], Answers]:
    return lambda script: run_script(link.transmit, script)


def _initialize_batch(links: Sequence[CardLink], make: Callable[[], CardInitialization],
                      certifier: Certifier, root: x509.Certificate) -> Iterator[Outcome]:
    started: list[tuple[CardLink, CardInitialization, ppb.CardPublicKeys]] = []
    for link in links:
        init = make()
        try:
            started.append((link, init, init.until_certificates(_runner(link))))
        except AlreadyInitialized as exc:
            yield Outcome(link.name, reason=str(exc), skipped=True)
        except CardFailed as exc:
            init.abandon()
            yield Outcome(link.name, reason=str(exc))
    if not started:
        return
    certificates = certifier.certify([keys for _, _, keys in started])
    for (link, init, _), certs in zip(started, certificates, strict=True):
        try:
            if isinstance(certs, CardFailed):
                raise certs
            yield Outcome(link.name, row=init.finish(certs, _runner(link), root))
        except CardFailed as exc:
            init.abandon()
            yield Outcome(link.name, reason=str(exc))


def initialize_cards(links: Iterable[CardLink], wanted: int,
                     make: Callable[[], CardInitialization], certifier: Certifier,
                     root: x509.Certificate, *, batch: int = CERTIFY_BATCH
                     ) -> Iterator[Outcome]:
    """Outcomes of ``wanted`` cards taken from ``links`` in order; cards found already
    initialized are reported and do not count. Each link is closed after its card."""
    source = iter(links)
    tried = 0
    while tried < wanted:
        chunk = []
        for link in source:
            chunk.append(link)
            if len(chunk) == min(batch, wanted - tried):
                break
        if not chunk:
            return
        try:
            for outcome in _initialize_batch(chunk, make, certifier, root):
                tried += 0 if outcome.skipped else 1
                yield outcome
        finally:
            for link in chunk:
                link.close()


def check_out_dir(directory: Path) -> Path:
    """``directory``, created if missing, known to take new files (OSError otherwise)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".cms-provider-{os.getpid()}.tmp"
    probe.write_bytes(b"")
    probe.unlink()
    return directory


def _write_new(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class PackFiles(NamedTuple):
    pack: Path
    signature: Path
    sealed: bool


def write_pack_files(directory: Path, header: PackHeader, rows: Sequence[PackRow],
                     sign: Callable[[str, bytes], bytes],
                     recipient: x509.Certificate | None = None,
                     transport: KeyTransport = KeyTransport.OAEP) -> PackFiles:
    """Write the pack and its signature (``sign(pack serial, sha256) -> CMS DER``); with a
    recipient, both only as EnvelopedData ``.p7m`` files."""
    data = write_pack(header, rows)
    signature = sign(header.pack_serial, hashlib.sha256(data).digest())
    pack = directory / f"{header.pack_serial}{PACK_SUFFIX}"
    detached = pack.with_name(pack.name + SIGNATURE_SUFFIX)
    if recipient is None:
        _write_new(pack, data)
        _write_new(detached, signature)
        return PackFiles(pack, detached, False)
    pack = pack.with_name(pack.name + ENVELOPE_SUFFIX)
    detached = detached.with_name(detached.name + ENVELOPE_SUFFIX)
    _write_new(pack, envelop(data, recipient, transport))
    _write_new(detached, envelop(signature, recipient, transport))
    return PackFiles(pack, detached, True)


def pack_header(pack_serial: str, provider_id: str, count: int,
                now: datetime | None = None) -> PackHeader:
    return PackHeader(pack_serial, provider_id, count,
                      (now or datetime.now(UTC)).replace(microsecond=0))
