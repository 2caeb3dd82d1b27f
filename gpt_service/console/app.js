/* GPT Service web console: plain JavaScript, no build step. Every figure comes from the HTTP API.
 *
 * Views (hash routes): #/tasks, #/tasks/<id>, #/train, #/models, #/playground, #/evaluate.
 * The API key, when the server asks for one (401), is kept in localStorage and sent as
 * `Authorization: Bearer` on every call; streams use fetch + ReadableStream, which can send it.
 * Text from the server (logs, answers, errors) is only ever set as text, never as HTML.
 */
"use strict";

const KEY_STORE = "gpt-service-api-key";
const EVAL_STORE = "gpt-service-evaluations";
const ACTIVE = new Set(["pending", "running"]);
const SVG_NS = "http://www.w3.org/2000/svg";

let apiKey = localStorage.getItem(KEY_STORE) || "";
let keyPrompt = null; // the pending dialog, shared by every call that got a 401
let keyDeclined = false; // the user closed the dialog without a key: ask again only when they click "API key"

// ---------------------------------------------------------------- helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "className") el.className = value;
    else if (name === "value") el.value = value;
    else if (name === "checked") el.checked = !!value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function s(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
  return el;
}

function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

const $ = (sel, root = document) => root.querySelector(sel);

function fmt(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return value.toFixed(digits);
}

function percent(value, digits = 1) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(digits)}%`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const ago = (Date.now() - date.getTime()) / 1000;
  if (ago < 60) return "just now";
  if (ago < 3600) return `${Math.floor(ago / 60)} min ago`;
  if (ago < 86400) return `${Math.floor(ago / 3600)} h ago`;
  return date.toLocaleString();
}

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function shortId(id) { return id.length > 12 ? id.slice(0, 12) : id; }

function badge(status) { return h("span", { className: `badge ${status}`, "data-status": status }, status); }

function progressBar(task) {
  const pct = Math.max(0, Math.min(100, task.progress || 0));
  return h("div", { className: `bar ${task.status}`, role: "progressbar", "aria-valuenow": pct.toFixed(1) },
    h("div", { style: `width:${pct}%` }), h("span", {}, `${pct.toFixed(1)}%`));
}

function hashQuery() {
  const at = location.hash.indexOf("?");
  return new URLSearchParams(at < 0 ? "" : location.hash.slice(at + 1));
}

// ---------------------------------------------------------------- API calls and the key

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function errorText(data, fallback) {
  if (data && typeof data.detail === "string") return data.detail;
  if (data && data.error && data.error.message) return data.error.message;
  if (data && data.detail) return JSON.stringify(data.detail);
  return fallback;
}

function askKey(reason) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("#key-dialog");
  $("#key-reason").textContent = reason;
  $("#api-key").value = "";
  dialog.returnValue = "";
  keyPrompt = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      keyPrompt = null;
      keyDeclined = dialog.returnValue !== "save";
      resolve(!keyDeclined);
    }, { once: true });
  });
  if (!dialog.open) dialog.showModal();
  $("#api-key").focus();
  return keyPrompt;
}

function setKey(key) {
  apiKey = key;
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
  $("#key-button").textContent = key ? "API key ✓" : "API key";
}

/** fetch with the key; on 401 ask for it and try again. `raw`: return the Response (for streams). */
async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  for (;;) {
    const headers = {};
    if (apiKey) headers.Authorization = `Bearer ${apiKey}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (response.status === 401) {
      if (keyDeclined) throw new ApiError(401, "this server needs an API key: use the API key button");
      const saved = await askKey(apiKey ? "The server refused this key; enter the right one."
        : "This server needs an API key.");
      if (!saved) throw new ApiError(401, "an API key is needed: use the API key button");
      continue;
    }
    if (raw && response.ok) return response;
    const data = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, errorText(data, `${response.status} ${response.statusText}`));
    return data;
  }
}

