"use strict";
// The workbench: a jobs dashboard (#) and a job view (#RTQCC-...), over the public HTTP API.
// The API key is asked for once and kept for this tab only (sessionStorage, never localStorage,
// never in the page): the server does not hand it to whoever loads the page.
const KEY_ITEM = "rtqcc-api-key";
localStorage.removeItem(KEY_ITEM);  // where earlier versions of this page kept it
let apiKey = sessionStorage.getItem(KEY_ITEM) || "";
const $ = (id) => document.getElementById(id);
const TERMINAL = ["completed", "failed", "cancelled"];
const AT_REST = ["completed", "paused", "failed", "cancelled"];  // where sections may be edited
const JOBS_POLL_MS = 2000;     // the dashboard's refresh while it is shown
const READY_POLL_MS = 2000;    // how often the page looks for the stack once it is away
const QUIET_RECONNECT_MS = 1500;  // a stream back within this is not worth a banner
const WAIT_POLL_MS = 2000;     // how often a queued or running job's view asks why it waits
const JOBS_PAGE = 25;           // jobs shown at first, and more each time older ones are asked for
const API_PAGE_MAX = 100;       // the most GET /jobs answers at once
const state = {
  id: null, source: null, lastEventId: null, sections: new Map(), raw: new Map(), status: null,
  statusChanges: 0, outlineDirty: false, waitTimer: null,
};

// Thrown when there is no key or the server refused it; the key form already says so.
class KeyNeeded extends Error {}
// Thrown when the server cannot be reached or says a service is away; the banner says so.
class StackAway extends Error {}
class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

// ---- banners: the stack away, a stream reconnecting -------------------------------------------

const banners = new Map();
function showBanner(kind, text) { banners.set(kind, text); drawBanner(); }
function clearBanner(kind) { if (banners.delete(kind)) drawBanner(); }
function drawBanner() {
  const [kind, text] = [...banners.entries()][0] || [];
  $("banner").hidden = !kind;
  $("banner").className = kind || "";
  $("banner").textContent = text || "";
}

let readyTimer = null;
function stackAway() {
  showBanner("away", "The RTQCC server cannot be reached or is not ready (Redis, Postgres or S3 away). " +
                     "Retrying; the page carries on when it is back.");
  if (!readyTimer) readyTimer = setTimeout(checkReady, READY_POLL_MS);
}
async function checkReady() {
  readyTimer = null;
  let ready = false;
  try { ready = (await fetch("/readyz", { cache: "no-store" })).ok; } catch { /* still away */ }
  if (!ready) { readyTimer = setTimeout(checkReady, READY_POLL_MS); return; }
  clearBanner("away");
  refresh();
}

// ---- the API -----------------------------------------------------------------------------------

function askForKey(message) {
  closeStream();
  stopPolling();
  $("key-card").hidden = false;
  $("dashboard").hidden = true;
  $("doc").hidden = true;
  $("key-error").textContent = message || "";
  $("api-key").focus();
}

async function request(method, path, { body, headers = {}, blob = false } = {}) {
  if (!apiKey) {
    askForKey();
    throw new KeyNeeded("Enter your API key first.");
  }
  let response;
  try {
    response = await fetch(path, {
      method, body: body === undefined ? undefined : JSON.stringify(body),
      headers: { "Authorization": `Bearer ${apiKey}`, "Content-Type": "application/json", ...headers },
      // A large export is a redirect to S3, which this page's CSP cannot fetch: say so instead.
      redirect: blob ? "manual" : "follow",
    });
  } catch {
    stackAway();
    throw new StackAway("The server cannot be reached.");
  }
  if (response.type === "opaqueredirect") {
    throw new Error("This file is too large to download from the page: use `rtqcc jobs export`.");
  }
  if (response.status === 502 || response.status === 503) stackAway();
  else clearBanner("away");
  if (blob && response.ok) return { data: await response.blob(), response };
  // A JSON answer may come without a Content-Type (API Gateway then implies application/json).
  const type = response.headers.get("Content-Type") || "application/json";
  const text = await response.text();
  let data = text;
  if (type.includes("json") && text) { try { data = JSON.parse(text); } catch { /* keep the text */ } }
  if (response.status === 401) {
    apiKey = "";
    sessionStorage.removeItem(KEY_ITEM);
    askForKey("That API key was refused (401 Unauthorized). Enter the key `rtqcc up` printed, " +
              "or one made with `rtqcc keys create`.");
    throw new KeyNeeded(data?.error?.message || "401");
  }
  if (!response.ok) throw new HttpError(response.status, data?.error?.message || `${response.status} ${response.statusText}`);
  return { data, response };
}

