"""The workbench page in a real headless Chromium (the fixtures and helpers of test_browser.py):
the jobs dashboard following jobs live, failed jobs with their reason and a retry, bulk cancel;
the outline review; regenerating, editing, diffing and restoring a section; HTML from a model or
a person shown as text and never run; a phone-sized screen and the keyboard; why a job waits
(its place in line, the provider's limits).

Set RTQCC_SCREENSHOTS=docs to also save docs/dashboard.png and docs/job-view.png."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from conftest import API_KEY, wait_for
from test_browser import (LIVE_TEXT, RENDERED, SECTION_TEXT, TOKENS_PER_S, WAIT_MS, api_get, browser,  # noqa: F401
                          enter_key, norm, page, section_text, stack, wait_js, wait_status)
from test_hardening import BrokenProvider

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server, enforcing limits

ROW = "document.querySelector(`li.job[data-id='${a[0]}']`)"
ROW_STATUS = f"(a) => {ROW}?.dataset.status === a[1]"
SHORT = {"max_tokens_per_section": 60}  # a few seconds a section at the test provider's pace
WAIT_SAYS = "(text) => document.getElementById('job-wait').textContent === text"
WAIT_SAYS_NOTHING = "() => document.getElementById('job-wait').textContent === ''"


def api(gateway, method: str, path: str, body: dict | None = None, **headers: str) -> httpx.Response:
    response = httpx.request(method, f"{gateway.base_url}{path}", json=body, timeout=10,
                             headers={"Authorization": f"Bearer {API_KEY}", **headers})
    assert response.status_code < 400, response.text
    return response


def start_job(gateway, title: str, outline: list[str], params: dict | None = None) -> str:
    body = {"title": title, "brief": "How durable jobs keep going.",
            "outline": [{"title": t, "brief": f"About {t.lower()}."} for t in outline]}
    if params:
        body["params"] = params
    external_id = api(gateway, "POST", "/jobs", body).json()["externalId"]
    api(gateway, "POST", f"/jobs/{external_id}/start")
    return external_id


def wait_job(gateway, external_id: str, status: str) -> dict:
    job: dict = {}

    def reached() -> bool:
        nonlocal job
        job = api_get(gateway, f"/jobs/{external_id}")
        return job["status"] == status

    wait_for(reached, timeout_s=WAIT_MS / 1000, interval_s=0.1, what=f"job {external_id} {status}")
    return job


def open_job(page, external_id: str) -> None:
    page.evaluate("(id) => { location.hash = id; }", external_id)
    wait_js(page, "(id) => document.getElementById('job-id').textContent === id && !document.getElementById('doc').hidden",
            external_id, what=f"the page to open {external_id}")


def screenshot(page, name: str) -> None:
    if os.environ.get("RTQCC_SCREENSHOTS"):
        shot = Path(os.environ["RTQCC_SCREENSHOTS"]) / name
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=True)


def sec(index: int, selector: str) -> str:
    return f".sec[data-index='{index}'] {selector}"


def test_the_dashboard_follows_jobs_as_they_run_without_a_reload(stack, page):
    page.gateway = stack
    page.goto(stack.base_url)
    enter_key(page)
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloaded
    done = start_job(stack, "Finished Before", ["Only"], SHORT)
    wait_job(stack, done, "completed")

    external_id = start_job(stack, "Appears By Itself", ["First part", "Second part"])
    wait_js(page, f"(a) => !!{ROW}", [external_id], what="the new job's row")
    wait_js(page, ROW_STATUS, [external_id, "running"], what="the row to say running")
    wait_js(page, f"(a) => {ROW}.querySelector('.job-figures').textContent.startsWith('1/2 sections')",
            [external_id], what="the row to count the first section done")
    screenshot(page, "dashboard.png")
    wait_js(page, ROW_STATUS, [external_id, "completed"], what="the row to say completed")
    wait_js(page, f"(a) => {ROW}.querySelector('.job-figures').textContent.startsWith('2/2 sections')",
            [external_id], what="the row to count both sections done")
    listed = api_get(stack, f"/jobs/{external_id}")
    figures = page.text_content(f"li.job[data-id='{external_id}'] .job-figures")
    assert f"{listed['usage']['total_tokens']} tokens" in figures and listed["usage"]["total_tokens"] > 0
    assert "$" in figures  # the test model has a price
    assert page.get_attribute(f"li.job[data-id='{external_id}'] .bar > div", "style") == "width: 100%;"
    # The row opens the job.
    page.click(f"li.job[data-id='{external_id}'] .job-title")
    wait_js(page, "(id) => document.getElementById('job-id').textContent === id", external_id, what="the job view")
    assert page.evaluate("() => window.sameDocument") is True
    assert page.js_errors == []


def test_older_jobs_are_shown_a_page_at_a_time_and_stay_in_view(stack, page):
    created = [api(stack, "POST", "/jobs", {"title": f"Batch report {n}", "brief": "One of many."}).json()["externalId"]
               for n in range(30)]
    page.gateway = stack
    page.goto(stack.base_url)
    enter_key(page)
    rows = "() => [...document.querySelectorAll('li.job')].map((row) => row.dataset.id)"
    wait_js(page, f"() => ({rows})().length === 25", what="the newest 25 jobs")
    assert page.evaluate(rows) == created[::-1][:25]
    assert page.is_visible("#jobs-older")
    page.click("#jobs-older")
    wait_js(page, f"() => ({rows})().length === 30", what="the older jobs")
    assert page.evaluate(rows) == created[::-1]
    assert not page.is_visible("#jobs-older")  # nothing older left
    # Two more fetches of the list begun: the first of them has been drawn (they run one at a time).
    page.evaluate("""() => { window.listFetches = 0; const fetched = window.fetch;
        window.fetch = (...args) => { if (String(args[0]).includes('/jobs?')) window.listFetches++; return fetched(...args); }; }""")
    wait_js(page, "() => window.listFetches >= 2", what="the list to be refreshed")
    assert page.evaluate(rows) == created[::-1]  # the older ones stay
    assert page.js_errors == []


def test_failed_jobs_show_their_reason_and_retry_and_several_cancel_at_once(start_gateway, make_services,
                                                                            run_consumer, page):
    gateway = start_gateway()
    failing = start_job(gateway, "Keeps Failing", ["One"])
    broken = make_services(provider=BrokenProvider(), consumer_max_deliveries=3, lease_ttl_s=0.3,
                           consumer_idle_exit_ms=0)
    assert run_consumer(services=broken, budget_s=4).failed == 1
    queued = [start_job(gateway, f"Waiting {n}", ["One"]) for n in range(3)]  # no consumer: they wait

    page.goto(gateway.base_url)
    enter_key(page)
    wait_js(page, "() => document.querySelectorAll('li.job').length === 4", what="four rows")
    failed_row = f"li.job[data-id='{failing}']"
    assert page.get_attribute(failed_row, "data-status") == "failed"
    assert "Failed: Gave up after 3 failed runs" in page.text_content(f"{failed_row} .job-reason")
    assert page.is_visible(f"{failed_row} .job-retry") and page.is_disabled(f"{failed_row} .pick")

    page.select_option("#status-filter", "failed")
    wait_js(page, "(id) => [...document.querySelectorAll('li.job')].map((r) => r.dataset.id).join() === id",
            failing, what="only the failed job listed")
    page.select_option("#status-filter", "queued")
    wait_js(page, "() => [...document.querySelectorAll('li.job')].every((r) => r.dataset.status === 'queued')"
                  " && document.querySelectorAll('li.job').length === 3", what="only the queued jobs listed")
    page.select_option("#status-filter", "")
    wait_js(page, "() => document.querySelectorAll('li.job').length === 4", what="every job listed again")

    assert page.is_disabled("#bulk-cancel")
    for external_id in queued[:2]:
        page.check(f"li.job[data-id='{external_id}'] .pick")
    assert page.text_content("#bulk-cancel") == "Cancel 2 selected"
    page.click("#bulk-cancel")
    for external_id in queued[:2]:
        wait_js(page, ROW_STATUS, [external_id, "cancelled"], what=f"{external_id} cancelled")
        assert api_get(gateway, f"/jobs/{external_id}")["status"] == "cancelled"
    assert page.text_content("#bulk-note") == "2 cancelled."
    assert api_get(gateway, f"/jobs/{queued[2]}")["status"] == "queued"

    page.click(f"{failed_row} .job-retry")
    wait_js(page, ROW_STATUS, [failing, "queued"], what="the retried job queued again")
    assert page.text_content(f"{failed_row} .job-reason") == ""
    assert api_get(gateway, f"/jobs/{failing}")["status"] == "queued"
    assert page.js_errors == []


def test_an_outline_is_reviewed_edited_and_approved_then_written(stack, page):
    page.gateway = stack
    page.goto(stack.base_url)
    enter_key(page)
    page.fill("#title", "Reviewed First")
    page.fill("#sections", "2")
    page.check("#review")
    page.click("#create-btn")
    wait_status(page, "awaiting_review")
    wait_js(page, "() => !document.getElementById('outline-form').hidden"
                  " && document.querySelectorAll('#outline-items li').length === 2", what="the outline form")
    external_id = page.evaluate("() => location.hash.slice(1)")
    assert page.is_hidden("#sections-list")
    drafted = page.input_value("#outline-items li:nth-child(2) .o-title")
    assert drafted

    page.fill("#outline-items li:nth-child(1) .o-title", "Why Jobs Fail, Revised")
    page.fill("#outline-items li:nth-child(1) .o-brief", "Crashes, timeouts and lost leases.")
    page.click("#outline-add")
    page.fill("#outline-items li:nth-child(3) .o-title", "A Short Coda")
    page.fill("#outline-items li:nth-child(3) .o-brief", "What to remember.")
    page.press("#outline-items li:nth-child(3) .o-title", "Enter")  # Enter saves the outline
    wait_js(page, "() => document.getElementById('outline-note').textContent === 'Outline saved.'",
            what="the outline saved")
    saved = api_get(stack, f"/jobs/{external_id}")
    assert saved["status"] == "awaiting_review"
    assert [s["title"] for s in saved["sections"]] == ["Why Jobs Fail, Revised", drafted, "A Short Coda"]
    assert api_get(stack, f"/jobs/{external_id}/sections/0")["brief"] == "Crashes, timeouts and lost leases."

    page.fill("#outline-items li:nth-child(2) .o-title", "The Middle, Approved")
    page.click("#approve")  # saves the edit it was not told to save, then approves
    wait_js(page, "() => document.getElementById('outline-form').hidden", what="the outline form to close")
    wait_status(page, "completed")
    for index, title in enumerate(["Why Jobs Fail, Revised", "The Middle, Approved", "A Short Coda"]):
        assert page.text_content(sec(index, ".t")) == f"{index + 1}. {title}"
        wait_js(page, RENDERED, index, what=f"section {index} rendered")
        assert section_text(page, index) == norm(api_get(stack, f"/jobs/{external_id}/sections/{index}")["content"])
    assert page.js_errors == []


def test_a_section_is_regenerated_edited_compared_and_restored(stack, page):
    page.gateway = stack
    external_id = start_job(stack, "Revised By Hand", ["Opening", "Closing"], SHORT)
    page.goto(stack.base_url)
    enter_key(page)
    open_job(page, external_id)
    wait_status(page, "completed")
    wait_js(page, RENDERED, 0, what="section 0 rendered")
    first = api_get(stack, f"/jobs/{external_id}/sections/0")["content"]
    assert section_text(page, 0) == norm(first)

    # Regenerate with instructions: the job runs again and the new version shows.
    page.click(sec(0, ".b-regen"))
    page.fill(sec(0, ".instructions"), "Open with a storm at sea.")
    page.click(sec(0, ".regen button[type=submit]"))
    wait_for(lambda: api_get(stack, f"/jobs/{external_id}/sections/0")["version"] == 2, timeout_s=WAIT_MS / 1000,
             interval_s=0.1, what="version 2 of section 0")
    wait_status(page, "completed")
    second = api_get(stack, f"/jobs/{external_id}/sections/0")["content"]
    assert second != first
    wait_js(page, f"(a) => ({RENDERED})(a[0]) && ({SECTION_TEXT})(a[0]) === a[1]", [0, norm(second)],
            what="the regenerated text rendered")
    versions = api_get(stack, f"/jobs/{external_id}/sections/0/versions")["versions"]
    assert versions[-1]["made_with"].get("instructions") == "Open with a storm at sea."

    # Edit: the person's markdown is rendered.
    page.click(sec(0, ".b-edit"))
    wait_js(page, "(a) => document.querySelector(a[0]).value === a[1]", [sec(0, ".content"), second],
            what="the editor to hold the current text")
    page.fill(sec(0, ".content"), "## Written By Hand\n\nA *person* wrote this line.")
    page.click(sec(0, ".edit button[type=submit]"))
    wait_js(page, "(s) => document.querySelector(s)?.textContent === 'Written By Hand'", sec(0, ".text h2"),
            what="the edited heading rendered")
    assert page.text_content(sec(0, ".text em")) == "person"
    assert section_text(page, 0) == "Written By Hand A person wrote this line."
    assert page.is_hidden(sec(0, ".edit"))
    assert "v3" in page.text_content(sec(0, ".u"))

    # An edit against a version someone else replaced is refused with a clear message.
    page.click(sec(0, ".b-edit"))
    wait_js(page, "(s) => document.querySelector(s).value.startsWith('## Written')", sec(0, ".content"),
            what="the editor to hold version 3")
    api(stack, "PUT", f"/jobs/{external_id}/sections/0", {"content": "Changed elsewhere meanwhile."},
        **{"If-Match": '"v3"'})
    page.fill(sec(0, ".content"), "My late edit.")
    page.click(sec(0, ".edit button[type=submit]"))
    wait_js(page, "(s) => document.querySelector(s).textContent.includes('changed meanwhile')", sec(0, ".sec-error"),
            what="the changed-meanwhile message")
    assert api_get(stack, f"/jobs/{external_id}/sections/0")["content"] == "Changed elsewhere meanwhile."
    assert all("412" in error for error in page.js_errors), page.js_errors  # the browser logs the refusal
    page.js_errors.clear()
    page.click(sec(0, ".b-reload"))
    wait_js(page, "(s) => document.querySelector(s).value === 'Changed elsewhere meanwhile.'", sec(0, ".content"),
            what="the reloaded text in the editor")
    assert page.text_content(sec(0, ".sec-error")) == ""

    # Versions: four, a diff of the last two, and a restore of the regenerated one.
    page.click(sec(0, ".b-versions"))
    wait_js(page, "(s) => document.querySelectorAll(s).length === 4", sec(0, ".version-list li"), what="four versions")
    assert "current" in page.text_content(sec(0, ".version-list li[data-version='4']"))
    page.click(sec(0, ".b-diff"))
    wait_js(page, "(s) => document.querySelectorAll(s).length > 0", sec(0, ".diff ins"), what="a diff")
    assert "person" in page.text_content(sec(0, ".diff")) and "elsewhere" in page.eval_on_selector_all(
        sec(0, ".diff ins"), "(els) => els.map((e) => e.textContent).join('')")
    screenshot(page, "job-view.png")
    page.click(sec(0, ".version-list li[data-version='2'] .b-restore"))
    wait_js(page, f"(a) => ({SECTION_TEXT})(a[0]) === a[1]", [0, norm(second)], what="the restored version shown")
    restored = api_get(stack, f"/jobs/{external_id}/sections/0")
    assert (restored["version"], restored["content"]) == (5, second)
    wait_js(page, "(s) => document.querySelectorAll(s).length === 5", sec(0, ".version-list li"), what="five versions")

    # Lock and unlock.
    page.click(sec(0, ".b-lock"))
    wait_js(page, "(s) => document.querySelector(s).textContent === 'Unlock'", sec(0, ".b-lock"), what="locked")
    assert api_get(stack, f"/jobs/{external_id}/sections/0")["locked"] is True
    assert "locked" in page.text_content(sec(0, ".u"))
    page.click(sec(0, ".b-lock"))
    wait_js(page, "(s) => document.querySelector(s).textContent === 'Lock'", sec(0, ".b-lock"), what="unlocked")
    assert api_get(stack, f"/jobs/{external_id}/sections/0")["locked"] is False
    assert page.js_errors == []


HOSTILE_TITLE = "<img src=x onerror=\"window.pwned='title'\"><script>window.pwned='title script'</script>Plain?"
HOSTILE_SECTION = "<b onmouseover=\"alert('section title')\">Bold?</b><script>alert('t')</script>"
HOSTILE_TEXT = """<script>window.pwned = 'script'; alert('script')</script>

