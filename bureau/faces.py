"""A personalized card's face: what is printed on it (claim 2), as a card-sized PDF.

The user's name and the card's serial, nothing secret: the PIN goes only in
its letter, from the mailing house.
"""

from __future__ import annotations

from pathlib import Path

from cms import printing
from cms.perso_format import PersoRow


def render_face(row: PersoRow, path: Path) -> None:
    pdf = printing.new_page(printing.CARD_SIZE_MM)
    pdf.set_y(22)
    printing.text(pdf, row.user_name, size=13, height=7)
    printing.text(pdf, row.serial, size=9, height=5)
    printing.save(pdf, path)
