"""The one markdown parser every export uses, configured so that nothing in a manuscript runs or
loads: raw HTML off (a `<script>` from the model or a user stays text), images off (`![a](url)`
becomes a plain link, so opening an export fetches nothing), and markdown-it's own refusal of
`javascript:`, `vbscript:`, `file:` and `data:` links."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from markdown_it import MarkdownIt
from markdown_it.token import Token


@dataclass(frozen=True)
class Heading:
    level: int
    text: str
    anchor: str


@lru_cache(maxsize=1)
def parser() -> MarkdownIt:
    from mdit_py_plugins.anchors import anchors_plugin

    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"]).disable("image")
    md.use(anchors_plugin, min_level=1, max_level=3)  # ids the table of contents links to
    return md


def parse(markdown: str) -> list[Token]:
    return parser().parse(markdown)


def plain_text(inline: Token) -> str:
    """What an inline token reads as, without its markup."""
    return "".join(child.content for child in inline.children or () if child.type in ("text", "code_inline")
                   ) or inline.content


def headings(tokens: list[Token], *, max_level: int = 3) -> list[Heading]:
    found = []
    for at, token in enumerate(tokens):
        level = heading_level(token)
        if level and level <= max_level:
            found.append(Heading(level, plain_text(tokens[at + 1]), str(token.attrGet("id") or "")))
    return found


def heading_level(token: Token) -> int:
    """1 to 6 for a heading_open token, else 0."""
    return int(token.tag[1]) if token.type == "heading_open" else 0


def split_title(tokens: list[Token]) -> tuple[list[Token], list[Token]]:
    """The manuscript's leading `# title` (its three tokens) and the rest (store/manuscripts.py
    assembles every manuscript so)."""
    if tokens and heading_level(tokens[0]) == 1:
        return tokens[:3], tokens[3:]
    return [], tokens