<img src=x onerror="window.pwned = 'img'; alert('img')">

<iframe src="javascript:alert('frame')"></iframe>

[a javascript link](javascript:alert('link')) and [a data link](data:text/html,<script>alert(1)</script>)
and [a safe link](https://example.org/page) and **bold** markdown.

<a href="https://example.org" onclick="alert('a')">raw anchor</a>
"""


def test_html_in_titles_and_sections_is_shown_as_text_and_never_runs(stack, page):
    page.gateway = stack
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    body = {"title": HOSTILE_TITLE, "brief": "<script>alert('brief')</script>",
            "outline": [{"title": HOSTILE_SECTION, "brief": "x"}], "params": SHORT}
    external_id = api(stack, "POST", "/jobs", body).json()["externalId"]
    api(stack, "POST", f"/jobs/{external_id}/start")
    wait_job(stack, external_id, "completed")
    etag = api(stack, "GET", f"/jobs/{external_id}/sections/0").headers["ETag"]
    api(stack, "PUT", f"/jobs/{external_id}/sections/0", {"content": HOSTILE_TEXT}, **{"If-Match": etag})

    page.goto(stack.base_url)
    enter_key(page)
    row = f"li.job[data-id='{external_id}']"
    wait_js(page, "(s) => !!document.querySelector(s)", row, what="the job's row")
    assert page.text_content(f"{row} .job-title") == HOSTILE_TITLE
    open_job(page, external_id)
    wait_js(page, RENDERED, 0, what="the section rendered")
    assert page.text_content("#job-title") == HOSTILE_TITLE
    assert page.text_content(sec(0, ".t")) == f"1. {HOSTILE_SECTION}"
    shown = page.text_content(sec(0, ".text"))
    for literal in ("<script>window.pwned = 'script'", "<img src=x onerror=", "<iframe src=",
                    "[a javascript link](javascript:alert('link'))", "<a href=\"https://example.org\" onclick="):
        assert literal in shown, literal
    # Nothing the texts held became an element: only markdown's own (p, strong, one safe link).
    made = page.eval_on_selector_all("#jobs *, #doc *", "(els) => els.map((e) => e.tagName.toLowerCase())")
    for tag in ("script", "img", "iframe", "b"):
        assert tag not in made, tag
    links = page.eval_on_selector_all(sec(0, ".text a"), "(els) => els.map((e) => [e.getAttribute('href'), e.rel])")
    assert links == [["https://example.org/page", "noopener noreferrer nofollow"]]
    assert page.text_content(sec(0, ".text strong")) == "bold"
    page.hover(sec(0, ".t"))
    assert page.evaluate("() => window.pwned") is None
    assert dialogs == []
    assert page.js_errors == []


def test_a_phone_sized_screen_scrolls_only_down_and_the_keyboard_drives_the_page(stack, browser):
    context = browser.new_context(viewport={"width": 390, "height": 844}, accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    no_sideways = "() => document.documentElement.scrollWidth <= window.innerWidth"
    inside = """(sel) => [...document.querySelectorAll(sel)].filter((el) => el.offsetParent !== null).every((el) => {
        const box = el.getBoundingClientRect(); return box.left >= 0 && box.right <= window.innerWidth; })"""
    try:
        page.goto(stack.base_url)
        page.focus("#api-key")
        page.keyboard.type(API_KEY)
        page.keyboard.press("Enter")
        wait_js(page, "() => !document.getElementById('dashboard').hidden", what="the dashboard")
        assert page.evaluate(no_sideways)
        assert page.evaluate(inside, "#dashboard button, #dashboard input, #dashboard select, #dashboard textarea")

        # The form by keyboard alone: Tab to the button, focus visible on it, Enter creates.
        page.fill("#title", "Small Screen")
        page.fill("#sections", "2")
        page.focus("#sections")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("() => document.activeElement.id") == "create-btn"
        assert page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle") == "solid"
        page.keyboard.press("Enter")
        wait_js(page, "() => location.hash.length > 1 && !document.getElementById('doc').hidden", what="the job view")
        wait_js(page, STATUS_COMPLETED, what="the job completed")
        wait_js(page, RENDERED, 1, what="the last section rendered")
        assert page.evaluate(no_sideways)
        assert page.evaluate(inside, "#doc button, #doc a.button, #doc .text")
        page.click(sec(0, ".b-versions"))
        wait_js(page, "(s) => document.querySelectorAll(s).length === 1", sec(0, ".version-list li"), what="versions")
        assert page.evaluate(no_sideways)
        page.click("#back")
        wait_js(page, "() => !document.getElementById('dashboard').hidden", what="back on the dashboard")
        assert page.evaluate(no_sideways)
        assert errors == []
    finally:
        context.close()


STATUS_COMPLETED = "() => document.getElementById('job-status').textContent === 'completed'"


def test_a_queued_job_shows_its_place_in_line_until_it_runs(start_gateway, make_services, start_consumer, page):
    gateway = start_gateway(services_override=make_services(max_running_per_tenant=1))
    with start_consumer(fake_tokens_per_s=TOKENS_PER_S, budget_s=100, consumer_idle_exit_ms=0,
                        max_running_per_tenant=1):
        first = start_job(gateway, "Holds The Slot", ["Long"], {"max_tokens_per_section": 4000})
        wait_job(gateway, first, "running")
        second = start_job(gateway, "Waits Its Turn", ["Short"], SHORT)
        page.goto(gateway.base_url)
        enter_key(page)
        open_job(page, second)
        wait_js(page, WAIT_SAYS, "Next to start: 1 of your jobs running, at most 1 at once.",
                what="the job's place in line")
        assert page.text_content("#job-status") == "queued"

        api(gateway, "POST", f"/jobs/{first}/cancel")  # its slot frees, and the second job takes it
        wait_status(page, "completed")
        wait_js(page, WAIT_SAYS_NOTHING, what="no wait shown once it ran")
        assert page.js_errors == []


def test_a_running_job_shows_the_call_held_back_by_the_providers_limits(start_gateway, make_openai_services,
                                                                         start_consumer, page):
    gateway = start_gateway()
    external_id = start_job(gateway, "Held Back", ["First part", "Second part"], {"max_tokens_per_section": 20})
    page.goto(gateway.base_url)
    enter_key(page)
    open_job(page, external_id)
    # 10 requests a minute: the first call goes at once, the second waits 6 s for its turn.
    limited = make_openai_services(RTQCC_PROVIDER_LIMITS="gpt-4o-mini=10/")
    with start_consumer(name="limited", budget_s=60, services=limited):
        wait_js(page, "() => /^“Second part” waits about \\d+ s: the provider's requests per minute are spent "
                      "for now \\(gpt-4o-mini\\)\\.$/.test(document.getElementById('job-wait').textContent)",
                what="the held-back call and why")
        wait_status(page, "completed")
        wait_js(page, WAIT_SAYS_NOTHING, what="no wait shown once the job completed")
        assert page.js_errors == []


def test_the_page_says_when_the_stack_is_away_and_when_its_stream_reconnects(services, start_consumer, page):
    from rtqcc_emulator.gateway import GatewayConfig, build_gateway
    from rtqcc_emulator.server import ServerThread, build_http_app

    gateway = build_gateway(services, GatewayConfig())
    servers = [ServerThread(build_http_app(gateway, services.settings), port=0).start()]
    port = servers[0].port

    def restart() -> None:  # the same gateway again on the same port, as after a restart of `rtqcc up`
        servers.append(ServerThread(build_http_app(gateway, services.settings), port=port).start())

    banner = "(text) => !document.getElementById('banner').hidden && document.getElementById('banner').textContent.includes(text)"
    no_banner = "() => document.getElementById('banner').hidden"
    consumer = start_consumer(fake_tokens_per_s=TOKENS_PER_S, budget_s=100, consumer_idle_exit_ms=0)
    try:
        page.goto(servers[0].base_url)
        enter_key(page)
        external_id = start_job(servers[0], "Through A Restart", ["Before", "After"])
        open_job(page, external_id)
        wait_js(page, LIVE_TEXT, what="text arriving")

        servers[0].stop()
        wait_js(page, banner, "reconnecting", what="the reconnecting banner")
        restart()
        wait_js(page, no_banner, what="the banner gone once the stream is back")
        wait_status(page, "completed")
        for index in range(2):  # resumed where it stopped: nothing lost, nothing twice
            wait_js(page, RENDERED, index, what=f"section {index} rendered")
            stored = api_get(servers[-1], f"/jobs/{external_id}/sections/{index}")["content"]
            assert section_text(page, index) == norm(stored)

        page.click("#back")
        wait_js(page, "() => !document.getElementById('dashboard').hidden", what="the dashboard")
        servers[-1].stop()
        wait_js(page, banner, "cannot be reached", what="the stack-away banner")
        restart()
        wait_js(page, no_banner, what="the banner gone once the stack is back")
        wait_js(page, "(id) => !!document.querySelector(`li.job[data-id='${id}']`)", external_id, what="the list back")
        # What the browser logs of the refused connections; nothing else went wrong.
        assert all("net::ERR_" in error for error in page.js_errors), page.js_errors
    finally:
        consumer.consumer.shut_down()
        consumer.join(30)
        for server in servers:
            server.stop()
        gateway.close()
