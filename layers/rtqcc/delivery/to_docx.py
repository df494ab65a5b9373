"""A manuscript as a Word document (python-docx): the title in the Title style, each section's
heading as Heading 1 and its subheadings as Heading 2 and below, paragraphs, lists, quotes, code,
tables, and bold, italic, strikethrough and code spans as run formatting. Every style is a
built-in one of python-docx's template, so Word and LibreOffice show real headings (their
navigation pane, their own table of contents)."""

from __future__ import annotations

import io

from .blocks import Block, Run, blocks

CODE_FONT = "Courier New"


def render_docx(markdown: str, title: str) -> bytes:
    import docx

    document = docx.Document()
    document.core_properties.title = title[:255]
    for block in blocks(markdown):
        _write(document, block)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def _write(document, block: Block) -> None:
    if block.kind == "title":
        _runs(document.add_heading("", 0), block.runs)
    elif block.kind == "heading":
        _runs(document.add_heading("", min(block.level, 9)), block.runs)
    elif block.kind == "item":
        depth = _depth_suffix(block.level)
        if block.marker == "•":
            paragraph = document.add_paragraph(style=f"List Bullet{depth}")
        else:  # numbers written as text: Word's own numbering would run on across every list
            paragraph = document.add_paragraph(f"{block.marker} ", style=f"List{depth}")
        _runs(paragraph, block.runs)
    elif block.kind == "paragraph":
        style = "Quote" if block.quote else f"List Continue{_depth_suffix(block.level)}" if block.level else None
        _runs(document.add_paragraph(style=style), block.runs)
    elif block.kind == "code":
        paragraph = document.add_paragraph(style="No Spacing")
        lines = block.text.split("\n")
        for number, line in enumerate(lines):
            run = paragraph.add_run(line)
            run.font.name = CODE_FONT
            if number < len(lines) - 1:
                run.add_break()
    elif block.kind == "rule":
        document.add_paragraph("* * *").alignment = 1  # centred
    elif block.kind == "table" and block.rows:
        width = max(len(row) for row in block.rows)
        table = document.add_table(rows=len(block.rows), cols=width, style="Table Grid")
        for r, row in enumerate(block.rows):
            for c, cell in enumerate(row):
                _runs(table.cell(r, c).paragraphs[0], cell, bold=r == 0)


def _runs(paragraph, runs: list[Run], *, bold: bool = False) -> None:
    for run in runs:
        if run.text == "\n":
            paragraph.add_run().add_break()
            continue
        added = paragraph.add_run(run.text)
        added.bold = run.bold or bold or None
        added.italic = run.italic or None
        added.font.strike = run.strike or None
        added.underline = run.link is not None or None
        if run.code:
            added.font.name = CODE_FONT


def _depth_suffix(depth: int) -> str:
    """The built-in list styles go three deep: '', ' 2', ' 3'."""
    return "" if depth <= 1 else f" {min(depth, 3)}"
