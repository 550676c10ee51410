"""The bureau's files: the personalization file it is given, and what it writes back.

In: the personalization file and its detached signature (``<file>.p7s``),
which must be the issuer's, by the very certificate the bureau was given
(``--issuer-cert``, the issuer key's self-signed certificate), and read by
``cms.perso_format``. Out, in ``--out``, each beside its ``.p7s`` by the
bureau key (BureauHsm.SignBureauFile): the results (``<pack>-results.csv``),
the shipping file (``<pack>-shipping.csv``) and, when the bureau made PIN
and PUK, the mailing file (``<pack>-mailing.csv``) of the mailer data its
HSM sealed; and one face per personalized card (``faces/<serial>.pdf``). They
are made from the journal each run, so a resumed batch writes them whole.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from bureau.inject import BatchView
from bureau.journal import CardEntry, Step
from cms import perso_format as F
from cms import signed_file
from cms.pack_format import SIGNATURE_SUFFIX, PackFormatError
from cms.runtime.files import write_private

RESULTS_SUFFIX = "-results.csv"
SHIPPING_SUFFIX = "-shipping.csv"
MAILING_SUFFIX = F.MAILING_SUFFIX
FACES_DIR = "faces"

SignFile = Callable[[str, bytes], bytes]
"""(purpose, SHA-256 of the file) -> the bureau's detached CMS signature."""


class BatchFileError(Exception):
    """The personalization file cannot be taken (reported as one line)."""


class Batch(NamedTuple):
    header: F.FileHeader
    rows: list[F.PersoRow]
    sha256: bytes

    @property
    def view(self) -> BatchView:
        return BatchView({row.serial: row for row in self.rows}, self.header.pin_puk_by)


def load_batch(data: bytes, signature: bytes, issuer: signed_file.Trusted) -> Batch:
    """The personalization file once its signature is the issuer's and its shape is right."""
    try:
        signed_file.verify_trusted(data, signature, issuer)
    except signed_file.SignatureError as exc:
        raise BatchFileError(f"the personalization file's signature is refused: {exc}") from None
    try:
        table = F.read_perso(data)
    except PackFormatError as exc:
        raise BatchFileError(f"the personalization file is refused: {exc}") from None
    return Batch(table.header, table.rows, hashlib.sha256(data).digest())


class Written(NamedTuple):
    results: int
    shipped: int
    paths: list[Path]


def _signed(out: Path, name: str, data: bytes, purpose: str, sign: SignFile) -> list[Path]:
    path = out / name
    signature = sign(purpose, hashlib.sha256(data).digest())
    write_private(path, data)
    write_private(path.with_name(path.name + SIGNATURE_SUFFIX), signature)
    return [path, path.with_name(path.name + SIGNATURE_SUFFIX)]


def result_rows(entries: Sequence[CardEntry]) -> list[F.ResultRow]:
    """The cards whose outcome is final: personalized, or failed with the reason."""
    return [F.ResultRow(e.serial, F.Status.PERSONALIZED if e.step == Step.DONE
                        else F.Status.FAILED, e.reason)
            for e in entries if e.step in (Step.DONE, Step.FAILED)]


def write_outputs(out: Path, batch: Batch, entries: Sequence[CardEntry], bureau: str,
                  sign: SignFile, face: Callable[[F.PersoRow, Path], None]) -> Written:
    """Results, shipping and mailing files (signed) and the faces, from the journal."""
    results = result_rows(entries)
    if not results:
        return Written(0, 0, [])
    now = datetime.now(UTC)
    serial = batch.header.file_serial
    pack = batch.header.pack
    rows = {row.serial: row for row in batch.rows}
    done = [e for e in entries if e.step == Step.DONE]
    header = F.FileHeader(serial, len(results), now, bureau=bureau)
    paths = _signed(out, pack + RESULTS_SUFFIX, F.write_results(header, results),
                    f"results {pack}", sign)
    if done:
        shipped = header._replace(card_count=len(done))
        paths += _signed(out, pack + SHIPPING_SUFFIX, F.write_shipping(shipped, [
            F.ShippingRow(e.serial, rows[e.serial].user_name, rows[e.serial].user_address)
            for e in done]), f"shipping {pack}", sign)
        if batch.header.pin_puk_by is F.PinMaker.BUREAU:
            mailing = F.FileHeader(serial, len(done), now, issuer_key_id=
                                   batch.header.issuer_key_id, pack=pack)
            paths += _signed(out, pack + MAILING_SUFFIX, F.write_mailing(mailing, [
                F.MailingRow(e.serial, rows[e.serial].user_name, rows[e.serial].user_address,
                             e.mailer_data) for e in done]), f"mailing {pack}", sign)
        for e in done:
            path = out / FACES_DIR / f"{e.serial}.pdf"
            face(rows[e.serial], path)
            paths.append(path)
    return Written(len(results), len(done), paths)