const api = async (method, path, body) => (await request(method, path, { body })).data;

function showError(err, slot) {
  if (err instanceof KeyNeeded || err instanceof StackAway) return;
  const where = slot || (showingJob() ? $("job-error") : $("error"));
  where.textContent = err.message;
}

function say(slot, text) { slot.textContent = text; }

// ---- views: the dashboard (#) and a job (#RTQCC-...) -----------------------------------------

const showingJob = () => !$("doc").hidden;
const showingDashboard = () => !$("dashboard").hidden;

function route() {
  const id = decodeURIComponent(location.hash.slice(1));
  $("key-card").hidden = true;
  if (id.startsWith("RTQCC-")) {
    stopPolling();
    $("dashboard").hidden = true;
    $("doc").hidden = false;
    if (state.id !== id || !state.source) watch(id).catch((err) => showError(err));
  } else {
    closeStream();
    $("doc").hidden = true;
    $("dashboard").hidden = false;
    pollJobs();
  }
}

function openJob(id) {
  if (location.hash.slice(1) === id) route(); else location.hash = id;
}

// After the stack came back: pick up where the view was.
function refresh() {
  if (!apiKey || !$("key-card").hidden) return;
  if (showingJob() && state.id) watch(state.id).catch((err) => showError(err));
  else if (showingDashboard()) pollJobs();
}

// ---- the dashboard -------------------------------------------------------------------------------

const dash = { timer: null, loading: false, again: false, rows: new Map(), selected: new Set(), shown: JOBS_PAGE };

function stopPolling() { clearTimeout(dash.timer); dash.timer = null; }

// One poll at a time, one timer at most: the dashboard asks again JOBS_POLL_MS after an answer.
async function pollJobs() {
  stopPolling();
  if (dash.loading) { dash.again = true; return; }
  dash.loading = true;
  try {
    await loadJobs();
  } catch (err) {
    showError(err, $("error"));
    if (err instanceof KeyNeeded) return;
  } finally {
    dash.loading = false;
  }
  if (dash.again) { dash.again = false; pollJobs(); return; }
  if (showingDashboard() && !document.hidden) dash.timer = setTimeout(pollJobs, JOBS_POLL_MS);
}

async function loadJobs() {
  // The newest `dash.shown` jobs, a page of the API at a time: a batch of hundreds stays in view.
  const status = $("status-filter").value;
  const jobs = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: Math.min(API_PAGE_MAX, dash.shown - jobs.length) });
    if (status) query.set("status", status);
    if (cursor) query.set("cursor", cursor);
    const page = await api("GET", `/jobs?${query}`);
    jobs.push(...page.jobs);
    cursor = page.next_cursor;
  } while (cursor && jobs.length < dash.shown);
  $("jobs-older").hidden = !cursor;
  drawJobs(jobs);
}

function money(cost) {
  return cost === null || cost === undefined ? "cost unknown" : `$${cost.toFixed(cost < 0.01 ? 4 : 2)}`;
}

function jobReason(job) {
  const reason = job.error || job.status_reason;
  if (!reason) return "";
  return job.status === "failed" ? `Failed: ${reason}` : `Reason: ${reason}`;
}

function drawJobs(jobs) {
  const seen = new Set(jobs.map((job) => job.externalId));
  for (const [id, row] of dash.rows) if (!seen.has(id)) { row.remove(); dash.rows.delete(id); }
  for (const id of [...dash.selected]) if (!seen.has(id)) dash.selected.delete(id);
  jobs.forEach((job, position) => {
    const row = dash.rows.get(job.externalId) || newJobRow(job.externalId);
    // Moved only when out of place, so a focused checkbox or button keeps its focus.
    if ($("jobs").children[position] !== row) $("jobs").insertBefore(row, $("jobs").children[position] || null);
    drawJob(row, job);
  });
  $("jobs-empty").hidden = jobs.length > 0;
  drawSelection();
}

