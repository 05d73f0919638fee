// The cfg-serve playground: settings side by side (columns), each run as an asynchronous job (/v1/jobs) at
// the same seed, with its guidance curve computed by the server (/v1/guidance/curve), never in JavaScript.

import { apiUrl, describeFailure, hasApiKey, readEvents, readJson, request, setApiKey } from "./api.js";
import { drawChart, drawMessage, formatNumber } from "./chart.js";

// The schedules' per-kind defaults (app/api/schemas.py); the methods' and the step caches' come with their
// fields from /v1/models (guidance_method_fields, cache.fields). The default request's own schedule and method
// come from /v1/models' default_guidance, and its cache from cache.default, and override these.
const SCHEDULE_DEFAULTS = {
  constant: {},
  linear: { start: 1, end: 0 },
  cosine: { start: 1, end: 0 },
  interval: { start: 0, end: 1, sigma_min: "", sigma_max: "", weighting: "step" },
};
const CURVE_DELAY_MS = 250; // debounce of the curve's request while the user types
const POLL_MS = 500; // a job is polled only when its event stream breaks off
const SEED_RANGE = 1_000_000; // "New seed": short numbers, easy to note down

const $ = (selector, root = document) => root.querySelector(selector);
const form = $("#playground");
const columnsBox = $("#columns");
const cancelButton = $("#cancel");
const addButton = $("#add-setting");
const pageStatus = $("#status");

let models = []; // /v1/models' data
let model = null; // the selected entry
const columns = [];
let columnCounter = 0;
let authError = null; // {status, text} of the last 401/403: shown at the API key field
let modelsRetry = null;

const sharedField = (path) => $(`.shared [data-field="${path}"]`);

// ---- one setting (a column) ---------------------------------------------------------------------------

class Column {
  constructor(root, prefix) {
    this.root = root;
    this.prefix = prefix;
    this.letter = "";
    this.errors = []; // [{el, message}] from the last 422 of this column's body (curve or job)
    this.curve = null;
    this.curveTimer = null;
    this.curveAbort = null;
    this.run = null;
  }

  el(dataId) {
    return this.root.querySelector(`[data-id="${dataId}"]`);
  }

  field(path) {
    return this.root.querySelector(`[data-field="${path}"]`);
  }

  button(action) {
    return this.root.querySelector(`[data-action="${action}"]`);
  }

  get running() {
    return this.run !== null && !this.run.done;
  }
}

function fillSelect(select, options, selected) {
  select.replaceChildren(
    ...options.map(([value, text]) => {
      const option = document.createElement("option");
      option.value = value;
      option.textContent = text;
      return option;
    }),
  );
  if (selected !== undefined && options.some(([value]) => value === String(selected))) select.value = selected;
}

const pairs = (names) => names.map((n) => [n, n]);

function defaultState() {
  const g = model.default_guidance;
  const state = {
    sampler: model.default_sampler, // GET /v1/models: the API's default
    steps: "",
    guidance_scale: g.guidance_scale,
    guidance_rescale: g.guidance_rescale,
    noise_level: g.noise_level,
    noise_schedule: g.noise_schedule,
    "method.kind": g.method.kind,
    "schedule.kind": g.schedule.kind,
    "cache.kind": model.cache.default.kind,
  };
  const kinds = [
    ["schedule", SCHEDULE_DEFAULTS, g.schedule],
    ["method", kindDefaults(methodFields()), g.method],
    ["cache", kindDefaults(cacheFields()), model.cache.default],
  ];
  for (const [group, defaults, chosen] of kinds) {
    for (const [kind, params] of Object.entries(defaults)) {
      for (const [name, value] of Object.entries(params)) state[`${group}.${kind}.${name}`] = value;
    }
    for (const [name, value] of Object.entries(chosen)) {
      if (name !== "kind") state[`${group}.${chosen.kind}.${name}`] = value ?? "";
    }
  }
  return state;
}

// ---- a method's and a step cache's inputs, from their settings models (GET /v1/models) --------------------

const methodFields = () => model.guidance_method_fields ?? {};

// Every served model's cache kinds (a column keeps its inputs when the model changes; the kind list is the
// model's own).
function cacheFields() {
  const fields = {};
  for (const m of models) {
    for (const [kind, list] of Object.entries(m.cache?.fields ?? {})) fields[kind] ??= list;
  }
  return fields;
}

function kindDefaults(fieldsByKind) {
  const defaults = {};
  for (const [kind, fields] of Object.entries(fieldsByKind)) {
    defaults[kind] = Object.fromEntries(fields.map((f) => [f.name, fieldText(f, f.default)]));
  }
  return defaults;
}