/** Server-sent events of a streaming POST, as parsed JSON payloads, until [DONE]. */
async function* sseEvents(path, body, signal) {
  const response = await api(path, { method: "POST", body, signal, raw: true });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---------------------------------------------------------------- views and their timers

let current = null; // the view's context: its timers stop and its streams abort when the view changes

function newContext() {
  const ctx = {
    alive: true, timers: new Set(), aborts: new Set(),
    /** run fn now and then every `ms` after it finishes, while the view is shown */
    poll(fn, ms) {
      const tick = async () => {
        if (!ctx.alive) return;
        try { await fn(); } catch (err) { if (err.status !== 401) console.warn(err); }
        if (ctx.alive) ctx.timers.add(setTimeout(tick, typeof ms === "function" ? ms() : ms));
      };
      tick();
    },
    controller() { const c = new AbortController(); ctx.aborts.add(c); return c; },
    close() {
      ctx.alive = false;
      ctx.timers.forEach(clearTimeout);
      ctx.aborts.forEach((c) => c.abort());
    },
  };
  return ctx;
}

const ROUTES = [
  [/^#?\/?(tasks)?$/, "tasks", tasksView],
  [/^#\/tasks\/([\w.-]+)$/, "tasks", taskView],
  [/^#\/train$/, "train", trainView],
  [/^#\/models$/, "models", modelsView],
  [/^#\/playground$/, "playground", playgroundView],
  [/^#\/evaluate$/, "evaluate", evaluateView],
  [/^#\/workers$/, "workers", workersView],
];

function render() {
  if (current) current.close();
  current = newContext();
  const path = location.hash.split("?")[0];
  const [match, name, view] = ROUTES.map(([re, n, v]) => [path.match(re), n, v]).find(([m]) => m)
    || [[], "tasks", tasksView];
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === name);
  const main = $("#view");
  main.replaceChildren();
  main.dataset.view = name;
  health();
  Promise.resolve(view(main, current, ...match.slice(1))).catch((err) => {
    append(main, h("div", { className: "error" }, err.message));
  });
}

function errorBox(id) { return h("div", { className: "error", id }); }
function showError(box, err) { box.textContent = err ? (err.message || String(err)) : ""; }

// ---------------------------------------------------------------- tasks

function tasksView(main, ctx) {
  const filter = h("select", { id: "status-filter", onchange: () => refresh() },
    ["", "pending", "running", "completed", "failed", "cancelled"].map((v) => h("option", { value: v }, v || "all")));
  const body = h("tbody");
  const error = errorBox("tasks-error");
  append(main,
    h("h1", {}, "Tasks", h("span", { className: "spacer" }),
      h("a", { className: "button", href: "#/train", id: "new-training" }, "New training")),
    h("div", { className: "panel" },
      h("div", { className: "row" }, h("label", { className: "check" }, "Status", filter),
        h("span", { className: "muted", id: "tasks-count" })),
      error,
      h("table", { id: "task-table" },
        h("thead", {}, h("tr", {}, ["Task", "Kind", "Status", "Progress", "Step", "Loss", "Eval loss", "Model",
          "Dataset", "Created"].map((t, i) => h("th", { className: i >= 4 && i <= 6 ? "num" : "" }, t)))),
        body)));

  async function refresh() {
    const query = filter.value ? `&status=${filter.value}` : "";
    const { tasks } = await api(`/train/history?limit=200${query}`);
    showError(error, null);
    $("#tasks-count").textContent = `${tasks.length} task${tasks.length === 1 ? "" : "s"}`;
    if (!tasks.length) {
      replace(body, h("tr", {}, h("td", { colspan: 10, className: "empty" },
        "No tasks yet. ", h("a", { href: "#/train" }, "Start a training"), ".")));
      return;
    }
    replace(body, tasks.map((t) => h("tr", { "data-task-id": t.task_id, className: `task-row ${t.status}` },
      h("td", {}, h("a", { href: `#/tasks/${t.task_id}`, className: "mono" }, shortId(t.task_id))),
      h("td", {}, h("span", { className: "badge kind" }, t.kind || "train")),
      h("td", {}, badge(t.status)),
      h("td", {}, progressBar(t)),
      h("td", { className: "num" }, t.total_steps ? `${t.current_step} / ${t.total_steps}` : t.current_step || "–"),
      h("td", { className: "num" }, fmt(t.loss)),
      h("td", { className: "num" }, fmt(t.eval_loss)),
      h("td", { className: "mono", title: t.base_model || "" }, tail(t.base_model, 2) || "–"),
      h("td", { className: "mono", title: t.dataset_path || "" }, tail(t.dataset_path, 2) || "–"),
      h("td", { title: t.created_at || "" }, when(t.created_at)))));
  }
  ctx.poll(() => refresh().catch((err) => { showError(error, err); throw err; }), 2000);
}

// ---------------------------------------------------------------- workers

function workersView(main, ctx) {
  const body = h("tbody");
  const error = errorBox("workers-error");
  append(main,
    h("h1", {}, "Workers"),
    h("div", { className: "panel" },
      h("p", { className: "muted" }, "Every process taking tasks from this service's database: ",
        h("code", {}, "gpt-service serve"), " with its built-in worker, and ", h("code", {}, "gpt-service worker"), "."),
      error,
      h("table", { id: "worker-table" },
        h("thead", {}, h("tr", {}, ["Worker", "Host", "Device", "Memory", "Last heartbeat", "State", "Tasks"]
          .map((t) => h("th", {}, t)))),
        body)));

  async function refresh() {
    const { workers } = await api("/workers");
    showError(error, null);
    if (!workers.length) {
      replace(body, h("tr", {}, h("td", { colspan: 7, className: "empty" }, "No worker has registered yet.")));
      return;
    }
    replace(body, workers.map((w) => h("tr", { "data-worker": w.name, className: "worker-row" },
      h("td", { className: "mono" }, w.name),
      h("td", { className: "mono" }, `${w.host} (pid ${w.pid})`),
      h("td", {}, `${w.device} × ${w.device_count}`),
      h("td", { className: "num" }, `${fmt(w.memory_gb, 1)} GB`),
      h("td", { title: w.last_heartbeat_at }, `${fmt(w.heartbeat_age_seconds, 1)} s ago`),
      h("td", {}, badge(w.alive ? "alive" : "lost")),
      h("td", {}, w.tasks.length ? w.tasks.map((id) => h("a", { href: `#/tasks/${id}`, className: "mono" },
        shortId(id), " ")) : "idle"))));
  }
  ctx.poll(() => refresh().catch((err) => { showError(error, err); throw err; }), 2000);
}

// ---------------------------------------------------------------- one task

function drawChart(svg, series) {
  const W = 1000, H = 340, L = 64, R = 18, T = 14, B = 40;
  svg.replaceChildren();
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const all = series.flatMap((x) => x.points);
  for (const one of series) svg.setAttribute(`data-${one.cls}-points`, one.points.length);
  if (!all.length) {
    svg.append(s("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafbfc" }));
    const text = s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "nodata" });
    text.textContent = "No points yet: the curve grows as the training logs its loss.";
    svg.append(text);
    return;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p.step)), Math.max(...all.map((p) => p.step))];
  let [y0, y1] = [Math.min(...all.map((p) => p.value)), Math.max(...all.map((p) => p.value))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const pad = (y1 - y0) * 0.06;
  y0 -= pad; y1 += pad;
  const X = (v) => L + ((v - x0) / (x1 - x0)) * (W - L - R);
  const Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
  for (const tick of niceTicks(y0, y1, 5)) {
    svg.append(s("line", { x1: L, x2: W - R, y1: Y(tick), y2: Y(tick), class: "gridline" }));
    const label = s("text", { x: L - 6, y: Y(tick) + 4, "text-anchor": "end", class: "tick" });
    label.textContent = String(Number(tick.toPrecision(6)));
    svg.append(label);
  }
  for (const tick of niceTicks(x0, x1, 8).filter((v) => Number.isInteger(v))) {
    const label = s("text", { x: X(tick), y: H - B + 16, "text-anchor": "middle", class: "tick" });
    label.textContent = String(tick);
    svg.append(label);
  }
  const caption = s("text", { x: W - R, y: H - 4, "text-anchor": "end", class: "tick" });
  caption.textContent = "step";
  svg.append(caption,
    s("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }),
    s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
  for (const one of series) {
    if (!one.points.length) continue;
    svg.append(s("polyline", {
      class: `series ${one.cls}`, "data-series": one.cls,
      points: one.points.map((p) => `${X(p.step).toFixed(1)},${Y(p.value).toFixed(1)}`).join(" "),
    }));
    if (one.points.length <= 200) {
      for (const p of one.points) {
        const dot = s("circle", { cx: X(p.step).toFixed(1), cy: Y(p.value).toFixed(1), r: 2.6, class: one.cls });
        const tip = s("title", {});
        tip.textContent = `step ${p.step}: ${one.label} ${fmt(p.value)}`;
        dot.append(tip);
        svg.append(dot);
      }
    }
  }
}

function niceTicks(lo, hi, count) {
  const span = hi - lo;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => span / st <= count) || 10 * mag;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function flatten(obj, prefix = "") {
  return Object.entries(obj || {}).flatMap(([k, v]) => (v && typeof v === "object" && !Array.isArray(v)
    ? flatten(v, `${prefix}${k}.`) : [[`${prefix}${k}`, Array.isArray(v) ? v.join(", ") : v]]));
}

async function taskView(main, ctx, taskId) {
  const error = errorBox("task-error");
  const title = h("h1", {}, "Task ", h("span", { className: "mono" }, taskId));
  const cancel = h("button", { id: "cancel-task", className: "danger", disabled: true, onclick: () => act("cancel") },
    "Cancel");
  const resume = h("button", { id: "resume-task", className: "ghost", disabled: true, onclick: () => act("resume") },
    "Resume");
  const loadLink = h("a", { id: "load-task-adapter", className: "button ghost", hidden: true }, "Load the adapter");
  const overview = h("div", { id: "task-overview" });
  const svg = s("svg", { id: "loss-chart", class: "chart", role: "img", "aria-label": "loss and eval loss by step" });
  const params = h("tbody");
  const log = h("pre", { className: "log", id: "log-tail" });
  const result = h("div", { id: "task-result" });
  const chartPanel = h("div", { className: "panel", id: "chart-panel" },
    h("h2", {}, "Loss"), svg,
    h("div", { className: "legend" },
      h("span", {}, h("span", { className: "swatch", style: "background:var(--loss)" }), "loss (training)"),
      h("span", {}, h("span", { className: "swatch", style: "background:var(--eval)" }), "eval loss (validation)")));
  append(main, title,
    h("div", { className: "panel" }, h("div", { className: "row" }, cancel, resume, loadLink,
      h("a", { href: "#/tasks", className: "button ghost" }, "All tasks")), error, overview),
    chartPanel, result,
    h("div", { className: "grid2" },
      h("div", { className: "panel" }, h("h2", {}, "Log tail"), log),
      h("div", { className: "panel" }, h("h2", {}, "Parameters"), h("table", { className: "kv", id: "params" }, params))));

  let task = null;
  let configShown = false;

  async function act(what) {
    try {
      cancel.disabled = resume.disabled = true;
      await api(`/train/${taskId}/${what}`, { method: "POST" });
      showError(error, null);
      await refresh();
    } catch (err) { showError(error, err); }
  }

  async function refresh() {
    task = await api(`/train/status/${taskId}`);
    replace(title, "Task ", h("span", { className: "mono" }, taskId), badge(task.status),
      h("span", { className: "badge kind" }, task.kind || "train"));
    cancel.disabled = !ACTIVE.has(task.status) || task.cancel_requested;
    cancel.textContent = task.cancel_requested && ACTIVE.has(task.status) ? "Cancelling…" : "Cancel";
    resume.disabled = !["failed", "cancelled"].includes(task.status);
    if (task.status === "completed" && task.adapter_path) {
      loadLink.hidden = false;
      const q = new URLSearchParams({ base: task.base_model || "", adapter: task.adapter_path, name: `task-${shortId(taskId)}` });
      loadLink.href = `#/models?${q}`;
    }
    const eta = ACTIVE.has(task.status) ? duration(task.eta_seconds) : "–";
    const stats = [
      ["step", task.total_steps ? `${task.current_step} / ${task.total_steps}` : task.current_step],
      ["epoch", fmt(task.epoch, 2)], ["loss", fmt(task.loss)], ["eval loss", fmt(task.eval_loss)],
      ["learning rate", fmt(task.learning_rate)], ["tokens / s", fmt(task.tokens_per_second, 0)], ["ETA", eta],
      ["started", when(task.started_at)], ["finished", when(task.finished_at)], ["attempts", task.attempts],
      ["worker", task.worker || "–"],
    ];
    replace(overview, progressBar(task),
      h("div", { className: "stats" }, stats.map(([k, v]) => h("div", { className: "stat" }, h("small", {}, k), h("b", {}, v)))),
      task.adapter_path ? h("p", { className: "hint" }, "adapter: ", h("code", {}, task.adapter_path)) : null,
      task.error ? h("div", { className: "error", id: "task-failure" }, task.error) : null);
    if (task.kind === "evaluate") {
      chartPanel.hidden = true;
      replace(result, task.result ? h("div", { className: "panel" }, h("h2", {}, "Evaluation result"),
        comparisonTable([{ label: task.result.model_name, result: task.result }]),
        h("p", {}, h("a", { href: "#/evaluate" }, "Compare with other evaluations"))) : null);
    } else {
      const metrics = await api(`/train/${taskId}/metrics`);
      drawChart(svg, [
        { cls: "loss", label: "loss", points: metrics.loss },
        { cls: "eval-loss", label: "eval loss", points: metrics.eval_loss },
      ]);
    }
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 30;
    const { lines } = await api(`/train/${taskId}/logs?tail=300`);
    log.textContent = lines.length ? lines.join("\n") : "(no log lines yet)";
    if (atBottom) log.scrollTop = log.scrollHeight;
    if (!configShown) {
      const { config } = await api(`/train/${taskId}/config`);
      replace(params, flatten(config).map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v === null ? "–" : String(v)))));
      configShown = true;
    }
  }
  ctx.poll(() => refresh().catch((err) => { showError(error, err); throw err; }),
    () => (task && ACTIVE.has(task.status) ? 1000 : 4000));
}

// ---------------------------------------------------------------- lists for the forms

async function fileLists() {
  const [datasets, models] = await Promise.all([api("/files/datasets"), api("/files/models")]);
  return { datasets, models };
}

function options(select, items, { placeholder } = {}) {
  replace(select, placeholder ? h("option", { value: "" }, placeholder) : null,
    items.map(([value, label, extra]) => h("option", { value, ...(extra || {}) }, label)));
}

/** A model picker: the folders under models/, or a hub id typed in. */
function modelPicker(id, models) {
  const select = h("select", { id, required: true });
  const hub = h("input", { id: `${id}-hub`, placeholder: "org/name (in the Hugging Face cache)", hidden: true });
  options(select, [...models.models.map((m) => [m.path, m.path]), ["__hub__", "a hub id…"]]);
  select.addEventListener("change", () => { hub.hidden = select.value !== "__hub__"; });
  hub.hidden = select.value !== "__hub__";
  return {
    select, hub,
    value: () => (select.value === "__hub__" ? hub.value.trim() : select.value),
    set(value) {
      if (!value) return;
      // a task shows its base model resolved: /abs/workspace/models/tiny is the option models/tiny
      const known = [...select.options].find((o) => o.value !== "__hub__"
        && (o.value === value || value.endsWith(`/${o.value}`)));
      if (known) { select.value = known.value; hub.hidden = true; }
      else { select.value = "__hub__"; hub.value = value; hub.hidden = false; }
    },
  };
}

// ---------------------------------------------------------------- new training

async function trainView(main) {
  const error = errorBox("train-error");
  const { datasets, models } = await fileLists();
  const dataset = h("select", { id: "dataset", required: true });
  options(dataset, datasets.datasets.map((d) => [d.path, `${d.path} (${d.format}, ${bytes(d.size_bytes)})`]));
  const base = modelPicker("base-model", models);
  const num = (name, placeholder, step = "any", min = 0) => h("input", { name, type: "number", step, min, placeholder });
  const text = (name, placeholder) => h("input", { name, placeholder });
  const field = (label, input, cls) => h("label", { className: cls }, label, input);
  const form = h("form", { id: "train-form", className: "panel", onsubmit: submit },
    h("fieldset", {}, h("legend", {}, "What to train"),
      h("div", { className: "fields" },
        field(`Dataset (under ${datasets.root}/)`, dataset, "wide"),
        field(`Base model (under ${models.root}/)`, h("div", { className: "row" }, base.select, base.hub), "wide"),
        field("Output folder", text("output_dir", `default: a new folder under ${models.root}/checkpoints/`), "wide"),
        field("Format", h("select", { name: "dataset_format" },
          ["", "json", "jsonl", "txt"].map((v) => h("option", { value: v }, v || "from the extension")))))),
    h("fieldset", {}, h("legend", {}, "Training"),
      h("div", { className: "fields" },
        field("Epochs", num("num_epochs", "3", 1, 1)), field("Batch size", num("batch_size", "4", 1, 1)),
        field("Learning rate", num("learning_rate", "2e-4")), field("Max length (tokens)", num("max_length", "1024", 1, 8)),
        field("Validation split", num("validation_split", "0.1")), field("Warm-up steps", num("warmup_steps", "0", 1)),
        field("Eval every (steps)", num("eval_steps", "500", 1, 1)), field("Checkpoint every (steps)", num("save_steps", "500", 1, 1)),
        field("LR schedule", h("select", { name: "lr_scheduler_type" },
          ["", "linear", "cosine", "constant"].map((v) => h("option", { value: v }, v || "default")))),
        field("Seed", num("seed", "42", 1)))),
    h("fieldset", {}, h("legend", {}, "LoRA"),
      h("div", { className: "fields" },
        field("Rank r", num("lora.r", "16", 1, 1)), field("Alpha", num("lora.lora_alpha", "32")),
        field("Dropout", num("lora.lora_dropout", "0.05")),
        field("Target modules", h("input", { name: "lora.target_modules", placeholder: "q_proj,k_proj,v_proj,o_proj or all-linear" }), "wide"))),
    h("fieldset", {}, h("legend", {}, "More"),
      h("div", { className: "row" },
        h("label", { className: "check" }, h("input", { type: "checkbox", name: "train_on_prompt" }), "train on prompts too"),
        h("label", { className: "check" }, h("input", { type: "checkbox", name: "overwrite_output_dir" }), "overwrite the output folder")),
      h("label", {}, "Other request fields, as JSON (any field of POST /train)",
        h("textarea", { name: "extra", rows: 2, placeholder: '{"gradient_accumulation_steps": 2}' }))),
    h("p", { className: "hint" }, "Blank fields take the server's defaults (config/models.yaml)."),
    error,
    h("div", { className: "row" }, h("button", { type: "submit", id: "start-training" }, "Start training")));
  append(main, h("h1", {}, "New training"), form);
  if (!datasets.datasets.length) {
    showError(error, `No dataset under ${datasets.root}/: put a .json, .jsonl or .txt file there.`);
  }

  async function submit(event) {
    event.preventDefault();
    const body = { dataset_path: dataset.value, base_model: base.value() };
    const lora = {};
    for (const input of form.querySelectorAll("input[name], select[name]")) {
      if (input.type === "checkbox") {
        if (input.checked) body[input.name] = true;
        continue;
      }
      const raw = input.value.trim();
      if (!raw) continue;
      const value = input.type === "number" ? Number(raw) : raw;
      if (input.name.startsWith("lora.")) {
        const key = input.name.slice(5);
        lora[key] = key === "target_modules" && raw !== "all-linear" ? raw.split(",").map((m) => m.trim()).filter(Boolean) : value;
      } else body[input.name] = value;
    }
    if (Object.keys(lora).length) body.lora_config = lora;
    const extra = form.querySelector("textarea[name=extra]").value.trim();
    try {
      if (extra) Object.assign(body, JSON.parse(extra));
      const button = $("#start-training");
      button.disabled = true;
      const accepted = await api("/train", { method: "POST", body }).finally(() => { button.disabled = false; });
      location.hash = `#/tasks/${accepted.task_id}`;
    } catch (err) {
      showError(error, err instanceof SyntaxError ? `the JSON field: ${err.message}` : err);
    }
  }
}

// ---------------------------------------------------------------- models

async function modelsView(main, ctx) {
  const error = errorBox("models-error");
  const notice = h("div", { className: "notice", id: "models-notice" });
  const body = h("tbody");
  const { models } = await fileLists();
  const base = modelPicker("load-base", models);
  const adapter = h("select", { id: "load-adapter" });
  options(adapter, models.adapters.map((a) => [a.path, a.path + (a.checkpoint ? " (checkpoint)" : "")]),
    { placeholder: "none: the base model alone" });
  const name = h("input", { id: "load-name", required: true, pattern: "[\\w.:/@+\\-]+", placeholder: "my-model" });
  const dtype = h("select", { id: "load-dtype" }, ["", "auto", "float32", "bfloat16", "float16"].map((v) =>
    h("option", { value: v }, v || "server default")));
  const replaceBox = h("input", { type: "checkbox", id: "load-replace" });
  const loadButton = h("button", { type: "submit", id: "load-model" }, "Load");
  adapter.addEventListener("change", () => {
    const chosen = models.adapters.find((a) => a.path === adapter.value);
    const match = chosen && chosen.base_model && models.models.find((m) => chosen.base_model === m.path
      || chosen.base_model.endsWith(`/${m.path}`));
    if (match) base.set(match.path);
    if (chosen && !name.value) name.value = chosen.path.split("/").filter((p) => p !== "lora_adapter").pop();
  });
  const form = h("form", { id: "load-form", className: "panel", onsubmit: load },
    h("h2", {}, "Load a model"),
    h("div", { className: "fields" },
      h("label", {}, "Name requests will use", name),
      h("label", { className: "wide" }, "Base model", h("div", { className: "row" }, base.select, base.hub)),
      h("label", { className: "wide" }, "LoRA adapter", adapter),
      h("label", {}, "Precision", dtype)),
    h("div", { className: "row", style: "margin-top:10px" }, loadButton,
      h("label", { className: "check" }, replaceBox, "replace a model of this name")),
    error, notice);
  append(main, h("h1", {}, "Models"),
    h("div", { className: "panel" }, h("h2", {}, "Loaded"),
      h("table", { id: "models-table" }, h("thead", {}, h("tr", {}, ["Name", "Base model", "Adapter", "Precision",
        "Memory", "Context", "Busy", ""].map((t) => h("th", {}, t)))), body)),
    form);

  const query = hashQuery();
  base.set(query.get("base"));
  if (query.get("adapter")) {
    const path = query.get("adapter");
    const known = models.adapters.find((a) => path === a.path || path.endsWith(`/${a.path}`));
    if (!known) adapter.append(h("option", { value: path }, path));
    adapter.value = known ? known.path : path;
  }
  if (query.get("name")) name.value = query.get("name");

  async function load(event) {
    event.preventDefault();
    showError(error, null);
    notice.textContent = "";
    const body = { model_name: name.value.trim(), model_path: base.value(), replace: replaceBox.checked };
    if (adapter.value) body.lora_adapter = adapter.value;
    if (dtype.value) body.dtype = dtype.value;
    loadButton.disabled = true;
    loadButton.textContent = "Loading…";
    try {
      const info = await api("/models/load", { method: "POST", body });
      notice.replaceChildren(`Loaded ${info.model_name || body.model_name}. `,
        h("a", { href: `#/playground?model=${encodeURIComponent(body.model_name)}`, id: "try-model" }, "Try it in the playground"));
      await refresh();
    } catch (err) { showError(error, err); } finally {
      loadButton.disabled = false;
      loadButton.textContent = "Load";
    }
  }

  async function unload(modelName) {
    try {
      await api(`/models/${encodeURIComponent(modelName)}`, { method: "DELETE" });
      await refresh();
    } catch (err) { showError(error, err); }
  }

  async function refresh() {
    const list = (await api("/models")).models;
    if (!list.length) {
      replace(body, h("tr", {}, h("td", { colspan: 8, className: "empty" }, "No model is loaded.")));
      return;
    }
    replace(body, list.map((m) => h("tr", { "data-model": m.model_name },
      h("td", {}, h("b", {}, m.model_name)),
      h("td", { className: "mono", title: m.base_model }, tail(m.base_model, 2)),
      h("td", { className: "mono", title: m.lora_adapter || "" }, tail(m.lora_adapter, 4) || "–"),
      h("td", {}, m.dtype),
      h("td", { title: "base weights + adapter" }, `${bytes(m.base_memory_bytes)}${m.adapter_memory_bytes ? ` + ${bytes(m.adapter_memory_bytes)}` : ""}`),
      h("td", { className: "num" }, m.context_length),
      h("td", { className: "num", title: "running / waiting requests" }, `${m.running} / ${m.waiting}`),
      h("td", {}, h("a", { href: `#/playground?model=${encodeURIComponent(m.model_name)}` }, "try"), " ",
        h("button", { className: "danger small unload", "data-name": m.model_name,
          onclick: () => unload(m.model_name) }, "Unload")))));
  }
  ctx.poll(() => refresh().catch((err) => { showError(error, err); throw err; }), 3000);
}

// ---------------------------------------------------------------- playground

async function playgroundView(main, ctx) {
  const error = errorBox("play-error");
  const { models } = await api("/models");
  const wanted = new Set(hashQuery().getAll("model"));
  if (!wanted.size && models.length) wanted.add(models[models.length - 1].model_name);
  const picks = h("div", { className: "pick", id: "play-models" }, models.length ? models.map((m) =>
    h("label", { className: "check" }, h("input", { type: "checkbox", className: "play-model", value: m.model_name,
      checked: wanted.has(m.model_name) }), m.model_name,
    m.lora_adapter ? h("span", { className: "badge kind" }, "adapter") : null))
    : h("span", {}, "No model is loaded: ", h("a", { href: "#/models" }, "load one"), "."));
  const mode = h("select", { id: "play-mode" },
    h("option", { value: "completion" }, "completion: the prompt as written (POST /generate)"),
    h("option", { value: "chat" }, "chat: the model's chat template (POST /v1/chat/completions)"));
  const prompt = h("textarea", { id: "prompt", rows: 5, placeholder: "用户：介绍一下Python\n助手：" });
  const maxTokens = h("input", { id: "max-tokens", type: "number", min: 1, value: 128 });
  const temperature = h("input", { id: "temperature", type: "number", min: 0, max: 2, step: "any", value: 0 });
  const topP = h("input", { id: "top-p", type: "number", min: 0.01, max: 1, step: "any", value: 1 });
  const seed = h("input", { id: "seed", type: "number", min: 0, placeholder: "none" });
  const stop = h("input", { id: "stop", placeholder: "e.g. \\n用户：" });
  const go = h("button", { type: "submit", id: "generate" }, "Generate");
  const halt = h("button", { type: "button", id: "stop-generation", className: "ghost", disabled: true }, "Stop");
  const outputs = h("div", { className: "outputs", id: "outputs" });
  const form = h("form", { className: "panel", id: "play-form", onsubmit: run },
    h("label", {}, "Models (several answer side by side)", picks),
    h("div", { className: "fields", style: "margin-top:10px" },
      h("label", { className: "full" }, "Prompt", prompt),
      h("label", { className: "wide" }, "Mode", mode),
      h("label", {}, "Max tokens", maxTokens), h("label", {}, "Temperature", temperature),
      h("label", {}, "Top p", topP), h("label", {}, "Seed", seed), h("label", {}, "Stop at", stop)),
    h("div", { className: "row", style: "margin-top:10px" }, go, halt,
      h("span", { className: "hint" }, "Ctrl+Enter generates; answers stream as they are made.")),
    error);
  prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit(); });
  append(main, h("h1", {}, "Playground"), form, outputs);

  let controller = null;
  halt.addEventListener("click", () => controller && controller.abort());

  async function run(event) {
    event.preventDefault();
    showError(error, null);
    const chosen = [...form.querySelectorAll(".play-model:checked")].map((c) => c.value);
    if (!chosen.length) { showError(error, "choose a loaded model"); return; }
    if (controller) controller.abort();
    controller = ctx.controller();
    const sampling = { max_tokens: Number(maxTokens.value), temperature: Number(temperature.value), top_p: Number(topP.value) };
    if (seed.value !== "") sampling.seed = Number(seed.value);
    if (stop.value) sampling.stop = stop.value.replace(/\\n/g, "\n");
    go.disabled = true;
    halt.disabled = false;
    replace(outputs, ...chosen.map(() => null));
    const runs = chosen.map((name) => streamInto(name, sampling, controller.signal));
    await Promise.allSettled(runs);
    go.disabled = false;
    halt.disabled = true;
  }

  async function streamInto(name, sampling, signal) {
    const text = h("div", { className: "text streaming" });
    const answer = h("span", { className: "answer" });
    const meta = h("div", { className: "meta" }, "waiting…");
    if (mode.value === "completion") append(text, h("span", { className: "prompt" }, prompt.value));
    text.append(answer);
    outputs.append(h("div", { className: "output", "data-model": name }, h("h3", {}, name), text, meta));
    const started = performance.now();
    let first = null, pieces = 0, finish = null, usage = null;
    try {
      const chat = mode.value === "chat";
      const events = chat
        ? sseEvents("/v1/chat/completions", { model: name, messages: [{ role: "user", content: prompt.value }],
          stream: true, stream_options: { include_usage: true }, ...sampling }, signal)
        : sseEvents("/generate", { model_name: name, prompt: prompt.value, stream: true, ...sampling }, signal);
      for await (const event of events) {
        let piece = "";
        if (chat) {
          const choice = (event.choices || [])[0];
          piece = (choice && choice.delta && choice.delta.content) || "";
          finish = (choice && choice.finish_reason) || finish;
          usage = event.usage || usage;
        } else {
          piece = event.text || "";
          finish = event.finish_reason || finish;
          usage = event.usage || usage;
          if (event.error) throw new Error(event.error);
        }
        if (piece) {
          if (first === null) first = performance.now() - started;
          pieces += 1;
          answer.textContent += piece;
          meta.dataset.pieces = pieces;
        }
        meta.textContent = `${pieces} pieces, first after ${fmt((first || 0) / 1000, 2)} s…`;
      }
      const seconds = (performance.now() - started) / 1000;
      const tokens = usage ? usage.completion_tokens : pieces;
      meta.textContent = `${tokens} tokens in ${seconds.toFixed(2)} s (${(tokens / seconds).toFixed(1)}/s), `
        + `first after ${fmt((first || 0) / 1000, 2)} s, finish: ${finish || "–"}`;
      meta.dataset.done = "true";
    } catch (err) {
      meta.textContent = err.name === "AbortError" ? "stopped" : "";
      if (err.name !== "AbortError") append(meta, h("span", { className: "error" }, err.message));
    } finally {
      text.classList.remove("streaming");
    }
  }
}