function newJobRow(id) {
  const row = $("job-row").content.firstElementChild.cloneNode(true);
  row.dataset.id = id;
  row.querySelector(".job-title").href = `#${id}`;
  row.querySelector(".pick").onchange = (e) => {
    if (e.target.checked) dash.selected.add(id); else dash.selected.delete(id);
    drawSelection();
  };
  row.querySelector(".job-retry").onclick = async () => {
    try {
      await api("POST", `/jobs/${id}/retry`);
      pollJobs();
    } catch (err) { showError(err, row.querySelector(".job-reason")); }
  };
  dash.rows.set(id, row);
  return row;
}

function drawJob(row, job) {
  const { sections_done: done, sections_total: total } = job.progress;
  row.dataset.status = job.status;
  row.querySelector(".job-title").textContent = job.title;
  const pill = row.querySelector(".status");
  pill.textContent = job.status;
  pill.className = `status ${job.status}`;
  row.querySelector(".job-figures").textContent =
    `${done}/${total} sections · ${job.usage.total_tokens} tokens · ${money(job.usage.cost_usd)}`;
  row.querySelector(".bar > div").style.width = total ? `${(100 * done) / total}%` : "0";
  row.querySelector(".job-reason").textContent = jobReason(job);
  row.querySelector(".job-retry").hidden = job.status !== "failed";
  row.querySelector(".job-retry").setAttribute("aria-label", `Retry ${job.title}`);
  const pick = row.querySelector(".pick");
  pick.setAttribute("aria-label", `Select ${job.title}`);
  pick.disabled = TERMINAL.includes(job.status);
  if (pick.disabled) dash.selected.delete(job.externalId);
  pick.checked = dash.selected.has(job.externalId);
}

function drawSelection() {
  const open = [...dash.rows.values()].filter((row) => !row.querySelector(".pick").disabled);
  $("bulk-cancel").disabled = dash.selected.size === 0;
  $("bulk-cancel").textContent = dash.selected.size ? `Cancel ${dash.selected.size} selected` : "Cancel selected";
  $("select-all").checked = open.length > 0 && open.every((row) => dash.selected.has(row.dataset.id));
}

$("select-all").onchange = (e) => {
  for (const row of dash.rows.values()) {
    if (row.querySelector(".pick").disabled) continue;
    if (e.target.checked) dash.selected.add(row.dataset.id); else dash.selected.delete(row.dataset.id);
    row.querySelector(".pick").checked = e.target.checked;
  }
  drawSelection();
};

$("bulk-cancel").onclick = async () => {
  const ids = [...dash.selected];
  say($("bulk-note"), `Cancelling ${ids.length}…`);
  const results = await Promise.allSettled(ids.map((id) => api("POST", `/jobs/${id}/cancel`)));
  const failed = results.filter((r) => r.status === "rejected");
  dash.selected.clear();
  say($("bulk-note"), `${ids.length - failed.length} cancelled` +
      (failed.length ? `; ${failed.length} could not be: ${failed[0].reason.message}` : "."));
  pollJobs();
};

$("status-filter").onchange = () => { dash.shown = JOBS_PAGE; pollJobs(); };
$("jobs-older").onclick = () => { dash.shown += JOBS_PAGE; pollJobs(); };
document.addEventListener("visibilitychange", () => { if (!document.hidden && showingDashboard()) pollJobs(); });

$("create").onsubmit = async (e) => {
  e.preventDefault();
  say($("error"), "");
  try {
    const body = { title: $("title").value, brief: $("brief").value, section_count: Number($("sections").value) };
    if ($("review").checked) body.review = { outline: true };
    const created = await api("POST", "/jobs", body);
    await api("POST", `/jobs/${created.externalId}/start`);
    openJob(created.externalId);
  } catch (err) { showError(err, $("error")); }
};