// A setting's value as its input holds it: a list as comma-separated values, none as blank.
function fieldText(field, value) {
  if (value === null || value === undefined) return field.type === "boolean" ? false : "";
  return Array.isArray(value) ? value.join(", ") : value;
}

const kindTitle = (kind) => kind.toUpperCase().replaceAll("_", " ");

// One grid of inputs per kind with settings (of group: method or cache), hidden until its kind is chosen
// (showKinds).
function buildKindInputs(root, group, fieldsByKind) {
  const box = root.querySelector(`[data-id="${group}-params"]`);
  for (const [kind, fields] of Object.entries(fieldsByKind)) {
    if (!fields.length) continue;
    const grid = document.createElement("div");
    grid.className = "grid";
    grid.dataset.kindOf = group;
    grid.dataset.kind = kind;
    grid.hidden = true;
    for (const field of fields) grid.append(kindInput(group, kind, field));
    box.append(grid);
  }
}

function kindInput(group, kind, field) {
  const box = document.createElement("div");
  box.className = "field";
  const id = `${kind}-${field.name}`;
  const label = document.createElement("label");
  label.dataset.for = id;
  label.textContent = `${kindTitle(kind)} ${field.name.replaceAll("_", " ")}`;
  let input;
  if (field.enum) {
    input = document.createElement("select");
    if (field.nullable) input.append(new Option("(default)", ""));
    for (const value of field.enum) input.append(new Option(String(value), String(value)));
  } else {
    input = document.createElement("input");
    if (field.type === "boolean") input.type = "checkbox";
    else if (field.type === "number" || field.type === "integer") {
      input.type = "number";
      input.step = field.type === "integer" ? "1" : "any";
      if (field.minimum !== undefined) input.min = field.minimum;
      if (field.maximum !== undefined) input.max = field.maximum;
      if (field.nullable) input.placeholder = "default";
    } else {
      input.type = "text";
      if (field.type === "array") input.placeholder = field.nullable ? "default, or e.g. 0, 1" : "e.g. 0, 1";
    }
  }
  input.dataset.id = id;
  input.dataset.field = `${group}.${kind}.${field.name}`;
  input.dataset.type = field.type;
  if (field.items) input.dataset.items = field.items;
  if (field.description) input.title = field.description;
  box.append(label, input);
  return box;
}

// A method's or cache's input value for the request body: undefined where blank (the server's default applies).
function fieldValue(el) {
  const type = el.dataset.type;
  if (type === "boolean") return el.checked;
  if (type === "number" || type === "integer") return numberOf(el, { optional: true });
  const text = el.value.trim();
  if (text === "") return undefined;
  if (type !== "array") return text;
  const items = text.split(",").map((v) => v.trim());
  const numeric = el.dataset.items === "number" || el.dataset.items === "integer";
  // A value that is not a number goes as it is: the server's 422 names the field.
  return numeric ? items.map((v) => (v !== "" && Number.isFinite(Number(v)) ? Number(v) : v)) : items;
}

function getState(col) {
  const state = {};
  for (const el of col.root.querySelectorAll("[data-field]")) {
    state[el.dataset.field] = el.type === "checkbox" ? el.checked : el.value;
  }
  return state;
}

function setState(col, state) {
  for (const el of col.root.querySelectorAll("[data-field]")) {
    const value = state[el.dataset.field];
    if (value === undefined) continue;
    if (el.type === "checkbox") el.checked = Boolean(value);
    else el.value = value === null ? "" : String(value);
  }
}

function fillColumnOptions(col) {
  const keep = (path) => col.field(path).value || undefined;
  fillSelect(col.field("sampler"), pairs(model.samplers), keep("sampler"));
  fillSelect(col.field("method.kind"), pairs(model.guidance_methods), keep("method.kind"));
  fillSelect(col.field("schedule.kind"), pairs(model.schedules), keep("schedule.kind"));
  fillSelect(col.field("cache.kind"), pairs(model.cache.kinds), keep("cache.kind"));
  fillSelect(col.field("noise_schedule"), pairs(model.noise_schedules), keep("noise_schedule"));
  const limits = model.limits;
  col.field("steps").max = limits.max_steps;
  col.field("guidance_scale").max = limits.max_guidance_scale;
  col.field("noise_level").max = limits.max_noise_level;
}

// Show the parameters of the chosen schedule and method kinds only.
function showKinds(col) {
  for (const group of col.root.querySelectorAll("[data-kind-of]")) {
    group.hidden = col.field(`${group.dataset.kindOf}.kind`).value !== group.dataset.kind;
  }
}

