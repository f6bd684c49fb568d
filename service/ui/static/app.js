// The console: log-in, tasks (search, pages, versions, upload, rollback, delete, pin, traffic split), training jobs,
// live load and a playground. Server data only ever enters the page as textContent (never innerHTML).

import { api, events, json, session } from "./api.js";
import { fmt, plot, svg as newSvg } from "./plot.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["login", "tasks", "task", "train", "load", "play"];
const state = { offset: 0, task: null, loadTimer: null, samples: [], play: null, jobs: new Map() };

function say(message, isError = false) {
  const s = $("status");
  s.textContent = message;
  s.classList.toggle("error", isError);
}

// Runs an action, saying what went wrong (the server's own message) instead of failing silently.
async function attempt(what, action) {
  try {
    return await action();
  } catch (e) {
    if (e.name !== "AbortError") say(`${what} failed: ${e.message}`, true);
    if (e.status === 401) logOut();
    return undefined;
  }
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function button(label, onClick, cls) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (cls) b.className = cls;
  b.addEventListener("click", onClick);
  return b;
}

function facts(dl, entries) {
  dl.replaceChildren();
  for (const [k, v] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v;
    dl.append(dt, dd);
  }
}

const bytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);
const backbone = (b) => (b ? `${b.model_type}, ${b.num_layers} layers, hidden size ${b.hidden_size}` : "?");
const metrics = (m) => Object.entries(m ?? {}).map(([k, v]) => `${k} ${typeof v === "number" ? fmt(v) : v}`).join(", ");