// ---------------------------------------------------------------- evaluation

const FIGURES = [
  ["loss", "loss", (v) => fmt(v), -1], ["perplexity", "perplexity", (v) => fmt(v, 3), -1],
  ["token accuracy", "token_accuracy", (v) => percent(v), 1], ["exact match", "exact_match", (v) => percent(v), 1],
  ["chrF", "chrf", (v) => fmt(v, 2), 1],
];

function storedEvaluations() {
  try { return JSON.parse(localStorage.getItem(EVAL_STORE) || "[]"); } catch { return []; }
}

/** The last folders of a path: enough to tell runs apart. */
function tail(path, parts = 3) {
  return path ? path.split("/").filter(Boolean).slice(-parts).join("/") : "";
}

/** Figures of several results side by side: one column each (and its base, when compared), best in bold. */
function comparisonTable(entries) {
  const columns = [];
  for (const { label, result } of entries) {
    columns.push({ label, sub: tail(result.lora_adapter || result.model_path), metrics: result.metrics, result });
    if (result.base_metrics) {
      columns.push({ label: `${label}: base`, sub: tail(result.model_path), metrics: result.base_metrics, result, base: true,
        difference: result.difference });
    }
  }
  const head = h("tr", {}, h("th", {}, "metric"), columns.map((c) => h("th", { className: "num" }, c.label,
    h("span", { className: "sub" }, c.sub))));
  const rows = FIGURES.map(([label, key, show, better]) => {
    const values = columns.map((c) => c.metrics[key]);
    const known = values.filter((v) => v !== null && v !== undefined);
    const best = known.length > 1 ? (better < 0 ? Math.min(...known) : Math.max(...known)) : null;
    return h("tr", { "data-metric": key }, h("td", {}, label), columns.map((c, i) => {
      const diff = c.base && c.difference ? c.difference[key] : null;
      const cell = h("td", { className: `num${values[i] === best ? " best" : ""}` }, show(values[i]));
      if (diff !== null && diff !== undefined) {
        const good = diff * better > 0;
        append(cell, h("div", { className: good ? "gain" : "loss-d", title: "adapter − base" },
          `adapter ${diff > 0 ? "+" : ""}${key.includes("accuracy") || key === "exact_match" ? percent(diff) : fmt(diff, 3)}`));
      }
      return cell;
    }));
  });
  const info = [["dataset", (r) => (r.dataset_path || "–").split("/").slice(-2).join("/")], ["samples", (r) => r.samples],
    ["answered", (r) => r.generated_samples], ["time", (r) => `${fmt(r.time_seconds, 1)} s`]];
  const infoRows = info.map(([label, get]) => h("tr", {}, h("td", { className: "muted" }, label),
    columns.map((c) => h("td", { className: "num muted" }, c.base ? "" : get(c.result)))));
  return h("table", { className: "cmp", id: "eval-table" }, h("thead", {}, head), h("tbody", {}, rows, infoRows));
}

