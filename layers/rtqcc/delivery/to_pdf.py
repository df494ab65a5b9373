"""A manuscript as a PDF (fpdf2, pure Python, so it fits a Lambda layer): the HTML that
markdown-it makes of it (raw HTML off, so its tags are markdown-it's own), laid out by fpdf2's
HTML renderer in DejaVu Sans, which ships with this package (fonts/) and covers Latin, Greek,
Cyrillic and many symbols. A character the font lacks (CJK, say) is left out with a warning in
the log; it never fails the export. The title opens page 1; pages are numbered."""

from __future__ import annotations

from importlib.resources import as_file, files

from .markdown import parse, parser

FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf",
              "BI": "DejaVuSans-BoldOblique.ttf"}
MONO_FILE = "DejaVuSansMono.ttf"
BODY_SIZE_PT = 11


def render_pdf(markdown: str, title: str) -> bytes:
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    class Manuscript(FPDF):
        def footer(self) -> None:
            self.set_y(-12)
            self.set_font("dejavu", size=8)
            self.cell(0, 6, str(self.page_no()), align="C")

    pdf = Manuscript(format="A4")
    pdf.set_title(title[:255])
    pdf.set_creator("RTQCC")
    pdf.set_margins(20, 18, 20)
    pdf.set_auto_page_break(True, margin=18)
    fonts = files(__package__) / "fonts"
    for style, name in FONT_FILES.items():
        with as_file(fonts / name) as path:
            pdf.add_font("dejavu", style, str(path))
    with as_file(fonts / MONO_FILE) as path:
        pdf.add_font("dejavumono", "", str(path))
    pdf.add_page()
    pdf.set_font("dejavu", size=BODY_SIZE_PT)
    md = parser()
    body = md.renderer.render(parse(markdown), md.options, {})
    mono = FontFace(family="dejavumono", emphasis=None)
    pdf.write_html(body, tag_styles={"code": mono, "pre": mono})
    return bytes(pdf.output())