function createColumn(state, after) {
  const root = $("#column-template").content.firstElementChild.cloneNode(true);
  buildKindInputs(root, "method", methodFields());
  buildKindInputs(root, "cache", cacheFields());
  const prefix = `c${++columnCounter}`;
  root.id = prefix;
  for (const el of root.querySelectorAll("[data-id]")) el.id = `${prefix}-${el.dataset.id}`;
  for (const label of root.querySelectorAll("label[data-for]")) label.htmlFor = `${prefix}-${label.dataset.for}`;
  root.setAttribute("aria-labelledby", `${prefix}-title`);
  const col = new Column(root, prefix);
  col.el("title").tabIndex = -1;
  fillColumnOptions(col);
  setState(col, state ?? defaultState());
  showKinds(col);
  drawMessage(col.el("curve"), "…");
  const index = after ? columns.indexOf(after) + 1 : columns.length;
  columns.splice(index, 0, col);
  if (after) after.root.after(root);
  else columnsBox.append(root);
  renumber();
  scheduleCurve(col, 0);
  return col;
}

function renumber() {
  columns.forEach((col, i) => {
    const letter = i < 26 ? String.fromCharCode(65 + i) : String(i + 1);
    col.letter = letter;
    col.root.dataset.letter = letter;
    col.el("title").textContent = `Setting ${letter}`;
    col.button("duplicate").setAttribute("aria-label", `Duplicate setting ${letter}`);
    col.button("remove").setAttribute("aria-label", `Remove setting ${letter}`);
    col.button("remove").disabled = columns.length === 1;
    col.button("cancel").setAttribute("aria-label", `Cancel setting ${letter}`);
    col.button("copy-curl").setAttribute("aria-label", `Copy the curl command of setting ${letter}`);
    col.el("progress").setAttribute("aria-label", `Progress of setting ${letter}`);
    for (const a of col.el("images").querySelectorAll("a[data-index]")) {
      a.setAttribute("aria-label", `Download image ${Number(a.dataset.index) + 1} of setting ${letter}`);
    }
  });
}

async function removeColumn(col) {
  if (columns.length === 1) return;
  clearTimeout(col.curveTimer);
  col.curveAbort?.abort();
  const cancelling = cancelRun(col);
  columns.splice(columns.indexOf(col), 1);
  col.root.remove();
  renumber();
  renderErrors();
  updateActions();
  addButton.focus();
  await cancelling;
}

// ---- the request body ---------------------------------------------------------------------------------

// A number field's value: undefined when blank and optional (the server's default applies), null when it
// cannot be read (the server's 422 then names the field), else the number.
function numberOf(el, { optional = false } = {}) {
  if (el.validity.badInput) return null;
  if (el.value.trim() === "") return optional ? undefined : null;
  return Number(el.value);
}

function kindParams(col, group, kind) {
  const params = { kind };
  const prefix = `${group}.${kind}.`;
  for (const el of col.root.querySelectorAll(`[data-field^="${prefix}"]`)) {
    // A schedule's choice (the interval's weighting) goes as its text; its numbers as numbers.
    const value =
      group !== "schedule" ? fieldValue(el) : el.tagName === "SELECT" ? el.value : numberOf(el, { optional: true });
    if (value !== undefined) params[el.dataset.field.slice(prefix.length)] = value;
  }
  return params;
}

function requestBody(col, seed) {
  const body = {};
  const put = (name, value) => {
    if (value !== undefined) body[name] = value;
  };
  body.model = model.name;
  const label = sharedField("class_label").value;
  body.class_label = label === "" ? null : label;
  put("num_images", numberOf(sharedField("num_images"), { optional: true }));
  put("steps", numberOf(col.field("steps"), { optional: true }));
  body.sampler = col.field("sampler").value;
  put("guidance_scale", numberOf(col.field("guidance_scale")));
  body.method = kindParams(col, "method", col.field("method.kind").value);
  body.schedule = kindParams(col, "schedule", col.field("schedule.kind").value);
  body.cache = kindParams(col, "cache", col.field("cache.kind").value);
  put("guidance_rescale", numberOf(col.field("guidance_rescale")));
  put("noise_level", numberOf(col.field("noise_level")));
  body.noise_schedule = col.field("noise_schedule").value;
  if (sharedField("return_trace").checked) body.return_trace = true;
  put("seed", seed);
  return body;
}

function seedValue() {
  return numberOf(sharedField("seed"), { optional: true });
}

// The seed every setting of a Generate uses: the field's, or a new one written into the field.
function ensureSeed() {
  const field = sharedField("seed");
  if (field.value.trim() === "" && !field.validity.badInput) field.value = newSeed();
  return seedValue();
}

function newSeed() {
  return Math.floor(Math.random() * SEED_RANGE);
}

