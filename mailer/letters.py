"""The mailing house's letters: PIN and PUK each in a letter of its own (claims 5, 8).

A card's PIN and its PUK travel in separate letters, so one intercepted
letter gives neither the use of the card (the card is sent apart) nor the
means to unblock it. Each letter carries the user's name and postal address
and names the card by its serial. The letters are the one place PINs are in
clear outside an HSM, by design: they are printed (docs/threat-model.md).
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from cms import printing
from cms.perso_format import MailingRow


class Code(StrEnum):
    PIN = "pin"
    PUK = "puk"


WORDING = {
    Code.PIN: ("Your PIN", "Keep this letter apart from your card. The PIN unlocks the "
                           "card's signature; three wrong PINs in a row block it."),
    Code.PUK: ("Your PUK (unblocking code)", "Keep this letter apart from your card and your "
                                             "PIN. The PUK unblocks the card and sets a new "
                                             "PIN; ten wrong PUKs block the card for good."),
}


class Letter(NamedTuple):
    serial: str
    code: Code
    path: Path


def letter_path(out: Path, serial: str, code: Code) -> Path:
    return out / f"{serial}-{code.value}.pdf"


def write_letter(row: MailingRow, code: Code, value: bytes, out: Path) -> Letter:
    """One letter: the address block, then the code and what it is for."""
    title, advice = WORDING[code]
    pdf = printing.new_page(printing.A4_MM)
    pdf.set_y(40)
    printing.text(pdf, row.user_name)
    printing.text(pdf, row.postal_address)
    pdf.set_y(100)
    printing.text(pdf, f"{title} for card {row.serial}", size=14, height=8)
    printing.text(pdf, value.decode("ascii"), size=20, height=12)
    printing.text(pdf, advice, size=10, height=5)
    path = letter_path(out, row.serial, code)
    printing.save(pdf, path)
    return Letter(row.serial, code, path)
