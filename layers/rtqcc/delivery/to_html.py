"""A manuscript as one standalone HTML file: styled, with a table of contents linking to its
headings, and a Content-Security-Policy that lets it load and run nothing, wherever it is opened."""

from __future__ import annotations

from html import escape

from .formats import EXPORT_CSP
from .markdown import headings, parse, parser, split_title

STYLE = """
:root { color-scheme: light dark; }
body { margin: 0; font: 17px/1.6 Georgia, "DejaVu Serif", serif; color: #1d1d1f; background: #fdfdfb; }
main { max-width: 46rem; margin: 0 auto; padding: 2.5rem 1.25rem 4rem; }
h1, h2, h3, h4 { font-family: system-ui, "DejaVu Sans", sans-serif; line-height: 1.25; }
h1 { font-size: 2.1rem; margin: 0 0 1.5rem; }
h2 { font-size: 1.5rem; margin-top: 2.5rem; border-bottom: 1px solid #ddd; padding-bottom: .25rem; }
nav.toc { font-family: system-ui, "DejaVu Sans", sans-serif; background: #f3f3ef; border-radius: 6px;
          padding: .75rem 1.25rem; margin-bottom: 2rem; }
nav.toc h2 { font-size: 1rem; margin: 0 0 .5rem; border: 0; }
nav.toc ol { margin: 0; padding-left: 1.25rem; }
nav.toc ol ol { list-style: none; padding-left: 1rem; }
a { color: #0b5cad; }
pre, code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .9em; }
pre { background: #f3f3ef; padding: .75rem; overflow-x: auto; border-radius: 4px; }
blockquote { margin-left: 0; padding-left: 1rem; border-left: 3px solid #ccc; color: #555; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: .3rem .6rem; }
@media (prefers-color-scheme: dark) {
  body { color: #e8e8e3; background: #181816; } nav.toc, pre { background: #262624; }
  h2 { border-color: #444; } a { color: #7ab7f5; } blockquote { color: #aaa; }
}
@media print { nav.toc { display: none; } body { background: #fff; } }
"""


def render_html(markdown: str, title: str) -> bytes:
    md = parser()
    tokens = parse(markdown)
    title_tokens, body = split_title(tokens)
    heading = md.renderer.render(title_tokens, md.options, {}) if title_tokens else f"<h1>{escape(title)}</h1>\n"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{EXPORT_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
        f"<header>\n{heading}</header>\n{table_of_contents(body)}"
        f"<article>\n{md.renderer.render(body, md.options, {})}</article>\n"
        "</main>\n</body>\n</html>\n"
    ).encode("utf-8")


def table_of_contents(tokens) -> str:
    """The sections (level 2) and their subsections (level 3) as nested lists of links."""
    entries = [h for h in headings(tokens) if h.level in (2, 3) and h.anchor]
    if not entries:
        return ""
    parts = ['<nav class="toc" aria-label="Contents">\n<h2>Contents</h2>\n<ol>\n']
    open_sub = False
    for at, entry in enumerate(entries):
        link = f'<a href="#{escape(entry.anchor)}">{escape(entry.text)}</a>'
        if entry.level == 3 and at > 0:
            parts.append("<ol>\n" if not open_sub else "")
            parts.append(f"<li>{link}</li>\n")
            open_sub = True
            continue
        if open_sub:
            parts.append("</ol>\n")
            open_sub = False
        if at > 0:
            parts.append("</li>\n")
        parts.append(f"<li>{link}")
    parts.append("</ol>\n" if open_sub else "")
    parts.append("</li>\n</ol>\n</nav>\n")
    return "".join(parts)
