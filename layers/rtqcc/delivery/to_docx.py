"""A manuscript as a Word document (python-docx): the title in the Title style, each section's
heading as Heading 1 and its subheadings as Heading 2 and below (one level under the markdown's,
whose level 1 is the title), paragraphs, lists, quotes, code, tables, and bold, italic,
strikethrough and code spans as run formatting. Every style is a built-in one of python-docx's
template, so Word and LibreOffice show real headings (navigation pane, their own table of contents)."""

from __future__ import annotations

import io

from markdown_it.token import Token

from .markdown import heading_level, parse

CODE_FONT = "Courier New"


def render_docx(markdown: str, title: str) -> bytes:
    import docx

    document = docx.Document()
    document.core_properties.title = title[:255]
    _Writer(document).blocks(parse(markdown))
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


class _Writer:
    """Walks markdown-it's block tokens once, writing each block as it closes its opening."""

    def __init__(self, document):
        self.document = document
        self.lists: list[list[int]] = []  # one per open list: [next number] for ordered, [] for bullets
        self.quote_depth = 0
        self.titled = False
        self.paragraph = None  # the open list item's paragraph, which its first inline fills

    def blocks(self, tokens: list[Token]) -> None:
        at = 0
        while at < len(tokens):
            at = self.block(tokens, at)

    def block(self, tokens: list[Token], at: int) -> int:
        token = tokens[at]
        kind = token.type
        if level := heading_level(token):
            # The manuscript's first level-1 heading is its title; any later one is a section's.
            style_level = 0 if level == 1 and not self.titled else max(1, min(level - 1, 9))
            self.titled = True
            self.inline(self.document.add_heading("", style_level), tokens[at + 1])
            return at + 3
        if kind in ("bullet_list_open", "ordered_list_open"):
            self.lists.append([int(token.attrGet("start") or 1)] if kind == "ordered_list_open" else [])
        elif kind in ("bullet_list_close", "ordered_list_close"):
            self.lists.pop()
        elif kind == "list_item_open":
            self.paragraph = self.list_paragraph()
        elif kind == "blockquote_open":
            self.quote_depth += 1
        elif kind == "blockquote_close":
            self.quote_depth -= 1
        elif kind == "inline":
            paragraph, self.paragraph = self.paragraph, None
            if paragraph is None:
                paragraph = self.document.add_paragraph(style=self.block_style())
                if self.lists:  # a list item's second paragraph: indented under it
                    paragraph.style = f"List Continue{_depth_suffix(len(self.lists))}"
            self.inline(paragraph, token)
        elif kind in ("fence", "code_block"):
            paragraph = self.document.add_paragraph(style="No Spacing")
            lines = token.content.rstrip("\n").split("\n")
            for number, line in enumerate(lines):
                run = paragraph.add_run(line)
                run.font.name = CODE_FONT
                if number < len(lines) - 1:
                    run.add_break()
        elif kind == "hr":
            self.document.add_paragraph("* * *").alignment = 1  # centred
        elif kind == "table_open":
            return self.table(tokens, at)
        return at + 1

    def block_style(self) -> str | None:
        return "Quote" if self.quote_depth else None

    def list_paragraph(self):
        depth = _depth_suffix(len(self.lists))
        numbering = self.lists[-1]
        if not numbering:
            return self.document.add_paragraph(style=f"List Bullet{depth}")
        # Numbers written as text: Word's list numbering would run on across every list.
        paragraph = self.document.add_paragraph(f"{numbering[0]}. ", style=f"List{depth}")
        numbering[0] += 1
        return paragraph

    def table(self, tokens: list[Token], at: int) -> int:
        rows: list[list[Token]] = []
        while tokens[at].type != "table_close":
            if tokens[at].type == "tr_open":
                rows.append([])
            elif tokens[at].type == "inline":
                rows[-1].append(tokens[at])
            at += 1
        width = max((len(row) for row in rows), default=0)
        if width:
            table = self.document.add_table(rows=len(rows), cols=width, style="Table Grid")
            for r, row in enumerate(rows):
                for c, cell in enumerate(row):
                    self.inline(table.cell(r, c).paragraphs[0], cell, bold=r == 0)
        return at + 1

    def inline(self, paragraph, inline: Token, *, bold: bool = False) -> None:
        """The inline token's children as runs: bold, italic, strikethrough and code as run
        formatting; a link as its text, underlined, followed by its address."""
        strong = em = strike = 0
        link: str | None = None
        link_text: list[str] = []
        for child in inline.children or ():
            kind = child.type
            if kind in ("text", "code_inline"):
                if link is not None:
                    link_text.append(child.content)
                run = paragraph.add_run(child.content)
                run.bold = bool(strong) or bold or None
                run.italic = bool(em) or None
                run.font.strike = bool(strike) or None
                run.underline = link is not None or None
                if kind == "code_inline":
                    run.font.name = CODE_FONT
            elif kind == "softbreak":
                paragraph.add_run(" ")
            elif kind == "hardbreak":
                paragraph.add_run().add_break()
            elif kind in ("strong_open", "strong_close"):
                strong += 1 if kind.endswith("open") else -1
            elif kind in ("em_open", "em_close"):
                em += 1 if kind.endswith("open") else -1
            elif kind in ("s_open", "s_close"):
                strike += 1 if kind.endswith("open") else -1
            elif kind == "link_open":
                link, link_text = str(child.attrGet("href") or ""), []
            elif kind == "link_close":
                if link and link != "".join(link_text):
                    paragraph.add_run(f" <{link}>")
                link = None


def _depth_suffix(depth: int) -> str:
    """The built-in list styles go three deep: '', ' 2', ' 3'."""
    return "" if depth <= 1 else f" {min(depth, 3)}"
