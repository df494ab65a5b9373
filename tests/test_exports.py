"""Exports of a finished manuscript, over real HTTP through the local gateway, from jobs written by
a real consumer: a DOCX with real heading styles, a PDF whose pages poppler renders, a standalone
HTML file an HTML5 parser accepts, none of which runs or shows as markup what the model or a user
wrote as HTML; each built once per manuscript revision and kept in S3; and `rtqcc jobs export`."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import html5lib
import httpx
import pytest
from conftest import API_KEY, OTHER_KEY, section_texts

from rtqcc.cli import main as rtqcc
from rtqcc.delivery.formats import DOCX, FORMATS, PDF
from rtqcc.store.blobs import export_key

OUTLINE = [{"title": f"Part {n}: the {word}", "brief": f"What part {n} covers."}
           for n, word in enumerate(("queue", "lease", "ledger"))]
HOSTILE = ("Before <script>alert(1)</script> and <img src=x onerror=alert(2)> and <b>bold?</b>\n\n"
           "<div onclick=\"alert(3)\">a raw block</div>\n\n"
           "[a link](javascript:alert(4)) and ![a picture](http://127.0.0.1:9/tracker.png)\n")


def finished_job(api, run_consumer, *, outline=OUTLINE, title="Field notes", tokens=60) -> str:
    external_id = api.create(title=title, outline=outline, params={"max_tokens_per_section": tokens})
    assert api.post(f"/jobs/{external_id}/start").status_code == 202
    run_consumer()
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"
    return external_id


@pytest.fixture
def http(start_gateway):
    running = start_gateway()
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30) as client:
        yield client


def export(http, external_id: str, fmt: str) -> httpx.Response:
    """As a client that names the type it wants, which gets a small export inline."""
    answer = http.get(f"/jobs/{external_id}/manuscript", params={"format": fmt},
                      headers={"Accept": FORMATS[fmt].media_type})
    assert answer.status_code == 200, answer.text[:500]
    return answer


def words(text: str) -> str:
    return " ".join(text.split())


def docx_paragraphs(body: bytes) -> list[tuple[str, str]]:
    import docx

    return [(p.style.name, p.text) for p in docx.Document(io.BytesIO(body)).paragraphs]


@pytest.fixture(autouse=True, scope="module")
def poppler() -> None:
    missing = [tool for tool in ("pdftoppm", "pdftotext") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: apt-get install -y poppler-utils "
                    "(Debian's package; .ci/run installs it)", pytrace=False)


def pdf_text(path: Path, page: int | None = None) -> str:
    pages = ["-f", str(page), "-l", str(page)] if page else []
    return subprocess.run(["pdftotext", "-layout", *pages, str(path), "-"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def pdf_pages_as_png(pdf: bytes, folder: Path) -> list[Path]:
    """Every page rendered by poppler's pdftoppm: one PNG a page, or it fails."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "export.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "30", str(folder / "export.pdf"), str(folder / "page")],
                   check=True, timeout=120, capture_output=True)
    pngs = sorted(folder.glob("page-*.png"))
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    return pngs


def edit_section(api, external_id: str, index: int, content: str) -> None:
    etag = api.get(f"/jobs/{external_id}/sections/{index}").headers["ETag"]
    edited = api.put(f"/jobs/{external_id}/sections/{index}", {"content": content}, headers={"If-Match": etag})
    assert edited.status_code == 200, edited.body


# ---- the three documents ---------------------------------------------------------------------

def test_the_docx_has_the_title_and_headings_in_heading_styles_and_every_sections_text(api, run_consumer, http):
    external_id = finished_job(api, run_consumer)
    answer = export(http, external_id, "docx")
    assert answer.headers["content-type"] == DOCX.media_type
    assert answer.headers["content-disposition"] == 'attachment; filename="Field-notes.docx"'

    paragraphs = docx_paragraphs(answer.content)
    assert paragraphs[0] == ("Title", "Field notes")
    assert [text for style, text in paragraphs if style == "Heading 1"] == [s["title"] for s in OUTLINE]
    body = words(" ".join(text for _, text in paragraphs))
    for text in section_texts(api, external_id):
        assert words(text) in body