function show(view) {
  for (const v of VIEWS) $(`view-${v}`).hidden = v !== view;
  for (const b of document.querySelectorAll("#nav [data-view]")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  clearInterval(state.loadTimer);
  if (view === "tasks") loadTasks();
  if (view === "load") startLoad();
  if (view === "train") loadJobs();
  const heading = $(`view-${view}`).querySelector("h2");
  heading.tabIndex = -1;
  heading.focus();
}

// -- log-in -------------------------------------------------------------------------------------------------------
async function logIn(event) {
  event.preventDefault();
  const key = $("login-key").value.trim();
  $("login-error").textContent = "";
  try {
    await api("/ui/api/load", { key });
  } catch (e) {
    $("login-error").textContent = `Log-in refused: ${e.message}`;
    return;
  }
  session.set(key);
  $("login-key").value = "";
  enter();
}

function enter() {
  $("nav").hidden = false;
  say("Logged in.");
  show("tasks");
}

function logOut() {
  session.clear();
  $("nav").hidden = true;
  show("login");
}

// -- tasks --------------------------------------------------------------------------------------------------------
async function loadTasks() {
  const limit = Number($("task-limit").value);
  const q = $("task-q").value;
  const params = new URLSearchParams({ q, offset: state.offset, limit });
  const r = await attempt("Listing tasks", () => api(`/v1/tasks?${params}`));
  if (!r) return;
  const total = Number(r.headers.get("X-Total-Count"));
  const { tasks } = await r.json();
  const body = $("task-table").tBodies[0];
  body.replaceChildren();
  for (const t of tasks) {
    const row = body.insertRow();
    const link = button(t.task, () => openTask(t.task), "link");
    row.insertCell().append(link);
    cell(row, `v${t.current_version}`);
    cell(row, t.versions.join(", "));
    cell(row, t.current.method);
    cell(row, bytes(t.current.bytes));
    cell(row, t.resident ? "yes" : "no");
  }
  const first = tasks.length ? state.offset + 1 : 0;
  $("task-page").textContent = `${first}-${state.offset + tasks.length} of ${total}`;
  $("task-caption").textContent = `Tasks${q ? ` containing "${q}"` : ""}: ${total}`;
  $("task-prev").disabled = state.offset === 0;
  $("task-next").disabled = state.offset + limit >= total;
}

function page(step) {
  const limit = Number($("task-limit").value);
  state.offset = Math.max(0, state.offset + step * limit);
  loadTasks();
}

async function upload(event) {
  event.preventDefault();
  const task = $("up-task").value.trim();
  const form = new FormData();
  const peft = [...$("up-peft").files];
  const artifact = $("up-artifact").files[0];
  if (peft.length) {
    const config = peft.find((f) => f.name === "adapter_config.json");
    const model = peft.find((f) => f.name === "adapter_model.safetensors");
    if (!config || !model) {
      say(`Upload: choose adapter_config.json and adapter_model.safetensors; got ${peft.map((f) => f.name).join(", ")}`, true);
      return;
    }
    form.append("adapter_config", config);
    form.append("adapter_model", model);
  } else if (artifact) {
    form.append("artifact", artifact);
  } else {
    say("Upload: choose the PEFT adapter files or an artifact.", true);
    return;
  }
  for (const [id, field] of [["up-labels", "labels"], ["up-method", "method"]]) {
    if ($(id).value.trim()) form.append(field, $(id).value.trim());
  }
  const chat = $("up-chat").files[0];
  if (chat) form.append("chat_template", await chat.text());
  const v = await attempt("Upload", () => json(`/v1/tasks/${encodeURIComponent(task)}`, { method: "PUT", form }));
  if (v) {
    say(`Uploaded ${v.task} version ${v.version} (${v.method}).`);
    $("upload-form").reset();
    openTask(v.task);
  }
}

async function replicaResidency(task) {
  const r = await attempt("Reading the replicas", () => json(`/ui/api/replicas?task=${encodeURIComponent(task)}`));
  const list = $("task-replicas");
  list.replaceChildren();
  for (const v of r?.replicas ?? []) {
    const item = document.createElement("li");
    const held = v.resident.length ? `resident ${v.resident.map((n) => `v${n}`).join(", ")}` : "not resident";
    item.textContent = `${v.replica}: ${held}${v.pinned ? `, pinned v${v.pinned}` : ""}; `
      + `${v.queue} queued, ${v.running} running, ${v.resident_tasks} tasks resident`;
    list.append(item);
  }
}

async function openTask(name) {
  state.task = name;
  const t = await attempt("Reading the task", () => json(`/v1/tasks/${encodeURIComponent(name)}`));
  if (!t) return;
  $("task-h").textContent = `Task ${t.task}`;
  facts($("task-facts"), [
    ["Current version", `v${t.current_version}`],
    ["Traffic split", t.traffic ? Object.entries(t.traffic).map(([v, w]) => `v${v}: ${w}`).join(", ") : "none"],
    ["Backbone", backbone(t.current.backbone)],
    ["Head", t.current.head ? `labels ${t.current.head.labels.join(", ")}` : "none (generation)"],
  ]);
  $("task-residency").textContent = `This replica: current version ${t.resident ? "resident" : "not resident"}; `
    + `pinned in the store: ${t.pinned ? "yes" : "no"}; held pinned here: ${t.pinned_here ? "yes" : "no"}.`;
  replicaResidency(t.task);
  const body = $("version-table").tBodies[0];
  body.replaceChildren();
  for (const v of t.history) {
    const row = body.insertRow();
    cell(row, `v${v.version}${v.version === t.current_version ? " (current)" : ""}`);
    cell(row, v.method);
    cell(row, v.num_virtual_tokens);
    cell(row, bytes(v.bytes));
    cell(row, v.created_at.replace("T", " ").slice(0, 19));
    const { metrics: dev, history, ...training } = v.training ?? {};
    cell(row, metrics(dev));
    cell(row, Object.entries(training).map(([k, x]) => `${k}: ${typeof x === "object" ? JSON.stringify(x) : x}`).join("; "), "small");
    const actions = row.insertCell();
    if (v.version !== t.current_version) {
      actions.append(button(`Roll back to v${v.version}`, () => rollback(v.version)));
      actions.append(button(`Delete v${v.version}`, () => remove(v.version), "danger"));
    }
  }
  show("task");
}

async function rollback(version) {
  const v = await attempt("Rollback", () => json(`/v1/tasks/${encodeURIComponent(state.task)}/rollback`, { method: "POST", json: { version } }));
  if (v) {
    say(`Rolled ${v.task} back to version ${v.version}.`);
    openTask(state.task);
  }
}

async function remove(version) {
  const what = version ? `version ${version} of ${state.task}` : `task ${state.task} and every version`;
  if (!window.confirm(`Delete ${what}?`)) return;
  const q = version ? `?version=${version}` : "";
  const done = await attempt("Delete", () => api(`/v1/tasks/${encodeURIComponent(state.task)}${q}`, { method: "DELETE" }));
  if (!done) return;
  say(`Deleted ${what}.`);
  if (version) openTask(state.task);
  else show("tasks");
}

async function pin(on) {
  const path = `/v1/tasks/${encodeURIComponent(state.task)}/pin`;
  const done = await attempt(on ? "Pin" : "Unpin", () => api(path, { method: on ? "POST" : "DELETE" }));
  if (done) {
    say(on ? `Pinned ${state.task}.` : `Unpinned ${state.task}.`);
    openTask(state.task);
  }
}

async function traffic(event) {
  event.preventDefault();
  const weights = {};
  for (const part of $("traffic").value.split(",")) {
    const [v, w] = part.split("=").map((s) => s.trim());
    if (!/^\d+$/.test(v ?? "") || !/^\d+$/.test(w ?? "")) {
      say(`Traffic split: expected version=weight pairs like 1=90,2=10, got "${part}"`, true);
      return;
    }
    weights[v] = Number(w);
  }
  const path = `/v1/tasks/${encodeURIComponent(state.task)}/traffic`;
  if (await attempt("Traffic split", () => json(path, { method: "PUT", json: { weights } }))) {
    say("Traffic split set.");
    openTask(state.task);
  }
}

async function clearTraffic() {
  const path = `/v1/tasks/${encodeURIComponent(state.task)}/traffic`;
  if (await attempt("Removing the split", () => api(path, { method: "DELETE" }))) {
    say("Traffic split removed.");
    openTask(state.task);
  }
}

// -- training -----------------------------------------------------------------------------------------------------
function trainSpec() {
  const spec = {
    task: $("tr-task").value.trim(),
    method: $("tr-method").value.trim(),
    steps: Number($("tr-steps").value),
    batch_size: Number($("tr-batch").value),
    eval_every: Number($("tr-eval").value),
  };
  if ($("tr-data").value.trim()) spec.data = $("tr-data").value.trim();
  const lines = $("tr-examples").value.split("\n").filter((l) => l.trim());
  if (lines.length) spec.examples = lines.map((l, i) => parseJson(l, `inline example ${i + 1}`));
  if ($("tr-lr").value.trim()) spec.lr = Number($("tr-lr").value);
  if ($("tr-p").value) spec.num_virtual_tokens = Number($("tr-p").value);
  if ($("tr-extra").value.trim()) Object.assign(spec, parseJson($("tr-extra").value, "more fields"));
  return spec;
}

function parseJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new Error(`${what} is not JSON: ${e.message}`);
  }
}