async function evaluateView(main, ctx) {
  const error = errorBox("eval-error");
  const notice = h("div", { className: "notice", id: "eval-notice" });
  const [{ datasets, models }, loaded] = await Promise.all([fileLists(), api("/models")]);
  const source = h("select", { id: "eval-model" });
  options(source, [
    ...loaded.models.map((m) => [`name:${m.model_name}`, `${m.model_name} (loaded${m.lora_adapter ? ", adapter" : ""})`]),
    ...models.models.map((m) => [`path:${m.path}`, `${m.path} (folder)`]),
  ]);
  const adapter = h("select", { id: "eval-adapter" });
  options(adapter, models.adapters.filter((a) => !a.checkpoint).map((a) => [a.path, a.path]), { placeholder: "none" });
  const dataset = h("select", { id: "eval-dataset" });
  options(dataset, datasets.datasets.map((d) => [d.path, d.path]));
  const maxSamples = h("input", { id: "eval-max-samples", type: "number", min: 1, placeholder: "all" });
  const compare = h("input", { type: "checkbox", id: "eval-compare" });
  const generation = h("select", { id: "eval-generation" },
    h("option", { value: "" }, "when the data has references"), h("option", { value: "true" }, "yes"),
    h("option", { value: "false" }, "no: loss and accuracy only"));
  const adapterLabel = h("label", { className: "wide" }, "LoRA adapter (with a folder)", adapter);
  const syncAdapter = () => { adapterLabel.hidden = !source.value.startsWith("path:"); };
  source.addEventListener("change", syncAdapter);
  syncAdapter();
  const runButton = h("button", { type: "submit", id: "run-evaluation" }, "Evaluate");
  const form = h("form", { className: "panel", id: "eval-form", onsubmit: run },
    h("h2", {}, "Evaluate a model or adapter"),
    h("div", { className: "fields" },
      h("label", { className: "wide" }, "Model", source), adapterLabel,
      h("label", { className: "wide" }, "Dataset", dataset), h("label", {}, "Max samples", maxSamples),
      h("label", { className: "wide" }, "Generate answers", generation)),
    h("div", { className: "row", style: "margin-top:10px" }, runButton,
      h("label", { className: "check" }, compare, "compare with the base model")),
    error, notice);
  const picks = h("div", { className: "pick", id: "eval-picks" });
  const table = h("div", { id: "eval-compare-table" });
  const examples = h("div", { className: "examples", id: "eval-examples" });
  append(main, h("h1", {}, "Evaluation"), form,
    h("div", { className: "panel" }, h("h2", {}, "Results side by side"), picks, h("div", { style: "overflow-x:auto;margin-top:10px" }, table)),
    h("div", { className: "panel" }, h("h2", {}, "Sample answers"), examples));

  let entries = [];
  const hidden = new Set();

  async function run(event) {
    event.preventDefault();
    showError(error, null);
    notice.textContent = "";
    const body = { dataset_path: dataset.value, compare_to_base: compare.checked };
    if (source.value.startsWith("name:")) body.model_name = source.value.slice(5);
    else {
      body.model_path = source.value.slice(5);
      if (adapter.value) body.lora_adapter = adapter.value;
    }
    if (maxSamples.value) body.max_samples = Number(maxSamples.value);
    if (generation.value) body.generation = generation.value === "true";
    runButton.disabled = true;
    runButton.textContent = "Evaluating…";
    try {
      const answer = await api("/evaluate", { method: "POST", body });
      if (answer.task_id) {
        notice.replaceChildren(`${answer.samples} samples: queued as task `,
          h("a", { href: `#/tasks/${answer.task_id}` }, shortId(answer.task_id)), "; its result appears here when it is done.");
      } else {
        const saved = storedEvaluations();
        saved.unshift({ id: `local-${Date.now()}`, at: new Date().toISOString(), result: answer });
        localStorage.setItem(EVAL_STORE, JSON.stringify(saved.slice(0, 20)));
        notice.textContent = `Evaluated ${answer.model_name} on ${answer.samples} samples in ${fmt(answer.time_seconds, 1)} s.`;
      }
      await refresh();
    } catch (err) { showError(error, err); } finally {
      runButton.disabled = false;
      runButton.textContent = "Evaluate";
    }
  }

  function label(result, index) {
    // a folder evaluated with an adapter is named after both; a loaded model by its own name
    let name = result.model_name || "model";
    const adapterName = tail(result.lora_adapter, 2).split("/").filter((p) => p !== "lora_adapter").pop();
    if (adapterName && result.model_path && result.model_path.endsWith(`/${name}`)) name += ` + ${adapterName}`;
    return `#${index + 1} ${name}`;
  }

  function draw() {
    replace(picks, entries.length ? entries.map((e) => h("label", { className: "check" },
      h("input", { type: "checkbox", checked: !hidden.has(e.id), onchange: (ev) => {
        if (ev.target.checked) hidden.delete(e.id); else hidden.add(e.id);
        draw();
      } }), e.label, h("span", { className: "muted" }, ` ${when(e.at)}`),
      e.local ? h("button", { type: "button", className: "ghost small", title: "forget this result", onclick: () => {
        localStorage.setItem(EVAL_STORE, JSON.stringify(storedEvaluations().filter((x) => x.id !== e.id)));
        refresh();
      } }, "×") : h("a", { href: `#/tasks/${e.id}`, className: "muted" }, "task")))
      : h("span", { className: "muted" }, "No evaluation yet: run one above; evaluation tasks' results are listed here too."));
    const shown = entries.filter((e) => !hidden.has(e.id));
    replace(table, shown.length ? comparisonTable(shown) : null);
    replace(examples, shown.map((e) => h("div", {}, h("h2", {}, e.label),
      (e.result.examples || []).length ? e.result.examples.map((x) => h("div", { className: "example" },
        h("div", {}, h("b", {}, "prompt"), x.prompt), h("div", {}, h("b", {}, "reference"), x.reference),
        h("div", {}, h("b", {}, "answer"), x.answer),
        x.base_answer !== undefined && x.base_answer !== null ? h("div", {}, h("b", {}, "base"), x.base_answer) : null))
        : h("p", { className: "muted" }, "no generated answers"))));
  }

  async function refresh() {
    const { tasks } = await api("/train/history?limit=200");
    const fromTasks = tasks.filter((t) => t.kind === "evaluate" && t.status === "completed" && t.result)
      .map((t) => ({ id: t.task_id, at: t.finished_at, result: t.result }));
    const local = storedEvaluations().map((e) => ({ ...e, local: true }));
    const all = [...local, ...fromTasks].sort((a, b) => String(b.at).localeCompare(String(a.at)));
    const before = entries.map((e) => e.id).join();
    entries = all.map((e, i) => ({ ...e, label: label(e.result, all.length - 1 - i) }));
    if (before !== entries.map((e) => e.id).join()) {
      entries.slice(4).forEach((e) => hidden.add(e.id)); // the newest four are shown at first
      draw();
    }
  }
  ctx.poll(() => refresh().catch((err) => { showError(error, err); throw err; }), 5000);
}

// ---------------------------------------------------------------- start

async function health() {
  const el = $("#health");
  try {
    const response = await fetch("/health");
    const data = await response.json();
    el.className = `health ${data.worker_alive !== false ? "ok" : "bad"}`;
    el.textContent = `${data.running_tasks} running, ${data.models_loaded} loaded`;
  } catch {
    el.className = "health bad";
    el.textContent = "server unreachable";
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setKey(apiKey);
  $("#key-form").addEventListener("submit", () => setKey($("#api-key").value.trim()));
  $("#forget-key").addEventListener("click", () => { setKey(""); $("#key-dialog").close("forget"); });
  $("#key-button").addEventListener("click", () => askKey(apiKey ? "Change or forget the key this browser sends."
    : "Enter the server's API key (GPT_SERVICE_API_KEY).").then((saved) => saved && render()));
  window.addEventListener("hashchange", render);
  render();
  health();
  setInterval(health, 10000);
});