// ---- the job view: its stream ---------------------------------------------------------------------

function closeStream() {
  state.source?.close();
  state.source = null;
  clearTimeout(state.quietTimer);
  state.quietTimer = null;
  clearBanner("stream");
}

async function watch(id) {
  closeStream();
  if (state.id !== id) {
    state.sections.clear();
    state.raw.clear();
    $("sections-list").replaceChildren();
    $("outline-form").hidden = true;
    state.status = null;
    state.lastEventId = "0-0";  // replay the job's whole event stream: text as well as state
  }
  state.id = id;
  $("job").hidden = false;
  $("job-id").textContent = id;
  say($("job-error"), "");
  for (const link of $("exports").querySelectorAll("a")) {
    link.href = `/jobs/${id}/manuscript?format=${link.dataset.format}`;
  }
  const job = await api("GET", `/jobs/${id}`);
  if (state.id !== id) return;
  drawJobMeta(job);
  setStatus(job.status);
  const { token } = await api("POST", `/jobs/${id}/stream-token`);
  if (state.id !== id || !showingJob()) return;
  const url = `/jobs/${id}/stream?access_token=${encodeURIComponent(token)}&lastEventId=${state.lastEventId}`;
  const source = new EventSource(url);
  state.source = source;
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (e) => {
      state.lastEventId = e.lastEventId || state.lastEventId;
      Promise.resolve(handle(JSON.parse(e.data))).catch((err) => showError(err));
    });
  }
  source.onopen = () => { clearTimeout(state.quietTimer); state.quietTimer = null; clearBanner("stream"); };
  source.onerror = () => {
    if (state.source !== source || TERMINAL.includes(state.status)) return;
    // EventSource reconnects by itself with Last-Event-ID; say so if it takes a moment (armed
    // once per drop: its retries may come faster than that moment).
    if (!state.quietTimer) {
      state.quietTimer = setTimeout(() => {
        if (state.source === source) showBanner("stream", "The live stream dropped: reconnecting…");
      }, QUIET_RECONNECT_MS);
    }
    // If it gave up (an expired token, the server away), reopen where we were.
    if (source.readyState === EventSource.CLOSED) {
      showBanner("stream", "The live stream dropped: reconnecting…");
      setTimeout(() => { if (state.source === source) watch(id).catch((err) => showError(err)); }, 1000);
    }
  };
}

// A finished stream (done) is opened again when the job runs again: approved, regenerated, retried.
function follow() {
  if (!state.source || state.source.readyState === EventSource.CLOSED) watch(state.id).catch((err) => showError(err));
}

function drawJobMeta(job) {
  $("job-title").textContent = job.title;
  setUsage(job.usage);
  $("job-reason").textContent = jobReason(job);
  drawWait(job);
  for (const s of job.sections) drawSectionMeta(sectionEl(s.index, s.title), s);
}

function setStatus(status) {
  const entering = status !== state.status;
  state.status = status;
  if (entering) say($("job-wait"), "");  // a queued job's place in line says nothing once it runs
  followWaits();
  state.statusChanges += 1;
  $("job-status").textContent = status;
  $("job-status").className = `status ${status}`;
  $("pause").disabled = !["queued", "running"].includes(status);
  $("resume").disabled = status !== "paused";
  $("cancel").disabled = TERMINAL.includes(status);
  $("retry").hidden = status !== "failed";
  $("exports").hidden = status !== "completed";
  $("job").dataset.rest = AT_REST.includes(status) ? "1" : "0";
  for (const button of $("sections-list").querySelectorAll(".sec-tools button")) button.disabled = !AT_REST.includes(status);
  const reviewing = status === "awaiting_review";
  if (reviewing && entering) loadOutline().catch((err) => showError(err));
  if (!reviewing) $("outline-form").hidden = true;
  $("sections-list").hidden = reviewing;
}

function setProgress() {
  const all = [...state.sections.values()];
  const done = all.filter((el) => el.dataset.done === "1").length;
  $("progress").style.width = all.length ? `${(100 * done) / all.length}%` : "0";
}