async function submitJob(event) {
  event.preventDefault();
  const job = await attempt("Submitting the job", () => json("/v1/train", { method: "POST", json: trainSpec() }));
  if (job) {
    say(`Job ${job.job_id} queued.`);
    watchJob(job.job_id);
  }
}

async function loadJobs() {
  const r = await attempt("Listing jobs", () => json("/v1/train?limit=20"));
  if (!r) return;
  const body = $("job-table").tBodies[0];
  body.replaceChildren();
  for (const j of r.jobs) {
    const row = body.insertRow();
    row.insertCell().append(button(j.job_id.slice(0, 12), () => watchJob(j.job_id), "link"));
    cell(row, j.spec?.task ?? "");
    cell(row, j.spec?.method ?? "");
    cell(row, j.state);
    cell(row, j.progress ? `${j.progress.step ?? 0} of ${j.progress.steps ?? "?"}` : "");
    cell(row, j.created_at ?? "");
  }
}

function watchJob(id) {
  if (state.jobs.has(id)) return;
  const item = document.createElement("li");
  const h = document.createElement("h4");
  h.textContent = `Job ${id}`;
  const line = document.createElement("p");
  line.setAttribute("aria-live", "polite");
  line.className = "job-state";
  const bar = document.createElement("progress");
  bar.setAttribute("aria-label", `progress of job ${id}`);
  const svg = newSvg();
  const cancel = button("Cancel job", () => attempt("Cancel", () => json(`/v1/train/${encodeURIComponent(id)}`, { method: "DELETE" })));
  item.append(h, line, bar, svg, cancel);
  $("jobs").prepend(item);
  const job = { loss: [], dev: [], timer: null };
  state.jobs.set(id, job);
  const poll = async () => {
    const j = await attempt("Reading the job", () => json(`/v1/train/${encodeURIComponent(id)}`));
    if (!j) {
      job.misses = (job.misses ?? 0) + 1; // a passing failure (a restart, a timeout) is retried a few times
      if (job.misses >= 5) clearInterval(job.timer);
      return;
    }
    job.misses = 0;
    const p = j.progress ?? {};
    if (Number.isFinite(p.loss) && job.loss.at(-1)?.[0] !== p.step) job.loss.push([p.step, p.loss]);
    const [devName, devValue] = Object.entries(p.val ?? p.dev ?? {}).find(([, v]) => Number.isFinite(v)) ?? [];
    if (devName) job.metric = devName;
    if (devName && job.dev.at(-1)?.[0] !== p.step) job.dev.push([p.step, devValue]);
    const history = j.result?.history;
    if (Array.isArray(history) && history.length) { // the whole curve, once the worker reports it
      job.loss = history.filter((h) => Number.isFinite(h.train_loss)).map((h) => [h.step, h.train_loss]);
      const metric = job.metric ?? Object.keys(history[0]).find((k) => !["step", "train_loss", "window_loss"].includes(k) && Number.isFinite(history[0][k]));
      if (metric) {
        job.metric = metric;
        job.dev = history.map((h) => [h.step, h[metric]]);
      }
    }
    const timed = p.steps == null && Number.isFinite(p.done); // a budget in seconds only: the share of it done
    bar.max = timed ? 1 : p.steps ?? 1;
    bar.value = timed ? p.done : p.step ?? 0;
    const of = timed ? ` (${Math.round(100 * p.done)}% of its time)` : ` of ${p.steps ?? j.spec.steps ?? "?"}`;
    let text = `${j.state}; step ${p.step ?? 0}${of}; loss ${fmt(p.loss)}`;
    if (p.val ?? p.dev) text += `; validation ${metrics(p.val ?? p.dev)}`;
    if (j.result?.published) text += `; published ${j.spec.task} version ${j.result.version}`;
    else if (j.result) text += "; not published";
    if (j.error) text += `; error: ${j.error}`;
    line.textContent = text;
    plot(svg, [{ label: "loss", points: job.loss }, { label: `validation ${job.metric ?? "metric"}`, points: job.dev }]);
    const ended = ["succeeded", "failed", "cancelled"].includes(j.state);
    cancel.disabled = ended;
    if (ended) clearInterval(job.timer);
  };
  job.timer = setInterval(poll, 1000);
  poll();
}

