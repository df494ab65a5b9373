"""An export of one assembly of the manuscript: rendered the first time it is asked for, stored
in S3 beside the manuscript (store/blobs.py: export_key), and read back from there every time
after. It is a function of the manuscript's bytes alone, so the same key always holds the same
document; a revision assembles the manuscript under a new key, and so gets new exports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..store.blobs import BlobMissing, BlobStore, export_key
from ..text import strip_xml_illegal
from .formats import DOCX, HTML, MARKDOWN, PDF, ExportFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Export:
    key: str
    body: bytes | None  # None: larger than the caller's inline limit (then it is not downloaded)


def _renderer(fmt: ExportFormat) -> Callable[[str, str], bytes]:
    # Each renderer's library is imported only when its format is asked for.
    if fmt == HTML:
        from .to_html import render_html
        return render_html
    if fmt == DOCX:
        from .to_docx import render_docx
        return render_docx
    if fmt == PDF:
        from .to_pdf import render_pdf
        return render_pdf
    raise ValueError(f"no renderer for {fmt.name}")


def render(fmt: ExportFormat, markdown: str, title: str) -> bytes:
    return _renderer(fmt)(strip_xml_illegal(markdown), strip_xml_illegal(title))


def stored_export(blobs: BlobStore, manuscript_key: str, title: str, fmt: ExportFormat, *,
                  inline_limit_bytes: int, disposition: str) -> Export:
    """The export of the manuscript at `manuscript_key` in `fmt`: the stored one when there is
    one, else rendered now and stored, with the Content-Disposition `disposition`, which S3 gives
    a download of it by a presigned URL. Two first requests at once both render and store the same
    document under the same key: harmless, and rarer than a lock would be worth."""
    if fmt == MARKDOWN:
        return Export(manuscript_key, blobs.read_at_most(manuscript_key, inline_limit_bytes))
    key = export_key(manuscript_key, fmt.extension)
    try:
        return Export(key, blobs.read_at_most(key, inline_limit_bytes))
    except BlobMissing:
        pass
    body = render(fmt, blobs.get(manuscript_key).decode("utf-8"), title)
    blobs.put(key, body, content_type=fmt.content_type, content_disposition=disposition)
    log.info("stored the %s export of %s (%d bytes)", fmt.name, manuscript_key, len(body))
    return Export(key, body if len(body) <= inline_limit_bytes else None)