function setUsage(usage) {
  if (!usage) return;
  $("job-usage").textContent = `${usage.total_tokens} tokens (${usage.prompt_tokens} prompt, ${usage.completion_tokens} completion)` +
    (usage.estimated ? ", partly estimated" : "") + (usage.cost_usd !== undefined ? ` · ${money(usage.cost_usd)}` : "");
}

// ---- why a queued or running job does not move: GET /jobs/{id} says, its stream does not ------

const WAITING = ["queued", "running"];
const WAIT_REASONS = {
  requests_per_min: "the provider's requests per minute are spent for now",
  tokens_per_min: "the provider's tokens per minute are spent for now",
  rate_limited: "the provider asked to slow down (429)",
  provider_error: "a failed call is tried again",
};

function waitText(job) {
  const queue = job.queue;
  if (queue?.waiting_for === "tenant_cap") {
    const place = queue.position === 1 ? "Next to start" : `Number ${queue.position} in line to start`;
    return `${place}: ${queue.running} of your jobs running, at most ${queue.cap} at once.`;
  }
  if (queue?.waiting_for === "consumer") return "Queued: waiting for a free worker.";
  return (job.provider_waits || []).map((wait) => {
    const title = job.sections.find((s) => s.index === wait.section)?.title;
    const what = wait.section === null ? "The outline" : title ? `“${title}”` : `Section ${wait.section + 1}`;
    return `${what} waits about ${Math.ceil(wait.remaining_s)} s: ${WAIT_REASONS[wait.reason] || wait.reason} (${wait.model}).`;
  }).join(" ");
}

function drawWait(job) {
  say($("job-wait"), WAITING.includes(job.status) ? waitText(job) : "");
}

// One timer at most, armed while the job shown is queued or running; a hidden tab does not ask.
function followWaits() {
  if (state.waitTimer || !WAITING.includes(state.status) || !showingJob()) return;
  const id = state.id;
  state.waitTimer = setTimeout(async () => {
    state.waitTimer = null;
    if (state.id === id && showingJob() && !document.hidden && WAITING.includes(state.status)) {
      try {
        const job = await api("GET", `/jobs/${id}`);
        if (state.id === id && WAITING.includes(state.status)) drawWait(job);  // not once the stream moved on
      } catch (err) {
        if (err instanceof KeyNeeded) return;
        showError(err);
      }
    }
    followWaits();
  }, WAIT_POLL_MS);
}

// Figures the events do not carry (cost, reasons, versions): read again when the job settles.
async function refreshJobMeta() {
  const id = state.id;
  const job = await api("GET", `/jobs/${id}`);
  if (state.id === id) drawJobMeta(job);
}

async function applySnapshot(job) {
  drawJobMeta(job);
  setStatus(job.status);
  await Promise.all(job.sections.filter((s) => s.status === "done" && state.sections.get(s.index).dataset.done !== "1")
    .map((s) => loadSection(s.index)));
  setProgress();
}

// The stream's events, by name (the page's tests drive them directly too).
const handlers = {
  snapshot: (d) => applySnapshot(d),
  status: (d) => {
    setStatus(d.status);
    if (["failed", "paused", "cancelled", "completed", "awaiting_review"].includes(d.status)) return refreshJobMeta();
  },
  outline: (d) => {
    d.sections.forEach((s) => sectionEl(s.index, s.title));
    for (const [index, el] of state.sections) {
      if (index >= d.sections.length) { el.remove(); state.sections.delete(index); state.raw.delete(index); }
    }
    setProgress();
  },
  "section.started": (d) => {
    const el = sectionEl(d.index, d.title);
    el.classList.add("running");
    el.dataset.done = "0";
    // A resumed section continues after the text that was kept; a restarted one starts over.
    // resumed_chars counts code points (Python's len), so slice by code point, not UTF-16 unit.
    const kept = Array.from(state.raw.get(d.index) || "").slice(0, d.resumed_chars || 0).join("");
    showRaw(el, d.index, kept);
    setProgress();
  },
  "section.delta": (d) => {
    const el = sectionEl(d.index);
    const text = el.querySelector(".text");
    if (text.classList.contains("md")) showRaw(el, d.index, "");
    state.raw.set(d.index, (state.raw.get(d.index) || "") + d.text);
    text.append(d.text);  // a text node: whatever the model wrote, it is characters here
  },
  "section.completed": (d) => {
    const el = sectionEl(d.index);
    el.classList.remove("running");
    el.dataset.done = "1";
    if (d.usage) el.querySelector(".u").textContent = `${d.usage.total_tokens} tokens`;
    setProgress();
    return loadSection(d.index);
  },
  usage: (d) => setUsage(d),
  done: (d) => {
    setStatus(d.status);
    closeStream();
    state.sections.forEach((el) => el.classList.remove("running"));
    return refreshJobMeta();
  },
};