async function listMethods() {
  // The method names the server takes, from its own OpenAPI schema (an open route), as suggestions.
  const spec = await fetch("/openapi.json").then((r) => r.json()).catch(() => null);
  const schemas = spec?.components?.schemas ?? {};
  const method = schemas.TrainSpec?.properties?.method;
  const ref = method?.$ref?.split("/").at(-1);
  const names = (ref ? schemas[ref]?.enum : method?.enum) ?? [];
  $("methods").replaceChildren(...names.map((n) => Object.assign(document.createElement("option"), { value: n })));
}

// -- live load ----------------------------------------------------------------------------------------------------
function startLoad() {
  state.samples = [];
  pollLoad();
  state.loadTimer = setInterval(pollLoad, 2000);
}

async function pollLoad() {
  const now = await attempt("Reading the load", () => json("/ui/api/load"));
  if (!now) return clearInterval(state.loadTimer);
  const prev = state.samples.at(-1);
  state.samples.push(now);
  if (state.samples.length > 90) state.samples.shift(); // three minutes at one read every two seconds
  const dt = prev ? now.time - prev.time : 0;
  const rate = (a, b) => (dt > 0 ? Math.max(0, (a - b) / dt) : NaN);
  const hit = now.cache.device ?? {};
  facts($("load-facts"), [
    ["Queue", fmt(now.queue)],
    ["Running", fmt(now.running)],
    ["KV usage", `${(now.kv_usage * 100).toFixed(1)}%`],
    ["Requests (since start)", `${now.requests} (${now.errors} errors)`],
    ["Tokens generated", String(now.tokens)],
    ["Device cache", `${hit.hits ?? 0} hits, ${hit.misses ?? 0} misses, ${bytes(hit.resident_bytes ?? 0)} resident`],
  ]);
  const s = state.samples;
  const t0 = s[0].time;
  const pairs = (f) => s.slice(1).map((x, i) => [x.time - t0, f(x, s[i])]);
  const per = (a, b, k) => (a.time > b.time ? Math.max(0, (a[k] - b[k]) / (a.time - b.time)) : NaN);
  plot($("plot-rps"), [{ label: "req/s", points: pairs((a, b) => per(a, b, "requests")) }]);
  plot($("plot-tps"), [{ label: "tok/s", points: pairs((a, b) => per(a, b, "tokens")) }]);
  plot($("plot-queue"), [
    { label: "queue", points: s.map((x) => [x.time - t0, x.queue]) },
    { label: "running", points: s.map((x) => [x.time - t0, x.running]) },
  ]);
  const ratio = (a, b, n, d) => (a[d] - b[d] > 0 ? (a[n] - b[n]) / (a[d] - b[d]) : NaN);
  plot($("plot-batch"), [{ label: "rows/step", points: pairs((a, b) => ratio(a, b, "batch_rows", "batch_steps")) }]);
  const lookups = (x) => ({ h: x.cache.device?.hits ?? 0, n: (x.cache.device?.hits ?? 0) + (x.cache.device?.misses ?? 0) });
  plot($("plot-hits"), [{ label: "hit ratio", points: pairs((a, b) => ratio(lookups(a), lookups(b), "h", "n")) }]);
  const body = $("load-table").tBodies[0];
  body.replaceChildren();
  for (const [name, t] of Object.entries(now.tasks)) {
    const before = prev?.tasks?.[name];
    const row = body.insertRow();
    cell(row, name);
    cell(row, fmt(before ? rate(t.requests, before.requests) : NaN));
    cell(row, fmt(before ? rate(t.tokens, before.tokens) : NaN));
    cell(row, fmt(t.waiting));
    cell(row, fmt(t.running));
    cell(row, t.resident ? "yes" : "no");
  }
}

