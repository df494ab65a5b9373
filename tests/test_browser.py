"""The web page at `/`, in a real headless Chromium: a user enters the API key the page asks for,
creates a job, watches the outline and the sections being written token by token, pauses and
resumes it, reloads the page mid-job, and downloads the manuscript; a wrong key is refused with
a clear message. Driven by Playwright over Debian's Chromium (no browser download). The page runs
under the server's CSP (no inline script or style), so a violation would show as a page error.

Set RTQCC_SCREENSHOT=path/to/file.png to also save a screenshot of the page mid-job."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, wait_for

CHROMIUM = os.environ.get("RTQCC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = ("Install Debian's Chromium: `apt-get update && apt-get install -y chromium` "
                "(or point RTQCC_CHROMIUM at a Chromium binary). `.ci/run` installs it in CI.")
TOKENS_PER_S = 40.0   # slow enough to watch text appear and to pause mid-section
WAIT_MS = 20_000      # the bound of every wait on the page

# JavaScript predicates over the page's DOM, for wait_js. A section's text is compared with its
# white space folded (norm() on the Python side): once done it is rendered markdown, whose
# paragraphs are elements, not blank lines.
STATUS_IS = "(s) => document.getElementById('job-status').textContent === s"
SECTION_TEXT = ("(i) => (document.querySelector(`.sec[data-index='${i}'] .text`)?.textContent ?? '')"
                ".replace(/\\s+/g, ' ').trim()")
RENDERED = "(i) => !!document.querySelector(`.sec[data-index='${i}'] .text.md`)"
LIVE_TEXT = """() => document.getElementById('job-status').textContent === 'running'
    && [...document.querySelectorAll('.sec .text')].some((el) => el.textContent.length > 0)"""


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"No Chromium at {CHROMIUM}: the browser tests need it. {INSTALL_HINT}", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `pip install -e '.[test]'` (never `playwright install`: "
                    f"the tests use the system Chromium). {INSTALL_HINT}", pytrace=False)
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary user-data dir, removed on close.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"uncaught: {exc}"))
    page.on("console", lambda msg: errors.append(f"console: {msg.text} @ {msg.location.get('url')}")
            if msg.type == "error" and not msg.location.get("url", "").endswith("/favicon.ico") else None)
    page.js_errors = errors
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def stack(start_gateway, start_consumer, services):
    """The gateway over HTTP, and one consumer that stays up (no idle exit) until the test ends."""
    gateway = start_gateway()
    gateway.events = lambda external_id: [(e.type, e.data.get("status")) for e in services.events.read_after(
        external_id, "0-0", count=10_000) if e.type in ("status", "outline", "section.started", "done")]
    consumer = start_consumer(fake_tokens_per_s=TOKENS_PER_S, budget_s=100, consumer_idle_exit_ms=0)
    try:
        yield gateway
    finally:
        consumer.consumer.shut_down()
        consumer.join(30)


def api_get(gateway, path: str) -> dict:
    response = httpx.get(f"{gateway.base_url}{path}", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def norm(text: str) -> str:
    return " ".join(text.split())


def enter_key(page, key: str = API_KEY) -> None:
    """Type the key into the form the page shows when it has none, and wait for the dashboard."""
    page.fill("#api-key", key)
    page.click("#key-save")
    wait_js(page, "() => !document.getElementById('dashboard').hidden", what="the page to accept the key")


def create_job(page, title: str, sections: int = 2) -> str:
    page.fill("#title", title)
    page.fill("#brief", "Explain to operators how a job survives pauses, reloads and crashes.")
    page.fill("#sections", str(sections))
    page.click("#create-btn")
    wait_js(page, "() => location.hash.length > 1 && !document.getElementById('job').hidden",
            what="the page to open the new job")
    external_id = page.evaluate("() => location.hash.slice(1)")
    assert external_id.startswith("RTQCC-"), external_id
    assert page.text_content("#job-id") == external_id
    return external_id


def wait_js(page, predicate: str, arg=None, *, what: str, timeout_ms: int = WAIT_MS) -> None:
    """page.wait_for_function, bounded, failing with what the page shows."""
    try:
        page.wait_for_function(predicate, arg=arg, timeout=timeout_ms)
    except Exception as exc:
        shown = page.evaluate("""() => ({
            status: document.getElementById('job-status').textContent,
            job: location.hash.slice(1),
            error: document.getElementById('error').textContent,
            sections: [...document.querySelectorAll('.sec')].map((el) =>
                `${el.dataset.index}${el.dataset.done === '1' ? ' done' : ''}: ${el.querySelector('.text').textContent.length} chars`),
            progress: document.getElementById('progress').style.width,
        })""")
        server = "?"
        if shown["job"] and getattr(page, "gateway", None):
            try:
                job = api_get(page.gateway, f"/jobs/{shown['job']}")
                server = {"status": job["status"], "sections": [(x["index"], x["status"]) for x in job["sections"]],
                          "events": page.gateway.events(shown["job"])}
            except Exception as error:  # a diagnosis only
                server = repr(error)
        raise AssertionError(f"timed out after {timeout_ms} ms waiting for {what}; the page shows {shown}; "
                             f"the API says {server}; page errors: {page.js_errors}") from exc


def section_text(page, index: int) -> str:
    return page.evaluate(SECTION_TEXT, index)


def wait_status(page, status: str) -> None:
    wait_js(page, STATUS_IS, status, what=f"status {status!r}")


def wait_text_grows(page, index: int, beyond: int) -> str:
    """Wait (bounded) until section `index` shows more than `beyond` characters."""
    wait_js(page, f"(a) => ({SECTION_TEXT})(a[0]).length > a[1]", [index, beyond],
            what=f"section {index} to show more than {beyond} characters")
    return section_text(page, index)


def check_finished_page(page, gateway, external_id: str, title: str, sections: int) -> None:
    """Each section shows exactly its stored text, rendered, the bar is full, and the download works."""
    assert page.locator(".sec").count() == sections
    for index in range(sections):
        stored = api_get(gateway, f"/jobs/{external_id}/sections/{index}")
        assert stored["status"] == "done"
        wait_js(page, RENDERED, index, what=f"section {index} rendered")
        shown = section_text(page, index)
        assert shown and shown == norm(stored["content"]), f"section {index}: page {shown!r} != stored {stored['content']!r}"
        assert page.locator(f".sec[data-index='{index}'] .t").text_content().startswith(f"{index + 1}. ")
    assert page.locator(".sec.running").count() == 0
    wait_js(page, "() => document.getElementById('progress').style.width === '100%'", what="a full progress bar")
    assert page.get_attribute("#download", "href") == f"/jobs/{external_id}/manuscript?format=markdown"
    manuscript = download(page, "#download", f"{external_id}.md").decode("utf-8")
    assert manuscript.startswith(f"# {title}\n")
    for index in range(sections):
        assert section_text(page, index) in norm(manuscript)
    # The other formats' buttons ask the same route for their format, and each file downloads.
    for fmt, ext, starts in (("html", "html", b"<!doctype html"), ("docx", "docx", b"PK\x03\x04"), ("pdf", "pdf", b"%PDF-")):
        assert page.get_attribute(f"#export-{fmt}", "href") == f"/jobs/{external_id}/manuscript?format={fmt}"
        assert download(page, f"#export-{fmt}", f"{external_id}.{ext}")[:len(starts)].lower() == starts.lower()
    assert page.text_content("#error") == ""
    assert page.js_errors == []


def download(page, selector: str, filename: str) -> bytes:
    """Click an export link and return the file the browser saved, checking its name."""
    link = page.locator(selector)
    assert link.is_visible()
    with page.expect_download() as download_info:
        link.click()
    saved = download_info.value
    assert saved.suggested_filename == filename
    return Path(saved.path()).read_bytes()


def test_create_watch_pause_resume_download(stack, page):
    title = "Jobs That Survive"
    page.gateway = stack
    page.goto(stack.base_url)
    assert page.title() == "RTQCC: live manuscripts"
    enter_key(page)
    external_id = create_job(page, title)

    # The outline arrives, then the first section's text appears while the job runs, and grows.
    wait_js(page, LIVE_TEXT, what="section text appearing while the job runs")
    assert page.locator(".sec").count() == 2
    first = section_text(page, 0)
    wait_text_grows(page, 0, len(first))
    assert page.text_content("#job-status") == "running"

    # Pause in the middle of the second section, once the first is done (the bar half full).
    wait_js(page, "() => document.querySelector(\".sec[data-index='0']\")?.dataset.done === '1'",
            what="the first section to be done")
    wait_text_grows(page, 1, 0)
    wait_js(page, "() => document.getElementById('progress').style.width === '50%'", what="a half-full progress bar")
    if os.environ.get("RTQCC_SCREENSHOT"):
        wait_text_grows(page, 1, 60)
        shot = Path(os.environ["RTQCC_SCREENSHOT"])
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot))
    assert page.is_enabled("#pause") and not page.is_enabled("#resume")
    page.click("#pause")
    wait_status(page, "paused")
    assert page.is_enabled("#resume") and not page.is_enabled("#pause")

    # The consumer stops the provider and keeps the text written so far; the page shows exactly
    # that text, the section is not done, and nothing more arrives.
    stored = None

    def partial_saved():
        nonlocal stored
        stored = api_get(stack, f"/jobs/{external_id}/sections/1")
        return stored["status"] == "pending" and stored.get("partial")

    wait_for(partial_saved, timeout_s=WAIT_MS / 1000, interval_s=0.05, what="the paused run to save its text")
    partial = stored["partial"]
    wait_js(page, f"(a) => ({SECTION_TEXT})(a[0]) === a[1]", [1, norm(partial)], what="exactly the kept text on the page")
    assert page.locator(".sec[data-index='1']").get_attribute("data-done") != "1"
    assert api_get(stack, f"/jobs/{external_id}")["status"] == "paused"
    assert page.text_content("#job-status") == "paused"
    assert section_text(page, 1) == norm(partial)

    # Resume: the section continues after the kept text, and the job completes.
    page.click("#resume")
    wait_text_grows(page, 1, len(norm(partial)))
    assert section_text(page, 1).startswith(norm(partial))
    assert page.text_content("#job-status") == "running"
    wait_status(page, "completed")
    check_finished_page(page, stack, external_id, title, sections=2)


def test_reload_mid_job_replays_the_text(stack, page):
    title = "Reload Me Midway"
    page.gateway = stack
    page.goto(stack.base_url)
    enter_key(page)
    external_id = create_job(page, title)
    wait_js(page, LIVE_TEXT, what="section text appearing while the job runs")
    before = wait_text_grows(page, 0, len(section_text(page, 0)))
    assert page.text_content("#job-status") == "running"

    page.reload()
    # The key outlives a reload of the tab (sessionStorage): the page does not ask again.
    assert page.is_hidden("#key-card")
    assert page.evaluate("() => location.hash.slice(1)") == external_id
    # A fresh page: everything shown now came from the replay of the job's event stream.
    wait_js(page, f"(a) => ({SECTION_TEXT})(a[0]).startsWith(a[1])", [0, before],
            what="the text written before the reload to re-appear")
    assert page.text_content("#job-id") == external_id
    assert page.text_content("#job-title") == title
    assert page.locator(".sec").count() == 2
    # The page then follows the live job to its end, without repeating any text.
    wait_status(page, "completed")
    check_finished_page(page, stack, external_id, title, sections=2)
    assert page.locator("#jobs li").count() >= 1


def test_resumed_section_keeps_its_text_by_code_point(start_gateway, page):
    """`resumed_chars` is a count of code points (Python's len): text beyond the BMP (emoji) must
    be kept whole when a resumed section cuts the page's text back to what the server kept."""
    gateway = start_gateway()
    page.goto(gateway.base_url)
    shown = page.evaluate("""() => {
        handlers["section.started"]({index: 0, title: "Kept", resumed_chars: 0});
        handlers["section.delta"]({index: 0, text: "a\\u{1F600}b"});
        handlers["section.delta"]({index: 0, text: " lost"});
        handlers["section.started"]({index: 0, title: "Kept", resumed_chars: 3});
        handlers["section.delta"]({index: 0, text: "c"});
        return document.querySelector(".sec[data-index='0'] .text").textContent;
    }""")
    assert shown == "a\U0001F600bc"
    assert page.js_errors == []


def test_the_page_asks_for_the_key_keeps_it_for_the_tab_only_and_says_when_it_is_refused(start_gateway, page):
    gateway = start_gateway()
    page.goto(gateway.base_url)
    assert API_KEY not in page.content()
    assert page.is_visible("#key-card") and page.is_hidden("#create-card")

    page.fill("#api-key", "not-the-key")
    page.click("#key-save")
    wait_js(page, "() => document.getElementById('key-error').textContent.includes('refused')",
            what="the page to say the key was refused")
    assert "401" in page.text_content("#key-error")
    assert page.is_visible("#key-card") and page.is_hidden("#create-card")
    assert page.evaluate("() => sessionStorage.length + localStorage.length") == 0, "a refused key was kept"
    # The browser reports the refused request itself; nothing else went wrong on the page.
    assert all("401" in error for error in page.js_errors), page.js_errors
    page.js_errors.clear()

    enter_key(page)
    assert page.evaluate("() => sessionStorage.getItem('rtqcc-api-key')") == API_KEY
    assert page.evaluate("() => localStorage.length") == 0, "the key must not outlive the tab"
    assert page.input_value("#api-key") == ""
    external_id = create_job(page, "Asked Once", sections=1)
    assert external_id.startswith("RTQCC-")
    assert page.text_content("#error") == ""
    assert page.js_errors == []