// ---- field errors (422) -------------------------------------------------------------------------------

function fieldsUnder(col, prefix) {
  const selector = `[data-field^="${prefix}"]`;
  return [...col.root.querySelectorAll(selector), ...document.querySelectorAll(`.shared ${selector}`)];
}

function fieldAt(col, path) {
  return col.field(path) ?? sharedField(path);
}

// The position of a field's name in a message ("schedule.sigma_min (3) must be below sigma_max (2)").
function mentionAt(message, name) {
  const match = new RegExp(`(^|[^A-Za-z0-9_])${name}(?![A-Za-z0-9_])`).exec(message);
  return match ? match.index : Infinity;
}

// The control an error's loc names: ["body", "schedule", "interval", "sigma_min"] is the field
// schedule.interval.sigma_min. A loc that ends at a group (a model-level check such as sigma_min < sigma_max
// has loc ["body", "schedule", "interval"]) goes to the group's field that the message names first, else to
// the group's kind selector.
function errorTarget(col, loc, message) {
  const path = (loc[0] === "body" ? loc.slice(1) : loc).map(String);
  for (let n = path.length; n > 0; n--) {
    const key = path.slice(0, n).join(".");
    const exact = fieldAt(col, key);
    if (exact) return exact;
    const children = fieldsUnder(col, `${key}.`);
    if (children.length) {
      const named = children
        .map((el) => ({ el, at: mentionAt(message, el.dataset.field.split(".").pop()) }))
        .filter((c) => c.at < Infinity)
        .sort((a, b) => a.at - b.at);
      return named[0]?.el ?? fieldAt(col, `${path[0]}.kind`) ?? children[0];
    }
  }
  return null;
}

function setErrors(col, detail) {
  const list = Array.isArray(detail) ? detail : detail ? [{ loc: [], msg: String(detail) }] : [];
  col.errors = list.map((e) => {
    const message = String(e.msg ?? "invalid").replace(/^Value error, /, "");
    return { el: errorTarget(col, e.loc ?? [], message), message };
  });
  renderErrors();
}

function describe(el, id, on) {
  const ids = new Set((el.getAttribute("aria-describedby") ?? "").split(/\s+/).filter(Boolean));
  if (on) ids.add(id);
  else ids.delete(id);
  if (ids.size) el.setAttribute("aria-describedby", [...ids].join(" "));
  else el.removeAttribute("aria-describedby");
}

function showFieldError(el, text) {
  const id = `${el.id}-error`;
  let p = document.getElementById(id);
  if (!p) {
    p = document.createElement("p");
    p.id = id;
    p.className = "field-error";
    (el.closest(".field") ?? el.parentElement).append(p);
  }
  p.textContent = text;
  p.hidden = false;
  el.setAttribute("aria-invalid", "true");
  describe(el, id, true);
}

function clearFieldError(el) {
  const id = `${el.id}-error`;
  const p = document.getElementById(id);
  if (p) {
    p.hidden = true;
    p.textContent = "";
  }
  el.removeAttribute("aria-invalid");
  describe(el, id, false);
}

function renderErrors() {
  for (const el of document.querySelectorAll('[aria-invalid="true"]')) clearFieldError(el);
  const byField = new Map();
  const note = (el, message) => {
    if (!byField.has(el)) byField.set(el, new Set());
    byField.get(el).add(message);
  };
  for (const col of columns) {
    const loose = [];
    for (const { el, message } of col.errors) {
      if (el) note(el, message);
      else loose.push(message);
    }
    const box = col.el("invalid");
    box.textContent = loose.join(" ");
    box.hidden = loose.length === 0;
  }
  if (authError) note(sharedField("api_key"), authError);
  for (const [el, messages] of byField) showFieldError(el, [...messages].join(" "));
}

function noteAuth(response) {
  const before = authError;
  if (response.status === 401) authError = "The gateway asks for an API key (401).";
  else if (response.status === 403) authError = "The gateway refused this API key (403).";
  else if (response.ok || response.status === 422) authError = null;
  if (authError !== before) renderErrors();
}

// ---- the guidance curve -------------------------------------------------------------------------------

function scheduleCurve(col, delay = CURVE_DELAY_MS) {
  clearTimeout(col.curveTimer);
  col.el("curve").classList.add("stale");
  col.curveTimer = setTimeout(() => updateCurve(col), delay);
}

function scheduleAllCurves(delay) {
  for (const col of columns) scheduleCurve(col, delay);
}

