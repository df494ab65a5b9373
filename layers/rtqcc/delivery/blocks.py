"""A manuscript as a flat list of blocks (title, headings, paragraphs, list items, quotes, code,
tables, rules), each paragraph a list of formatted runs: what the DOCX and PDF writers lay out,
read once from markdown-it's tokens so both documents say the same thing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from markdown_it.token import Token

from .markdown import heading_level, parse


@dataclass(frozen=True)
class Run:
    text: str
    bold: bool = False
    italic: bool = False
    strike: bool = False
    code: bool = False
    link: str | None = None  # the address of the link this text is, if it is one


@dataclass
class Block:
    kind: str                                 # title, heading, paragraph, item, code, table, rule
    runs: list[Run] = field(default_factory=list)
    level: int = 0                            # heading: 1 for a section; item and paragraph: list depth
    marker: str = ""                          # item: "•" or "3."
    quote: bool = False                       # inside a blockquote
    text: str = ""                            # code: its lines
    rows: list[list[list[Run]]] = field(default_factory=list)  # table: rows of cells of runs


def blocks(markdown: str) -> list[Block]:
    return list(_Reader().read(parse(markdown)))


def plain(runs: list[Run]) -> str:
    return "".join(run.text for run in runs)


class _Reader:
    def __init__(self):
        self.lists: list[list[int]] = []  # one per open list: [next number] when ordered, [] for bullets
        self.quote_depth = 0
        self.titled = False
        self.item: Block | None = None    # a list item opened, waiting for its first paragraph

    def read(self, tokens: list[Token]) -> Iterator[Block]:
        at = 0
        while at < len(tokens):
            token = tokens[at]
            kind = token.type
            if level := heading_level(token):
                # The manuscript's first level-1 heading is its title; then `##` is a section (1).
                if level == 1 and not self.titled:
                    yield Block("title", runs(tokens[at + 1]))
                else:
                    yield Block("heading", runs(tokens[at + 1]), level=max(1, level - 1))
                self.titled = True
                at += 3
                continue
            if kind in ("bullet_list_open", "ordered_list_open"):
                self.lists.append([int(token.attrGet("start") or 1)] if kind == "ordered_list_open" else [])
            elif kind in ("bullet_list_close", "ordered_list_close"):
                self.lists.pop()
            elif kind == "list_item_open":
                numbering = self.lists[-1]
                self.item = Block("item", level=len(self.lists), quote=self.quote_depth > 0,
                                  marker=f"{numbering[0]}." if numbering else "•")
                if numbering:
                    numbering[0] += 1
            elif kind == "blockquote_open":
                self.quote_depth += 1
            elif kind == "blockquote_close":
                self.quote_depth -= 1
            elif kind == "inline":
                block, self.item = self.item, None
                block = block or Block("paragraph", level=len(self.lists), quote=self.quote_depth > 0)
                block.runs = runs(token)
                yield block
            elif kind in ("fence", "code_block"):
                yield Block("code", text=token.content.rstrip("\n"), level=len(self.lists))
            elif kind == "hr":
                yield Block("rule")
            elif kind == "table_open":
                table = Block("table")
                while tokens[at].type != "table_close":
                    if tokens[at].type == "tr_open":
                        table.rows.append([])
                    elif tokens[at].type == "inline":
                        table.rows[-1].append(runs(tokens[at]))
                    at += 1
                yield table
            at += 1


def runs(inline: Token) -> list[Run]:
    """An inline token's children as runs; a link's address follows its text when it differs."""
    found: list[Run] = []
    strong = em = strike = 0
    link: str | None = None
    link_text: list[str] = []
    for child in inline.children or ():
        kind = child.type
        if kind in ("text", "code_inline"):
            found.append(Run(child.content, bold=strong > 0, italic=em > 0, strike=strike > 0,
                             code=kind == "code_inline", link=link))
            if link is not None:
                link_text.append(child.content)
        elif kind == "softbreak":
            found.append(Run(" "))
        elif kind == "hardbreak":
            found.append(Run("\n"))
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
                found.append(Run(f" <{link}>"))
            link = None
    return found