async function control(verb) {
  say($("job-error"), "");
  try {
    const seen = state.statusChanges;
    const job = await api("POST", `/jobs/${state.id}/${verb}`);
    // The event stream may already have told a newer status (resumed, then running): keep it.
    if (state.statusChanges === seen) setStatus(job.status);
    if (verb === "retry" || verb === "approve") follow();
  } catch (e) { showError(e); }
}

$("pause").onclick = () => control("pause");
$("resume").onclick = () => control("resume");
$("cancel").onclick = () => control("cancel");
$("retry").onclick = () => control("retry");

// Named first in Accept, DOCX and PDF come inline (else the API redirects binary files to S3,
// which API Gateway could not pass through as bytes).
const EXPORT_TYPES = {
  markdown: "text/markdown", html: "text/html", pdf: "application/pdf",
  docx: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
};

for (const link of $("exports").querySelectorAll("a")) {
  link.onclick = async (e) => {
    e.preventDefault();
    say($("job-error"), "");
    try {
      const { data } = await request("GET", link.getAttribute("href"),
                                     { blob: true, headers: { Accept: EXPORT_TYPES[link.dataset.format] } });
      const save = document.createElement("a");
      save.href = URL.createObjectURL(data);
      save.download = `${state.id}.${link.dataset.ext}`;
      save.click();
      setTimeout(() => URL.revokeObjectURL(save.href), 60_000);
    } catch (err) { showError(err); }
  };
}

// ---- sections: text, figures, and the writer's tools ---------------------------------------------

function sectionEl(index, title) {
  let el = state.sections.get(index);
  if (!el) {
    el = $("section-tpl").content.firstElementChild.cloneNode(true);
    el.dataset.index = index;
    wireSection(el, index);
    const after = [...state.sections.entries()].filter(([i]) => i > index).sort(([a], [b]) => a - b)[0];
    $("sections-list").insertBefore(el, after ? after[1] : null);
    state.sections.set(index, el);
    for (const button of el.querySelectorAll(".sec-tools button")) button.disabled = !AT_REST.includes(state.status);
  }
  if (title) el.querySelector(".t").textContent = `${index + 1}. ${title}`;
  return el;
}

function showRaw(el, index, text) {
  state.raw.set(index, text);
  const box = el.querySelector(".text");
  box.classList.remove("md");
  box.textContent = text;
}

function showMarkdown(el, index, content) {
  state.raw.set(index, content);
  const box = el.querySelector(".text");
  markdown.render(content, box);
  box.classList.add("md");
}

function drawSectionMeta(el, s) {
  const figures = [`${s.usage.total_tokens} tokens`, money(s.usage.cost_usd)];
  if (s.version) figures.push(`v${s.version}`);
  if (s.locked) figures.push("locked");
  el.querySelector(".u").textContent = figures.join(" · ");
  el.dataset.locked = s.locked ? "1" : "0";
  el.querySelector(".b-lock").textContent = s.locked ? "Unlock" : "Lock";
}

// The section as stored now: its text rendered, its figures, and its ETag for an edit.
async function loadSection(index) {
  const id = state.id;
  const { data, response } = await request("GET", `/jobs/${id}/sections/${index}`);
  if (state.id !== id) return data;
  const el = sectionEl(index, data.title);
  el.dataset.etag = response.headers.get("ETag") || "";
  drawSectionMeta(el, data);
  if (data.status === "done" && data.content !== undefined && !el.classList.contains("running")) {
    showMarkdown(el, index, data.content);
    el.dataset.done = "1";
  }
  return data;
}