async function updateCurve(col) {
  col.curveAbort?.abort();
  const abort = (col.curveAbort = new AbortController());
  const svg = col.el("curve");
  let response;
  let body;
  try {
    response = await request("v1/guidance/curve", {
      method: "POST",
      body: requestBody(col, seedValue()),
      signal: abort.signal,
    });
    body = await readJson(response);
  } catch (error) {
    if (abort.signal.aborted) return;
    svg.classList.remove("stale");
    drawMessage(svg, `The service cannot be reached (${error.message})`);
    return;
  }
  if (abort.signal.aborted) return;
  svg.classList.remove("stale");
  noteAuth(response);
  if (response.status === 422) {
    setErrors(col, body?.detail);
    drawMessage(svg, "Invalid settings: see the marked fields");
    svg.setAttribute("aria-label", "No curve: invalid settings");
    return;
  }
  if (!response.ok || !Array.isArray(body?.steps)) {
    drawMessage(svg, describeFailure(response, body));
    // A gateway's rate limit (429) passes: ask again once it has.
    if (response.status === 429) scheduleCurve(col, 1000 * (Number(response.headers.get("Retry-After")) || 1));
    return;
  }
  setErrors(col, []);
  col.curve = body.steps;
  drawCurve(col);
  const steps = col.field("steps");
  if (steps.value === "") steps.placeholder = `${body.steps.length} (default)`;
}

function drawCurve(col) {
  const steps = col.curve;
  const svg = col.el("curve");
  const hasNoise = steps.some((s) => s.noise_level > 0);
  const tip = (s) =>
    `step ${s.step}: t = ${s.timestep}, σ = ${formatNumber(s.sigma)}, s = ${formatNumber(s.scale)}` +
    (hasNoise ? `, noise ${formatNumber(s.noise_level)}` : "");
  const series = [{ points: steps.map((s) => [s.step, s.scale]), cls: "scale", shape: "step", tip: (k) => tip(steps[k]) }];
  if (hasNoise) {
    const points = steps.map((s) => [s.step, s.noise_level]);
    series.push({ points, cls: "noise", shape: "step", tip: (k) => tip(steps[k]) });
  }
  drawChart(svg, { steps: steps.length, series, refs: [{ value: 1, cls: "one" }], labels: { left: "s" } });
  const scales = steps.map((s) => s.scale);
  const guided = scales.filter((s) => s !== 1).length;
  svg.setAttribute(
    "aria-label",
    `Guidance scale over ${steps.length} steps: from ${formatNumber(scales[0])} to ` +
      `${formatNumber(scales.at(-1))}, at most ${formatNumber(Math.max(...scales))}; ${guided} steps with s ≠ 1`,
  );
  const table = col.el("curve-table");
  const row = (cells, tag) => {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const cell = document.createElement(tag);
      cell.textContent = c;
      if (tag === "th") cell.scope = "col";
      tr.append(cell);
    }
    return tr;
  };
  const head = document.createElement("thead");
  head.append(row(["step", "t", "σ", "s", "noise"], "th"));
  const rows = document.createElement("tbody");
  for (const s of steps) {
    rows.append(row([s.step, s.timestep, formatNumber(s.sigma), formatNumber(s.scale), formatNumber(s.noise_level)], "td"));
  }
  table.replaceChildren(head, rows);
}

// ---- jobs ---------------------------------------------------------------------------------------------

function setRunStatus(col, status, text) {
  col.root.dataset.status = status;
  col.el("run-status").textContent = text;
}

function showRunError(col, text) {
  const box = col.el("run-error");
  box.textContent = text ?? "";
  box.hidden = !text;
}

function resetRunView(col, steps) {
  const progress = col.el("progress");
  progress.max = steps || 1;
  progress.value = 0;
  col.el("images").replaceChildren();
  col.el("timings").textContent = "";
  col.el("trace-figure").hidden = true;
  showRunError(col, null);
}

function setProgress(col, step, steps) {
  const progress = col.el("progress");
  if (steps) progress.max = steps;
  progress.value = Math.min(step, progress.max);
}

function className() {
  const select = sharedField("class_label");
  return select.value === "" ? "unconditional" : select.value;
}

function fileName(col, seed) {
  const name = className().toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
  return `${name}-seed${seed}-setting-${col.letter.toLowerCase()}.png`;
}

