"""A manuscript as a PDF (fpdf2, pure Python, so it fits a Lambda layer), in DejaVu Sans, which
ships with this package (fonts/) and covers Latin, Greek, Cyrillic and many symbols. A character
the font lacks (CJK, say) is left out with a warning in the log; it never fails the export. The
title opens page 1; sections and subsections are the PDF's bookmarks; pages are numbered.

Blocks are laid out with fpdf2's `write`, run by run: its HTML renderer lays out a paragraph
several times over and took minutes on a book-length manuscript."""

from __future__ import annotations

from importlib.resources import as_file, files

from .blocks import Block, Run, blocks, plain

FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf",
              "BI": "DejaVuSans-BoldOblique.ttf"}
MONO_FILE = "DejaVuSansMono.ttf"
BODY_PT, LINE_MM = 11, 5.6
HEADING_PT = {0: 22, 1: 16, 2: 13}  # title, section, subsection (and below)
INDENT_MM = 6
MARGIN_MM = 20


def render_pdf(markdown: str, title: str) -> bytes:
    from fpdf import FPDF

    class Manuscript(FPDF):
        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("dejavu", size=8)
            self.cell(0, 6, str(self.page_no()), align="C")

    pdf = Manuscript(format="A4")
    pdf.set_title(title[:255])
    pdf.set_creator("RTQCC")
    pdf.set_margins(MARGIN_MM, 18, MARGIN_MM)
    pdf.set_auto_page_break(True, margin=18)
    fonts = files(__package__) / "fonts"
    for style, name in FONT_FILES.items():
        with as_file(fonts / name) as path:
            pdf.add_font("dejavu", style, str(path))
    with as_file(fonts / MONO_FILE) as path:
        pdf.add_font("dejavumono", "", str(path))
    pdf.add_page()
    for block in blocks(markdown):
        _lay_out(pdf, block)
    return bytes(pdf.output())


def _lay_out(pdf, block: Block) -> None:
    if block.kind in ("title", "heading"):
        level = 0 if block.kind == "title" else block.level
        size = HEADING_PT.get(level, HEADING_PT[2])
        if level:
            pdf.ln(size * 0.35)
        pdf.start_section(plain(block.runs)[:200] or " ", level=level, strict=False)  # a bookmark
        _runs(pdf, block.runs, size=size, line_mm=size * 0.5, bold=True)
        pdf.ln(size * 0.5 + 2)
        return
    indent = INDENT_MM * (block.level + block.quote)
    pdf.set_left_margin(MARGIN_MM + indent)
    pdf.set_x(MARGIN_MM + indent)
    try:
        if block.kind == "item":
            _runs(pdf, [Run(f"{block.marker} ")] + block.runs)
        elif block.kind == "paragraph":
            _runs(pdf, block.runs, italic=block.quote)
        elif block.kind == "code":
            pdf.set_font("dejavumono", size=BODY_PT - 2)
            for line in block.text.split("\n"):
                pdf.write(LINE_MM - 1, line)
                pdf.ln(LINE_MM - 1)
        elif block.kind == "rule":
            pdf.line(MARGIN_MM, pdf.get_y() + 2, pdf.w - MARGIN_MM, pdf.get_y() + 2)
            pdf.ln(2)
        elif block.kind == "table" and block.rows:
            _table(pdf, block.rows)
    finally:
        pdf.set_left_margin(MARGIN_MM)
    pdf.ln(LINE_MM + (0 if block.kind == "item" else 2))


def _runs(pdf, runs: list[Run], *, size: int = BODY_PT, line_mm: float = LINE_MM, bold: bool = False,
          italic: bool = False) -> None:
    for run in runs:
        if run.text == "\n":
            pdf.ln(line_mm)
            continue
        if run.code:
            pdf.set_font("dejavumono", size=size - 1)
        else:
            style = ("B" if run.bold or bold else "") + ("I" if run.italic or italic else "")
            pdf.set_font("dejavu", style + ("U" if run.link else "") + ("S" if run.strike else ""), size=size)
        for piece in _pieces(run.text):
            pdf.write(line_mm, piece, link=run.link or "")


def _pieces(text: str, most: int = 32) -> list[str]:
    """`text` in pieces of about `most` characters, cut after a space: fpdf2 measures a piece
    again for every character it adds to a line, so a long one costs its length squared."""
    pieces, start = [], 0
    while len(text) - start > most:
        cut = text.rfind(" ", start, start + most)
        cut = start + most if cut <= start else cut + 1
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _table(pdf, rows: list[list[list[Run]]]) -> None:
    width = max(len(row) for row in rows)
    pdf.set_font("dejavu", size=BODY_PT - 1)
    with pdf.table(first_row_as_headings=True, line_height=LINE_MM) as table:
        for row in rows:
            cells = table.row()
            for cell in row + [[]] * (width - len(row)):
                cells.cell(plain(cell))