function wireSection(el, index) {
  const panel = (name) => el.querySelector(`.panel.${name}`);
  const error = el.querySelector(".sec-error");
  const base = () => `/jobs/${state.id}/sections/${index}`;
  const toggle = (name) => {
    const open = panel(name).hidden;
    for (const p of el.querySelectorAll(".panel")) p.hidden = true;
    panel(name).hidden = !open;
    say(error, "");
    return open;
  };

  el.querySelector(".b-regen").onclick = () => {
    if (toggle("regen")) panel("regen").querySelector(".instructions").focus();
  };
  panel("regen").onsubmit = async (e) => {
    e.preventDefault();
    const instructions = panel("regen").querySelector(".instructions").value.trim();
    const body = { cascade: panel("regen").querySelector(".cascade").checked };
    if (instructions) body.instructions = instructions;
    try {
      const seen = state.statusChanges;
      const job = await api("POST", `${base()}/regenerate`, body);
      panel("regen").hidden = true;
      if (state.statusChanges === seen) setStatus(job.status);
      follow();
    } catch (err) { showError(err, error); }
  };

  const editor = panel("edit").querySelector(".content");
  const reload = async () => {
    say(error, "");
    editor.value = (await loadSection(index)).content || "";
  };
  el.querySelector(".b-edit").onclick = async () => {
    if (!toggle("edit")) return;
    try { await reload(); editor.focus(); } catch (err) { showError(err, error); }
  };
  panel("edit").querySelector(".b-reload").onclick = () => reload().catch((err) => showError(err, error));
  panel("edit").onsubmit = async (e) => {
    e.preventDefault();
    say(error, "");
    try {
      // Never `*`: an edit is made against the version it was read from, or refused.
      const headers = el.dataset.etag ? { "If-Match": el.dataset.etag } : {};
      await request("PUT", base(), { body: { content: editor.value }, headers });
      panel("edit").hidden = true;
      await loadSection(index);
      refreshJobMeta();
    } catch (err) {
      if (err.status === 412) {
        say(error, "This section changed meanwhile (a new version was written since you opened it). " +
                   "Press Reload to see the current text, then make your edit again.");
      } else showError(err, error);
    }
  };

  el.querySelector(".b-lock").onclick = async () => {
    say(error, "");
    try {
      await api("POST", `${base()}/${el.dataset.locked === "1" ? "unlock" : "lock"}`);
      await loadSection(index);
    } catch (err) { showError(err, error); }
  };

  const versions = new Map();  // version number → its text; a stored version never changes
  const versionText = async (v) => {
    if (!versions.has(v)) versions.set(v, (await api("GET", `${base()}/versions/${v}`)).content);
    return versions.get(v);
  };
  const listVersions = async () => {
    const { versions: list } = await api("GET", `${base()}/versions`);
    const items = list.map((v) => {
      const li = document.createElement("li");
      li.dataset.version = v.version;
      const what = document.createElement("span");
      what.textContent = `v${v.version} · ${v.maker} · ${v.created_at.slice(0, 19).replace("T", " ")} · ` +
        `${v.chars} chars · ${v.usage.total_tokens} tokens · ${money(v.usage.cost_usd)}${v.current ? " · current" : ""}`;
      li.append(what);
      if (!v.current) {
        const restore = document.createElement("button");
        restore.type = "button";
        restore.className = "b-restore";
        restore.textContent = "Restore";
        restore.setAttribute("aria-label", `Restore version ${v.version}`);
        restore.onclick = async () => {
          say(error, "");
          try {
            await api("POST", `${base()}/versions/${v.version}/restore`);
            await loadSection(index);
            await listVersions();
            refreshJobMeta();
          } catch (err) { showError(err, error); }
        };
        li.append(" ", restore);
      }
      return li;
    });
    panel("versions").querySelector(".version-list").replaceChildren(...items);
    for (const [name, pick] of [["diff-a", list.length - 2], ["diff-b", list.length - 1]]) {
      const select = panel("versions").querySelector(`.${name}`);
      select.replaceChildren(...list.map((v) => new Option(`v${v.version}`, v.version)));
      select.selectedIndex = Math.max(pick, 0);
    }
    panel("versions").querySelector(".diff-pick").hidden = list.length < 2;
    panel("versions").querySelector(".diff").replaceChildren();
  };
  el.querySelector(".b-versions").onclick = async () => {
    if (!toggle("versions")) return;
    try { await listVersions(); } catch (err) { showError(err, error); }
  };
  panel("versions").querySelector(".b-diff").onclick = async () => {
    try {
      const [a, b] = ["diff-a", "diff-b"].map((n) => Number(panel("versions").querySelector(`.${n}`).value));
      const [before, after] = await Promise.all([versionText(a), versionText(b)]);
      textDiff.render(textDiff.diff(before, after), panel("versions").querySelector(".diff"));
    } catch (err) { showError(err, error); }
  };
}