function showImages(col, images, { seeds, previewStep } = {}) {
  const box = col.el("images");
  const preview = previewStep !== undefined;
  box.classList.toggle("preview", preview);
  box.replaceChildren(
    ...images.map((b64, i) => {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${b64}`;
      figure.append(img);
      if (preview) {
        img.alt = `Preview of image ${i + 1} at step ${previewStep}`;
        return figure;
      }
      const seed = seeds?.[i];
      img.alt = `${className()}, seed ${seed}, setting ${col.letter}`;
      const caption = document.createElement("figcaption");
      const link = document.createElement("a");
      link.href = img.src;
      link.download = fileName(col, seed);
      link.dataset.index = i;
      link.textContent = "PNG";
      link.setAttribute("aria-label", `Download image ${i + 1} of setting ${col.letter}`);
      caption.append(`seed ${seed} · `, link);
      figure.append(caption);
      return figure;
    }),
  );
}

function drawTrace(col, run) {
  const trace = run.trace;
  const figure = col.el("trace-figure");
  figure.hidden = false;
  const svg = col.el("trace");
  if (!trace.length) {
    drawMessage(svg, "The trace appears as the steps run");
    return;
  }
  const images = Math.max(0, ...trace.map((t) => t.diff_norm?.length ?? 0));
  const tip = (t, k) => `step ${t.step}: s = ${formatNumber(t.scale)}, |eps_c − eps_u| = ${formatNumber(t.diff_norm?.[k] ?? null)}`;
  const series = [];
  for (let k = 0; k < images; k++) {
    const points = trace.map((t) => [t.step, t.diff_norm ? t.diff_norm[k] : null]);
    series.push({ points, cls: "diff", tip: (j) => tip(trace[j], k) });
  }
  const scales = trace.map((t) => [t.step, t.scale]);
  series.push({ points: scales, cls: "scale", axis: "right", shape: "step", tip: (j) => tip(trace[j], 0) });
  const steps = Math.max(run.steps ?? 0, trace.at(-1).step + 1);
  drawChart(svg, { steps, series, labels: { left: "|eps_c − eps_u|", right: "s" } });
  const guided = trace.filter((t) => t.diff_norm).length;
  svg.setAttribute(
    "aria-label",
    `Trace of ${trace.length} steps: ${guided} steps computed the unconditional rows; ` +
      `scale from ${formatNumber(trace[0].scale)} to ${formatNumber(trace.at(-1).scale)}`,
  );
}

function updateActions() {
  const running = columns.filter((c) => c.running).length;
  cancelButton.disabled = running === 0;
  columnsBox.setAttribute("aria-busy", running > 0 ? "true" : "false");
  for (const col of columns) col.button("cancel").disabled = !col.running;
  if (running) pageStatus.textContent = `Running ${running} of ${columns.length} setting${columns.length > 1 ? "s" : ""}…`;
  else if (columns.some((c) => c.run)) {
    const count = (s) => columns.filter((c) => c.root.dataset.status === s).length;
    const parts = ["succeeded", "failed", "cancelled", "invalid"].filter(count).map((s) => `${count(s)} ${s}`);
    pageStatus.textContent = `Done: ${parts.join(", ")}.`;
  }
}

function finish(col, run, status, text, error) {
  run.done = true;
  if (col.run === run) {
    setRunStatus(col, status, text);
    showRunError(col, error ?? null);
  }
  updateActions();
}

const live = (col, run) => col.run === run && !run.done;

function onProgress(col, run, event) {
  run.steps = event.steps;
  setProgress(col, event.step, event.steps);
  if (run.cancelRequested) {
    // "Cancelling…" stays until the DELETE answers.
  } else if (event.status === "queued") {
    const place = event.queue_position ? ` (position ${event.queue_position})` : "";
    setRunStatus(col, "queued", `Queued${place}`);
  } else {
    setRunStatus(col, "running", `Step ${event.step} of ${event.steps}`);
  }
  if (event.preview) showImages(col, event.preview.images, { previewStep: event.preview.step });
  if (run.body.return_trace && Array.isArray(event.trace) && event.trace.length) {
    run.trace.push(...event.trace);
    drawTrace(col, run);
  }
}

const seconds = (s) => (s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`);

function onResult(col, run, result) {
  setProgress(col, result.steps, result.steps);
  showImages(col, result.images, { seeds: result.seeds });
  const t = result.timings;
  col.el("timings").textContent =
    `queue ${seconds(t.queue_wait_s)} · compute ${seconds(t.compute_s)} · total ${seconds(t.total_s)}`;
  if (Array.isArray(result.trace)) {
    run.trace = result.trace;
    run.steps = result.steps;
    drawTrace(col, run);
  }
  const n = result.images.length;
  finish(col, run, "succeeded", `Done: ${n} image${n > 1 ? "s" : ""}, seeds ${result.seeds[0]}–${result.seeds.at(-1)}`);
}

function onJobError(col, run, error, step) {
  if (error?.outcome === "cancelled") {
    finish(col, run, "cancelled", step === undefined ? "Cancelled" : `Cancelled at step ${step}`);
  } else {
    const detail = error?.detail ?? "the job failed";
    finish(col, run, "failed", "Failed", `${error?.status ?? ""} ${detail}`.trim());
  }
}

// Job resource (POST /v1/jobs, GET /v1/jobs/{id}) -> the view.
function applyJob(col, run, job) {
  if (job.status === "succeeded" && job.result) return onResult(col, run, job.result);
  if (job.status === "failed" || job.status === "cancelled") {
    return onJobError(col, run, job.error ?? { outcome: job.status }, job.step);
  }
  onProgress(col, run, { ...job, preview: job.preview ?? undefined, trace: undefined });
}

// Submits the column's job; resolves once the job is submitted (or refused), then follows it to its end.
async function startRun(col, seed) {
  await cancelRun(col);
  const body = requestBody(col, seed);
  const run = { body, controller: new AbortController(), jobId: null, cancelRequested: false, done: false, trace: [] };
  col.run = run;
  delete col.root.dataset.jobId;
  resetRunView(col, body.steps);
  setRunStatus(col, "submitting", "Submitting…");
  updateActions();
  let response;
  let job;
  try {
    response = await request("v1/jobs", { method: "POST", body: { ...body, preview: true } });
    job = await readJson(response);
  } catch (error) {
    return finish(col, run, "failed", "Failed", `The service cannot be reached (${error.message})`);
  }
  noteAuth(response);
  if (response.status === 422) {
    if (col.run === run) setErrors(col, job?.detail);
    return finish(col, run, "invalid", "Not submitted: invalid settings (see the marked fields)");
  }
  if (!response.ok || !job?.id) return finish(col, run, "failed", "Not submitted", describeFailure(response, job));
  run.jobId = job.id;
  if (col.run === run) {
    col.root.dataset.jobId = job.id;
    setErrors(col, []);
  }
  if (run.cancelRequested) return deleteJob(col, run);
  applyJob(col, run, job);
  if (!run.done) follow(col, run); // not awaited: the next column submits meanwhile
}

// Progress events, then the result or error; if the stream breaks off without its final event, the job's
// resource is polled instead.
async function follow(col, run) {
  const path = `v1/jobs/${encodeURIComponent(run.jobId)}`;
  try {
    const response = await request(`${path}/events`, { accept: "text/event-stream", signal: run.controller.signal });
    if (response.ok && response.body) {
      for await (const { event, data } of readEvents(response)) {
        if (!live(col, run)) return;
        const payload = JSON.parse(data);
        if (event === "progress") onProgress(col, run, payload);
        else if (event === "result") return onResult(col, run, payload);
        else if (event === "error") return onJobError(col, run, payload);
      }
    }
  } catch (error) {
    if (run.done || run.controller.signal.aborted) return;
  }
  while (live(col, run)) {
    try {
      const response = await request(path, { signal: run.controller.signal });
      const job = await readJson(response);
      if (!live(col, run)) return;
      if (response.status === 404) return finish(col, run, "failed", "Failed", "The job is gone (expired or unknown).");
      if (response.ok && job) applyJob(col, run, job);
    } catch (error) {
      if (run.controller.signal.aborted) return;
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

async function deleteJob(col, run) {
  let response;
  let job;
  try {
    response = await request(`v1/jobs/${encodeURIComponent(run.jobId)}`, { method: "DELETE" });
    job = await readJson(response);
  } catch (error) {
    if (col.run === run) showRunError(col, `Could not cancel: ${error.message}`);
    return;
  }
  if (response.ok) {
    run.controller.abort(); // the event stream has nothing more to say
    finish(col, run, "cancelled", `Cancelled at step ${job?.step ?? "?"} of ${job?.steps ?? "?"}`);
  } else if (response.status !== 409) {
    // 409: it finished first; its stream's final event says how.
    if (col.run === run) showRunError(col, `Could not cancel: ${describeFailure(response, job)}`);
  }
}

async function cancelRun(col) {
  const run = col.run;
  if (!run || run.done || run.cancelRequested) return;
  run.cancelRequested = true;
  if (col.run === run) setRunStatus(col, "cancelling", "Cancelling…");
  // While the POST is in flight the job may already exist: it is deleted as soon as its id is known.
  if (run.jobId) await deleteJob(col, run);
}

async function generate() {
  if (!model) {
    pageStatus.textContent = "The models have not loaded yet.";
    return;
  }
  const seed = ensureSeed();
  // One after the other, so the jobs queue in the columns' order.
  for (const col of [...columns]) await startRun(col, seed);
}

// ---- curl ---------------------------------------------------------------------------------------------

const shellQuote = (text) => `'${text.replace(/'/g, `'\\''`)}'`;

function curlCommand(col) {
  const seed = seedValue();
  const lines = [`curl -s ${shellQuote(apiUrl("generate"))}`, "-H 'Content-Type: application/json'"];
  // The key itself stays out of the clipboard (and shell histories): the command reads it from the environment.
  if (hasApiKey()) lines.push('-H "X-API-Key: $CFG_API_KEY"');
  lines.push(`-d ${shellQuote(JSON.stringify(requestBody(col, seed)))}`);
  return lines.join(" \\\n  ");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context (plain http to another host): the older way still works from a click.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.setAttribute("aria-hidden", "true");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.append(area);
    area.select();
    let copied = false;
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    area.remove();
    return copied;
  }
}

async function copyCurl(col) {
  const command = curlCommand(col);
  col.el("curl").textContent = command;
  const copied = await copyText(command);
  const status = col.el("run-status");
  if (copied) {
    status.textContent = hasApiKey() ? "Copied the curl command (it reads the key from $CFG_API_KEY)." : "Copied the curl command.";
  } else {
    col.el("curl-details").open = true;
    status.textContent = "Could not reach the clipboard: the command is shown below.";
  }
}

// ---- models -------------------------------------------------------------------------------------------

function selectModel(name) {
  model = models.find((m) => m.name === name) ?? models[0];
  const classes = sharedField("class_label");
  const previous = classes.value;
  fillSelect(classes, [...pairs(model.class_names), ["", "unconditional"]], previous || model.class_names[0]);
  const images = sharedField("num_images");
  images.max = model.limits.max_images;
  if (Number(images.value) > model.limits.max_images) images.value = model.limits.max_images;
  // The served images' size (a latent model's decoded size), shown 4x up to 256 px.
  const width = model.image_shape ? model.image_shape[2] : model.image_size;
  document.documentElement.style.setProperty("--img", `${Math.min(width * 4, Math.max(width, 256))}px`);
  for (const col of columns) fillColumnOptions(col);
  if (!columns.length) createColumn();
  scheduleAllCurves(0);
}

async function loadModels() {
  let response;
  let body;
  try {
    response = await request("v1/models");
    body = await readJson(response);
  } catch (error) {
    pageStatus.textContent = `The service cannot be reached (${error.message}).`;
    return false;
  }
  noteAuth(response);
  if (response.status === 503 && response.headers.get("Retry-After")) {
    // Starting (loading its models) or draining: ask again when the service says to.
    const seconds = Number(response.headers.get("Retry-After")) || 5;
    pageStatus.textContent = `${body?.detail ?? "The service is not ready"}: trying again in ${seconds} s.`;
    clearTimeout(modelsRetry);
    modelsRetry = setTimeout(loadModels, 1000 * seconds);
    return false;
  }
  if (!response.ok || !Array.isArray(body?.data) || !body.data.length) {
    pageStatus.textContent = `Could not load the models: ${describeFailure(response, body)}`;
    return false;
  }
  models = body.data;
  fillSelect(sharedField("model"), pairs(models.map((m) => m.name)));
  selectModel(models[0].name);
  pageStatus.textContent = "";
  document.body.dataset.ready = "true";
  return true;
}

// ---- wiring -------------------------------------------------------------------------------------------

function columnOf(el) {
  const root = el.closest(".column");
  return root ? columns.find((c) => c.root === root) : null;
}

function onEdit(event) {
  const target = event.target;
  if (!target.dataset?.field) return;
  const field = target.dataset.field;
  if (field === "api_key") {
    setApiKey(target.value);
    clearTimeout(modelsRetry);
    modelsRetry = setTimeout(() => (model ? scheduleAllCurves(0) : loadModels()), CURVE_DELAY_MS);
    return;
  }
  if (field === "model") {
    if (event.type === "change") selectModel(target.value);
    return;
  }
  const col = columnOf(target);
  if (!col) return scheduleAllCurves();
  if (field.endsWith(".kind")) showKinds(col);
  scheduleCurve(col);
}

form.addEventListener("input", onEdit);
form.addEventListener("change", onEdit);
form.addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
cancelButton.addEventListener("click", () => Promise.all(columns.map(cancelRun)));
addButton.addEventListener("click", () => {
  if (!model) return;
  const col = createColumn();
  col.el("title").focus();
});
$("#new-seed").addEventListener("click", () => {
  sharedField("seed").value = newSeed();
  scheduleAllCurves();
});
columnsBox.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  const col = button && columnOf(button);
  if (!col) return;
  const action = button.dataset.action;
  if (action === "duplicate") createColumn(getState(col), col).el("title").focus();
  else if (action === "remove") removeColumn(col);
  else if (action === "cancel") cancelRun(col);
  else if (action === "copy-curl") copyCurl(col);
});

sharedField("seed").value = newSeed();
loadModels();
