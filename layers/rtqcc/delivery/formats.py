"""The formats a manuscript is exported in, and which one a request asks for: `?format=` when
given (it wins), else the best match of its Accept header, else markdown."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BadRequest, NotAcceptable


@dataclass(frozen=True)
class ExportFormat:
    name: str        # as in ?format=
    media_type: str  # the answer's Content-Type, and what Accept names it by
    extension: str
    binary: bool     # travels base64-encoded through the function's answer

    @property
    def content_type(self) -> str:
        return f"{self.media_type}; charset=utf-8" if not self.binary else self.media_type


MARKDOWN = ExportFormat("markdown", "text/markdown", "md", binary=False)
HTML = ExportFormat("html", "text/html", "html", binary=False)
DOCX = ExportFormat("docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "docx",
                    binary=True)
PDF = ExportFormat("pdf", "application/pdf", "pdf", binary=True)
FORMATS = {f.name: f for f in (MARKDOWN, HTML, DOCX, PDF)}
BINARY_MEDIA_TYPES = [f.media_type for f in FORMATS.values() if f.binary]
# A text export loads and runs nothing, as a file or as the API's answer: its own styles only.
EXPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def choose_format(format_param: str | None, accept: str | None) -> ExportFormat:
    """The format a request asks for; BadRequest for an unknown ?format=, NotAcceptable when its
    Accept header admits none of them."""
    listed = ", ".join(FORMATS)
    if format_param is not None:
        chosen = FORMATS.get(format_param.strip().lower())
        if chosen is None:
            raise BadRequest(f"format must be one of {listed}; got {format_param[:40]!r}.")
        return chosen
    if not accept or not accept.strip():
        return MARKDOWN
    import mimeparse

    # best_match prefers the later of equally good types: markdown, last, answers */*.
    supported = [f.media_type for f in (PDF, DOCX, HTML, MARKDOWN)]
    try:
        best = mimeparse.best_match(supported, accept)
    except (ValueError, IndexError):  # a malformed Accept is ignored (RFC 9110 allows it), as before exports
        return MARKDOWN
    if not best:
        raise NotAcceptable(f"The manuscript comes as {listed} ({', '.join(reversed(supported))});"
                            f" Accept names none of them: {accept[:80]!r}. Or ask with ?format=.")
    return next(f for f in FORMATS.values() if f.media_type == best)


def download_name(title: str, fallback: str, fmt: ExportFormat) -> str:
    """A file name from the job's title: ASCII letters, digits, '.', '_' and '-' only (anything
    else becomes '-'), at most 80 characters, so it is safe in a header and on any file system."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", title).strip(".-_")[:80].rstrip(".-_")
    return f"{stem or fallback}.{fmt.extension}"


def content_disposition(filename: str) -> str:
    return f'attachment; filename="{filename}"'