// ---- the outline review ------------------------------------------------------------------------

function outlineItem(title, brief) {
  const li = document.createElement("li");
  const field = (text, input) => {
    const label = document.createElement("label");
    label.append(text, input);
    return label;
  };
  const t = document.createElement("input");
  t.className = "o-title"; t.required = true; t.maxLength = 300; t.value = title;
  const b = document.createElement("textarea");
  b.className = "o-brief"; b.maxLength = 4000; b.value = brief || "";
  const remove = document.createElement("button");
  remove.type = "button"; remove.textContent = "Remove";
  remove.onclick = () => { li.remove(); state.outlineDirty = true; };
  li.append(field("Title", t), field("Brief", b), remove);
  return li;
}

async function loadOutline() {
  const id = state.id;
  const job = await api("GET", `/jobs/${id}`);
  const sections = await Promise.all(job.sections.map((s) => api("GET", `/jobs/${id}/sections/${s.index}`)));
  if (state.id !== id || state.status !== "awaiting_review") return;
  $("outline-items").replaceChildren(...sections.map((s) => outlineItem(s.title, s.brief)));
  state.outlineDirty = false;
  say($("outline-note"), "");
  $("outline-form").hidden = false;
}

function outlineBody() {
  return {
    outline: [...$("outline-items").children].map((li) => ({
      title: li.querySelector(".o-title").value.trim(), brief: li.querySelector(".o-brief").value.trim(),
    })),
  };
}

async function saveOutline() {
  const job = await api("PUT", `/jobs/${state.id}/outline`, outlineBody());
  state.outlineDirty = false;
  drawJobMeta(job);
  say($("outline-note"), "Outline saved.");
}

$("outline-form").oninput = () => { state.outlineDirty = true; };
$("outline-add").onclick = () => {
  const li = outlineItem("", "");
  $("outline-items").append(li);
  state.outlineDirty = true;
  li.querySelector(".o-title").focus();
};
$("outline-form").onsubmit = async (e) => {
  e.preventDefault();
  try { await saveOutline(); } catch (err) { showError(err, $("outline-note")); }
};
$("approve").onclick = async () => {
  if (!$("outline-form").reportValidity()) return;
  try {
    if (state.outlineDirty) await saveOutline();
    await control("approve");
  } catch (err) { showError(err, $("outline-note")); }
};

// ---- the key, and the start ------------------------------------------------------------------

async function begin() {
  if (!apiKey) {
    askForKey();
    return;
  }
  try {
    await loadJobs();
  } catch (err) {
    if (err instanceof KeyNeeded) return;
    showError(err, $("error"));
  }
  route();
}

window.addEventListener("hashchange", () => { if (apiKey && $("key-card").hidden) route(); });

$("key-form").onsubmit = (e) => {
  e.preventDefault();
  apiKey = $("api-key").value.trim();
  $("api-key").value = "";
  $("key-error").textContent = "";
  if (!apiKey) return;
  sessionStorage.setItem(KEY_ITEM, apiKey);
  begin();
};

begin();
