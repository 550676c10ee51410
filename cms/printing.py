"""PDF pages for what is printed: the bureau's card faces, the mailing house's letters.

Both print users' names and addresses as they are (UTF-8), so a page takes
a Unicode TrueType font when the system has one (DejaVu Sans, Debian's
``fonts-dejavu-core``); without one, the PDF core font Helvetica prints
Latin-1 only, and a name outside it is refused with a clear error rather
than printed wrong. fpdf2 builds the pages (the ``bureau`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from cms.runtime.files import write_private

UNICODE_FONTS: Final = (
    Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
    Path("/usr/local/share/fonts/DejaVuSans.ttf"),
)
FONT: Final = "body"
CARD_SIZE_MM: Final = (85.6, 53.98)
"""ISO/IEC 7810 ID-1."""
A4_MM: Final = (210.0, 297.0)


class PrintError(ValueError):
    """A page that cannot be printed (fpdf2 missing, text the font cannot show)."""


def new_page(size_mm: tuple[float, float]) -> Any:
    """One page of ``size_mm`` (width, height) with the body font selected."""
    try:
        from fpdf import FPDF
    except ImportError:
        raise PrintError("printing needs fpdf2: install 'cms[bureau]'") from None
    pdf = FPDF(orientation="P", unit="mm", format=size_mm)
    pdf.set_auto_page_break(False)
    pdf.set_margins(6, 6, 6)
    font = next((path for path in UNICODE_FONTS if path.is_file()), None)
    if font is not None:
        pdf.add_font(FONT, fname=str(font))
        pdf.set_font(FONT, size=11)
    else:
        pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    return pdf


def text(pdf: Any, value: str, *, size: float = 11, height: float = 6) -> None:
    """``value`` (lines kept) at the cursor, one cell line per line."""
    if pdf.font_family.lower() == "helvetica":
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise PrintError("a name or address outside Latin-1 needs a Unicode font "
                             "(install fonts-dejavu-core)") from None
    pdf.set_font_size(size)
    pdf.multi_cell(0, height, value, new_x="LMARGIN", new_y="NEXT")


def save(pdf: Any, path: Path) -> None:
    """The PDF at ``path``, owner-only, replaced whole."""
    write_private(path, bytes(pdf.output()))