// -- playground ---------------------------------------------------------------------------------------------------
async function send(event) {
  event.preventDefault();
  state.play?.abort();
  const control = new AbortController();
  state.play = control;
  const task = $("pl-task").value.trim();
  const kind = $("pl-kind").value;
  const text = $("pl-text").value;
  const max = Number($("pl-max").value);
  const out = $("pl-out");
  out.textContent = "";
  $("pl-info").textContent = "sending...";
  const signal = control.signal;
  await attempt("The request", async () => {
    if (kind === "classify") {
      const r = await json("/v1/classify", { method: "POST", json: { task, text }, signal });
      const best = r.results[0];
      out.textContent = `${best.label}\n${Object.entries(best.scores ?? {}).map(([k, v]) => `${k}: ${fmt(v)}`).join("\n")}`;
      $("pl-info").textContent = `task ${r.task} version ${r.version}`;
      return;
    }
    const chat = kind === "chat";
    const body = chat
      ? { model: task, messages: [{ role: "user", content: text }], max_tokens: max, stream: true }
      : { task, prompt: text, max_new_tokens: max, stream: true };
    const r = await api(chat ? "/v1/chat/completions" : "/v1/generate", { method: "POST", json: body, signal });
    let tokens = 0;
    for await (const ev of events(r)) {
      if (ev.error) throw new Error(`${ev.error.code}: ${ev.error.message}`); // failed after the first byte
      const piece = chat ? ev.choices?.[0]?.delta?.content : ev.text;
      if (piece) {
        out.textContent += piece;
        tokens += 1;
      }
      if (ev.finish_reason) {
        const n = ev.usage?.completion_tokens ?? tokens; // a token may have no text of its own yet
        $("pl-info").textContent = `done: ${ev.finish_reason}, ${n} tokens, task ${ev.task} version ${ev.version}`;
      }
      const reason = ev.choices?.[0]?.finish_reason;
      if (reason) $("pl-info").textContent = `done: ${reason}, ${tokens} chunks`;
    }
  });
}

// -- wiring -------------------------------------------------------------------------------------------------------
function wire() {
  $("login-form").addEventListener("submit", logIn);
  $("logout").addEventListener("click", logOut);
  for (const b of document.querySelectorAll("#nav [data-view]")) b.addEventListener("click", () => show(b.dataset.view));
  $("task-search").addEventListener("submit", (e) => {
    e.preventDefault();
    state.offset = 0;
    loadTasks();
  });
  $("task-prev").addEventListener("click", () => page(-1));
  $("task-next").addEventListener("click", () => page(1));
  $("upload-form").addEventListener("submit", upload);
  $("task-back").addEventListener("click", () => show("tasks"));
  $("task-pin").addEventListener("click", () => pin(true));
  $("task-unpin").addEventListener("click", () => pin(false));
  $("traffic-form").addEventListener("submit", traffic);
  $("traffic-clear").addEventListener("click", clearTraffic);
  $("task-delete").addEventListener("click", () => remove(null));
  $("train-form").addEventListener("submit", (e) => attempt("Submitting the job", () => submitJob(e)));
  $("job-refresh").addEventListener("click", loadJobs);
  $("job-watch").addEventListener("submit", (e) => {
    e.preventDefault();
    watchJob($("job-id").value.trim());
  });
  $("play-form").addEventListener("submit", send);
  $("pl-stop").addEventListener("click", () => state.play?.abort());
  listMethods();
  if (session.key) enter();
  else show("login");
}

wire();
