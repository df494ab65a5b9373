"use strict";
// The API key is asked for once and kept for this tab only (sessionStorage, never localStorage,
// never in the page): the server does not hand it to whoever loads the page.
const KEY_ITEM = "rtqcc-api-key";
localStorage.removeItem(KEY_ITEM);  // where earlier versions of this page kept it
let apiKey = sessionStorage.getItem(KEY_ITEM) || "";
const $ = (id) => document.getElementById(id);
const state = { id: null, source: null, lastEventId: null, sections: new Map(), status: null, statusChanges: 0 };

// Thrown when there is no key or the server refused it; the key form already says so.
class KeyNeeded extends Error {}

function askForKey(message) {
  $("key-card").hidden = false;
  $("create-card").hidden = true;
  $("jobs-card").hidden = true;
  $("key-error").textContent = message || "";
  $("api-key").focus();
}

function keyReady() {
  $("key-card").hidden = true;
  $("create-card").hidden = false;
  $("jobs-card").hidden = false;
}

function showError(err) {
  if (!(err instanceof KeyNeeded)) $("error").textContent = err.message;
}

async function api(method, path, body) {
  if (!apiKey) {
    askForKey();
    throw new KeyNeeded("Enter your API key first.");
  }
  const response = await fetch(path, {
    method, headers: { "Authorization": `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
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
  if (!response.ok) throw new Error(data?.error?.message || `${response.status}`);
  return data;
}

function sectionEl(index, title) {
  if (!state.sections.has(index)) {
    const el = document.createElement("div");
    el.className = "sec";
    el.dataset.index = index;
    el.innerHTML = `<h3><span class="t"></span><small class="u"></small></h3><div class="text"></div>`;
    $("sections-list").appendChild(el);
    state.sections.set(index, el);
  }
  const el = state.sections.get(index);
  if (title) el.querySelector(".t").textContent = `${index + 1}. ${title}`;
  return el;
}

function setStatus(status) {
  state.status = status;
  state.statusChanges += 1;
  $("job-status").textContent = status;
  $("job-status").className = `status ${status}`;
  $("pause").disabled = !["queued", "running"].includes(status);
  $("resume").disabled = status !== "paused";
  $("cancel").disabled = ["completed", "failed", "cancelled"].includes(status);
  const done = status === "completed";
  $("download").hidden = !done;
}

function setProgress() {
  const all = [...state.sections.values()];
  const done = all.filter((el) => el.dataset.done === "1").length;
  $("progress").style.width = all.length ? `${(100 * done) / all.length}%` : "0";
}

function setUsage(usage) {
  if (!usage) return;
  $("job-usage").textContent = `${usage.total_tokens} tokens (${usage.prompt_tokens} prompt, ${usage.completion_tokens} completion)` +
    (usage.estimated ? ", partly estimated" : "");
}

async function applySnapshot(job) {
  $("job-title").textContent = job.title;
  setStatus(job.status);
  setUsage(job.usage);
  for (const s of job.sections) {
    const el = sectionEl(s.index, s.title);
    if (s.status === "done" && el.dataset.done !== "1") {
      const full = await api("GET", `/jobs/${state.id}/sections/${s.index}`);
      el.querySelector(".text").textContent = full.content;
      el.dataset.done = "1";
    }
  }
  setProgress();
}

const handlers = {
  snapshot: (d) => applySnapshot(d),
  status: (d) => setStatus(d.status),
  outline: (d) => { d.sections.forEach((s) => sectionEl(s.index, s.title)); setProgress(); },
  "section.started": (d) => {
    const el = sectionEl(d.index, d.title);
    el.classList.add("running");
    const text = el.querySelector(".text");
    // A resumed section continues after the text that was kept; a restarted one starts over.
    // resumed_chars counts code points (Python's len), so slice by code point, not UTF-16 unit.
    text.textContent = Array.from(text.textContent).slice(0, d.resumed_chars || 0).join("");
  },
  "section.delta": (d) => { sectionEl(d.index).querySelector(".text").textContent += d.text; },
  "section.completed": (d) => {
    const el = sectionEl(d.index);
    el.classList.remove("running");
    el.dataset.done = "1";
    el.querySelector(".u").textContent = `${d.usage.total_tokens} tokens`;
    setProgress();
  },
  usage: (d) => setUsage(d),
  done: (d) => { setStatus(d.status); state.source?.close(); state.sections.forEach((el) => el.classList.remove("running")); },
};

async function watch(id) {
  state.source?.close();
  if (state.id !== id) {
    state.sections.clear();
    $("sections-list").innerHTML = "";
    state.lastEventId = "0-0";  // replay the job's whole event stream: text as well as state
  }
  state.id = id;
  location.hash = id;
  $("empty").hidden = true;
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("download").href = "#";
  const job = await api("GET", `/jobs/${id}`);
  $("job-title").textContent = job.title;
  setStatus(job.status);
  setUsage(job.usage);
  const { token } = await api("POST", `/jobs/${id}/stream-token`);
  const url = `/jobs/${id}/stream?access_token=${encodeURIComponent(token)}&lastEventId=${state.lastEventId}`;
  const source = new EventSource(url);
  state.source = source;
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (e) => { state.lastEventId = e.lastEventId || state.lastEventId; Promise.resolve(handle(JSON.parse(e.data))).catch(showError); });
  }
  source.onerror = () => {
    // EventSource retries by itself; if it gave up (an expired token), reopen where we were.
    if (source.readyState === EventSource.CLOSED && state.source === source && !["completed", "failed", "cancelled"].includes(state.status)) {
      setTimeout(() => watch(id).catch(showError), 1000);
    }
  };
}

async function control(verb) {
  try {
    const seen = state.statusChanges;
    const job = await api("POST", `/jobs/${state.id}/${verb}`);
    // The event stream may already have told a newer status (resumed, then running): keep it.
    if (state.statusChanges === seen) setStatus(job.status);
  }
  catch (e) { showError(e); }
}

$("pause").onclick = () => control("pause");
$("resume").onclick = () => control("resume");
$("cancel").onclick = () => control("cancel");
$("download").onclick = async (e) => {
  e.preventDefault();
  try {
    const text = await api("GET", `/jobs/${state.id}/manuscript`);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([text], { type: "text/markdown" }));
    link.download = `${state.id}.md`;
    link.click();
  } catch (err) { showError(err); }
};
$("create").onsubmit = async (e) => {
  e.preventDefault();
  $("error").textContent = "";
  try {
    const created = await api("POST", "/jobs", { title: $("title").value, brief: $("brief").value, section_count: Number($("sections").value) });
    await api("POST", `/jobs/${created.externalId}/start`);
    await watch(created.externalId);
    loadJobs();
  } catch (err) { showError(err); }
};

// True unless the key was refused.
async function loadJobs() {
  try {
    const { jobs } = await api("GET", "/jobs?limit=10");
    $("jobs").innerHTML = "";
    for (const job of jobs) {
      const li = document.createElement("li");
      li.textContent = `${job.title} (${job.status})`;
      li.onclick = () => watch(job.externalId).catch(showError);
      $("jobs").appendChild(li);
    }
  } catch (err) {
    showError(err);
    return !(err instanceof KeyNeeded);
  }
  return true;
}

async function begin() {
  if (!apiKey) {
    askForKey();
    return;
  }
  if (!(await loadJobs())) return;
  keyReady();
  if (location.hash.length > 1) watch(location.hash.slice(1)).catch(showError);
}

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