def test_markdown_structure_maps_to_word_styles(api, run_consumer, http):
    external_id = finished_job(api, run_consumer)
    edit_section(api, external_id, 1, "### A subheading\n\nSome **bold** and *italic* words.\n\n"
                                      "- first point\n- second point\n\n1. one\n2. two\n\n> quoted\n")
    import docx

    document = docx.Document(io.BytesIO(export(http, external_id, "docx").content))
    styled = [(p.style.name, p.text) for p in document.paragraphs]
    assert ("Heading 2", "A subheading") in styled
    assert [s for s, t in styled if t in ("first point", "second point")] == ["List Bullet", "List Bullet"]
    assert ("List", "1. one") in styled and ("List", "2. two") in styled and ("Quote", "quoted") in styled
    runs = {run.text: run for p in document.paragraphs for run in p.runs}
    assert runs["bold"].bold and runs["italic"].italic


def test_the_pdf_renders_page_by_page_with_the_title_on_page_one(api, run_consumer, http, tmp_path):
    short = finished_job(api, run_consumer, title="A short one")
    long_outline = [{"title": f"Chapter {n}", "brief": f"Chapter {n} of many."} for n in range(12)]
    long = finished_job(api, run_consumer, outline=long_outline, title="A long one", tokens=400)

    answer = export(http, long, "pdf")
    assert answer.headers["content-type"] == "application/pdf"
    assert answer.content.startswith(b"%PDF-")
    pngs = pdf_pages_as_png(answer.content, tmp_path / "long")
    assert len(pngs) >= 3, "twelve chapters of 400 words should fill several pages"
    pdf = tmp_path / "long" / "export.pdf"
    assert "A long one" in pdf_text(pdf, 1).split("\n")[0]
    assert "Chapter 0" in pdf_text(pdf, 1)
    last = words(section_texts(api, long)[-1])
    assert words(last)[-40:] in words(pdf_text(pdf, len(pngs))), "the last chapter ends on the last page"
    everything = words(pdf_text(pdf))
    for chapter in long_outline:
        assert chapter["title"] in everything

    short_pngs = pdf_pages_as_png(export(http, short, "pdf").content, tmp_path / "short")
    assert 1 <= len(short_pngs) < len(pngs)


def test_the_html_is_valid_html5_with_a_table_of_contents(api, run_consumer, http):
    external_id = finished_job(api, run_consumer)
    answer = export(http, external_id, "html")
    assert answer.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in answer.headers["content-security-policy"]

    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(answer.content)
    assert tree.find("head/title").text == "Field notes"
    assert tree.find(".//header/h1").text == "Field notes"
    links = tree.findall(".//nav/ol/li/a")
    assert [a.text for a in links] == [s["title"] for s in OUTLINE]
    ids = {element.get("id") for element in tree.iter() if element.get("id")}
    assert all(a.get("href").startswith("#") and a.get("href")[1:] in ids for a in links)
    assert words(section_texts(api, external_id)[2]) in words("".join(tree.find(".//article").itertext()))


def test_html_from_the_model_or_a_user_is_text_in_every_format(api, run_consumer, http, tmp_path):
    title = "Notes <script>alert(0)</script>"
    external_id = finished_job(api, run_consumer, title=title)
    edit_section(api, external_id, 1, HOSTILE)

    answer = export(http, external_id, "html")
    assert answer.headers["content-disposition"] == 'attachment; filename="Notes-script-alert-0-script.html"'
    tree = html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(answer.content)
    assert tree.findall(".//script") == [] and tree.findall(".//img") == [] and tree.findall(".//div") == []
    assert not [e for e in tree.iter() for name in e.attrib if name.lower().startswith("on")]
    assert all(not a.get("href", "").lower().startswith("javascript") for a in tree.iter("a"))
    text = "".join(tree.find(".//article").itertext())
    assert "<script>alert(1)</script>" in text and '<div onclick="alert(3)">a raw block</div>' in text
    assert tree.find("head/title").text == title and tree.find(".//header/h1").text == title

    docx_text = "\n".join(text for _, text in docx_paragraphs(export(http, external_id, "docx").content))
    assert title in docx_text and "<script>alert(1)</script>" in docx_text
    assert '<div onclick="alert(3)">a raw block</div>' in docx_text

    pdf = tmp_path / "hostile.pdf"
    pdf.write_bytes(export(http, external_id, "pdf").content)
    pdf_words = words(pdf_text(pdf))
    assert "<script>alert(0)</script>" in pdf_words and "<script>alert(1)</script>" in pdf_words
    assert '<div onclick="alert(3)">a raw block</div>' in pdf_words


def test_text_beyond_latin_and_control_characters_do_not_break_an_export(api, run_consumer, http, tmp_path):
    external_id = finished_job(api, run_consumer, title="Ωμέγα — Привет — 漢字")
    edit_section(api, external_id, 0, "Grüße, Ελληνικά, русский, עברית, 漢字, emoji 🚀, arrows →.\x0c\x01 End.")
    for fmt in ("html", "docx", "pdf"):
        assert export(http, external_id, fmt).content
    pdf = tmp_path / "unicode.pdf"
    pdf.write_bytes(export(http, external_id, "pdf").content)
    assert "Grüße, Ελληνικά, русский" in pdf_text(pdf)


# ---- built once per manuscript revision ----------------------------------------------------------

def test_an_export_is_stored_once_beside_its_manuscript_and_a_revision_makes_a_new_one(
        api, run_consumer, http, blob_store):
    external_id = finished_job(api, run_consumer)
    first = export(http, external_id, "pdf").content
    key = export_key(f"manuscripts/{external_id}/manuscript.md", "pdf")
    assert key == f"manuscripts/{external_id}/exports/manuscript.pdf"
    stored = blob_store.client.head_object(Bucket=blob_store.bucket, Key=key)
    assert stored["ContentType"] == "application/pdf"

    again = export(http, external_id, "pdf").content
    assert again == first == blob_store.get(key)
    unchanged = blob_store.client.head_object(Bucket=blob_store.bucket, Key=key)
    assert (unchanged["ETag"], unchanged["LastModified"]) == (stored["ETag"], stored["LastModified"])

    edit_section(api, external_id, 0, "A person's own words.")
    revised = export(http, external_id, "pdf").content
    assert revised != first and "A person's own words." in subprocess.run(
        ["pdftotext", "-", "-"], input=revised, capture_output=True, check=True).stdout.decode()
    assert blob_store.get(f"manuscripts/{external_id}/exports/manuscript.r1.pdf") == revised
    assert blob_store.get(key) == first  # the earlier revision's export stays whole


def test_a_large_export_or_a_client_that_does_not_ask_for_its_type_gets_a_presigned_redirect(
        api, run_consumer, make_services, start_gateway):
    external_id = finished_job(api, run_consumer)
    small = start_gateway(services_override=make_services(max_inline_manuscript_bytes=1024))
    with httpx.Client(base_url=small.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30) as client:
        answer = client.get(f"/jobs/{external_id}/manuscript?format=docx", headers={"Accept": DOCX.media_type})
        assert answer.status_code == 303, answer.text[:300]
        assert answer.headers["content-disposition"] == 'attachment; filename="Field-notes.docx"'
        downloaded = httpx.get(answer.headers["location"], timeout=30)
    assert downloaded.status_code == 200 and downloaded.content.startswith(b"PK")
    assert downloaded.headers["content-disposition"] == 'attachment; filename="Field-notes.docx"'
    assert docx_paragraphs(downloaded.content)[0] == ("Title", "Field notes")

    # API Gateway hands a binary answer over as bytes only when Accept names its type first.
    for accept in ("*/*", "application/json", f"text/html, {PDF.media_type}"):
        with httpx.Client(base_url=start_gateway().base_url, timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Accept": accept}) as client:
            answer = client.get(f"/jobs/{external_id}/manuscript?format=pdf")
        assert answer.status_code == 303, (accept, answer.status_code)
        assert httpx.get(answer.headers["location"]).content.startswith(b"%PDF-")


# ---- asking for a format ---------------------------------------------------------------------------

def test_the_format_comes_from_the_query_else_the_accept_header(api, run_consumer, http):
    external_id = finished_job(api, run_consumer)
    path = f"/jobs/{external_id}/manuscript"
    assert http.get(path).headers["content-type"] == "text/markdown; charset=utf-8"  # Accept: */*
    assert http.get(path, headers={"Accept": "text/html"}).headers["content-type"].startswith("text/html")
    negotiated = http.get(path, headers={"Accept": f"{PDF.media_type}, text/html;q=0.5"})
    assert negotiated.status_code == 200 and negotiated.content.startswith(b"%PDF-")
    wins = http.get(path, params={"format": "html"}, headers={"Accept": PDF.media_type})
    assert wins.headers["content-type"].startswith("text/html")  # ?format= wins over Accept
    markdown = http.get(path, params={"format": "markdown"})
    assert markdown.text.startswith("# Field notes\n")
    assert markdown.headers["content-disposition"] == 'attachment; filename="Field-notes.md"'


def test_an_unknown_format_or_an_unacceptable_accept_is_a_json_error_naming_the_formats(api, http):
    external_id = api.create(outline=OUTLINE)
    unknown = http.get(f"/jobs/{external_id}/manuscript", params={"format": "rtf"})
    assert unknown.status_code == 400 and unknown.headers["content-type"] == "application/json"
    assert unknown.json()["error"]["code"] == "bad_request"
    assert all(name in unknown.json()["error"]["message"] for name in ("markdown", "html", "docx", "pdf"))
    refused = http.get(f"/jobs/{external_id}/manuscript", headers={"Accept": "image/png"})
    assert refused.status_code == 406 and refused.json()["error"]["code"] == "not_acceptable"
    assert "docx" in refused.json()["error"]["message"]


def test_an_export_is_a_409_until_the_job_completes_and_a_404_for_another_tenant(api, run_consumer, http):
    waiting = api.create(outline=OUTLINE)
    for fmt in ("html", "docx", "pdf"):
        answer = http.get(f"/jobs/{waiting}/manuscript", params={"format": fmt})
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "not_ready"
    done = finished_job(api, run_consumer)
    theirs = http.get(f"/jobs/{done}/manuscript", params={"format": "docx"},
                      headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "job_not_found"
    assert "Field notes" not in theirs.text


# ---- the command line ------------------------------------------------------------------------------

def test_rtqcc_jobs_export_writes_the_file_under_the_name_the_api_gives_or_the_one_asked(
        api, run_consumer, http, make_services, start_gateway, tmp_path, monkeypatch, capsys):
    external_id = finished_job(api, run_consumer)
    monkeypatch.chdir(tmp_path)
    base = ["jobs", "--url", str(http.base_url), "--key", API_KEY, "export", external_id]
    assert rtqcc([*base, "--format", "docx"]) == 0
    assert docx_paragraphs((tmp_path / "Field-notes.docx").read_bytes())[0] == ("Title", "Field notes")
    assert rtqcc([*base, "--format", "docx"]) == 1, "an existing file is not overwritten without -o"
    assert "exists" in capsys.readouterr().err

    assert rtqcc([*base, "--format", "pdf", "-o", str(tmp_path / "report.pdf")]) == 0
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF-")

    small = start_gateway(services_override=make_services(max_inline_manuscript_bytes=1024))
    redirected = ["jobs", "--url", small.base_url, "--key", API_KEY, "export", external_id]
    assert rtqcc([*redirected, "--format", "html", "-o", "via-s3.html"]) == 0  # the presigned redirect
    assert b"<nav class=\"toc\"" in (tmp_path / "via-s3.html").read_bytes()

    assert rtqcc([*base[:-1], "RTQCC-01J0000000000000000000000", "--format", "pdf"]) == 1
    assert re.search(r"404 job_not_found", capsys.readouterr().err)
