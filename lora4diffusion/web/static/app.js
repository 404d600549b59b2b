// lora4diffusion serve: the page. Plain JS, no dependencies; talks to the JSON API in docs/API.md.
"use strict";

const $ = (id) => document.getElementById(id);
// AUTOMATIC1111's tag, as the server parses it (lora4diffusion/prompt_syntax.py).
const TAG = /<lora:([^:<>]*)(?::([^:<>]*))?(?::([^<>]*))?>/gi;
const state = { adapters: [], info: null, busy: false, pending: false, history: [], train: null };

function fmt(w) { return String(Math.round(w * 100) / 100); }

function parseTags(text) {
  const loras = {};
  for (const m of text.matchAll(TAG)) {
    const w = m[2] === undefined || m[2].trim() === "" ? 1 : Number(m[2]);
    loras[m[1].trim()] = w;
  }
  return loras;
}
function promptText(text) { return text.replace(TAG, " ").replace(/\s+/g, " ").trim(); }

function isPrompt() { return state.info?.model === "prompt"; }

// Errors about the prompt (an unknown word, a bad tag, the negative prompt) show next to the prompt box.
const PROMPT_ERROR = /\b(prompt|word|words|tag|negative)\b/i;
function showError(msg, where) {
  const near = where ?? (msg && PROMPT_ERROR.test(msg) ? "prompt-error" : "error");
  for (const id of ["error", "prompt-error"]) {
    const e = $(id);
    if (id === near || (!msg && where === undefined)) { e.textContent = msg || ""; e.hidden = !msg; }
    else if (msg) e.hidden = true;
  }
}

async function api(path, opts = {}) {
  const r = await fetch(path, opts);
  const body = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
  if (!r.ok) throw new Error(body.error || `${r.status}`);
  return body;
}

// ---------------------------------------------------------------- prompt <-> sliders
function setTag(name, w) {
  const p = $("prompt");
  let text = p.value, seen = false;
  text = text.replace(TAG, (all, n) => {
    if (n.trim() !== name) return all;
    if (seen || w === 0) return "";
    seen = true;
    return `<lora:${name}:${fmt(w)}>`;
  });
  if (!seen && w !== 0) text = `${text.trimEnd()} <lora:${name}:${fmt(w)}>`;
  p.value = text.replace(/[ \t]{2,}/g, " ").trim();
}

function syncSliders() {
  const tags = parseTags($("prompt").value);
  const known = new Set(state.adapters.map((a) => a.name));
  for (const a of state.adapters) {
    const s = document.querySelector(`input[data-adapter="${a.name}"]`);
    if (!s) continue;
    const w = tags[a.name] ?? 0;
    s.value = w;
    s.closest(".adapter").querySelector(".w").textContent = fmt(w);
  }
  const unknown = Object.keys(tags).filter((n) => !known.has(n));
  showError(unknown.length ? `unknown adapter(s) in the prompt: ${unknown.join(", ")}` : "", "prompt-error");
  if (isPrompt()) return;
  const digits = digitsOf(promptText($("prompt").value));
  document.querySelectorAll("#digit-picks button").forEach((b) => {
    b.classList.toggle("on", digits.includes(Number(b.dataset.digit)));
  });
}

const WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
function digitsOf(text) {  // a light client-side reading, only for the digit buttons; the server decides
  const out = [];
  for (const m of text.toLowerCase().matchAll(/(\d)\s*-\s*(\d)|(\d)|([a-z]+)/g)) {
    let ds = [];
    if (m[1] !== undefined) for (let d = +m[1]; d <= +m[2]; d++) ds.push(d);
    else if (m[3] !== undefined) ds = [+m[3]];
    else if (WORDS.includes(m[4])) ds = [WORDS.indexOf(m[4])];
    for (const d of ds) if (!out.includes(d)) out.push(d);
  }
  return out;
}

function pickDigit(d) {
  const p = $("prompt");
  let ds = digitsOf(promptText(p.value));
  ds = ds.includes(d) ? ds.filter((x) => x !== d) : [...ds, d].sort((a, b) => a - b);
  const tags = [...p.value.matchAll(TAG)].map((m) => m[0]).join(" ");
  p.value = `${ds.join(" ")} ${tags}`.trim();
  syncSliders();
}

// ---------------------------------------------------------------- completion
// Inside <lora: the adapter names; after a bare < (prompt models) the added tokens: the embeddings' <name>
// (a token in the prompt brings its embedding) and pivotal adapters' tokens (which bring the adapter's tag);
// elsewhere the words being typed: adapters' trigger words first, then the tokenizer's vocabulary (the only
// words the text encoder knows).
function insideTag(before) { return before.lastIndexOf("<") > before.lastIndexOf(">"); }

function tokenSources() {
  const out = (state.info?.tokens || []).map((t) => ({ token: t, kind: "base token" }));
  for (const e of state.info?.embeddings || []) {
    if (e.fits !== false) out.push({ token: e.token, kind: `embedding ${e.name}` });
  }
  for (const a of state.adapters.filter((x) => x.fits !== false)) {
    for (const t of a.tokens || []) out.push({ token: t, kind: `with <lora:${a.name}>`, adapter: a.name });
  }
  return out;
}

function suggestions(before) {
  const m = before.match(/<lora:([A-Za-z0-9_-]*)$/i);
  if (m) {
    return state.adapters.filter((a) => a.name.startsWith(m[1]) && a.fits !== false).map((a) => ({
      text: a.name, kind: a.triggers?.length ? `trigger ${a.triggers.join(", ")}` : "adapter",
      apply: () => complete(a.name),
    }));
  }
  const tok = before.match(/<([A-Za-z0-9_-]*)$/);
  if (tok) {
    if (!isPrompt()) return [];
    const pre = `<${tok[1].toLowerCase()}`;
    return tokenSources().filter((s) => s.token.startsWith(pre)).slice(0, 8).map((s) => ({
      text: s.token, kind: s.kind, apply: () => completeToken(s.token, s.adapter),
    }));
  }
  const w = before.match(/(?:^|[^A-Za-z0-9_<:-])([A-Za-z]+)$/);
  if (!isPrompt() || !w || insideTag(before)) return [];
  const pre = w[1].toLowerCase(), seen = new Set(), out = [];
  for (const a of state.adapters.filter((x) => x.fits !== false)) {
    for (const t of a.triggers || []) {
      if (t.startsWith(pre) && !seen.has(t)) { seen.add(t); out.push({ text: t, kind: `trigger of ${a.name}`, apply: () => completeWord(t) }); }
    }
  }
  for (const v of state.info.vocabulary || []) {
    if (/^[a-z]+$/.test(v) && v.startsWith(pre) && v !== pre && !seen.has(v)) {
      seen.add(v); out.push({ text: v, kind: "", apply: () => completeWord(v) });
    }
  }
  return out.slice(0, 8);
}

function completion() {
  const p = $("prompt"), list = $("complete");
  const hits = suggestions(p.value.slice(0, p.selectionStart));
  state.completions = hits;
  list.innerHTML = "";
  hits.forEach((h, i) => {
    const li = document.createElement("li");
    li.textContent = h.text;
    if (h.kind) { const k = document.createElement("span"); k.className = "kind"; k.textContent = h.kind; li.appendChild(k); }
    li.dataset.name = h.text;
    li.dataset.i = i;
    if (i === 0) li.classList.add("sel");
    li.addEventListener("mousedown", (e) => { e.preventDefault(); h.apply(); });
    list.appendChild(li);
  });
  list.hidden = hits.length === 0;
}

function complete(name) {
  const p = $("prompt");
  const pos = p.selectionStart, before = p.value.slice(0, pos), after = p.value.slice(pos);
  const start = before.search(/<lora:[A-Za-z0-9_-]*$/i);
  const rest = after.replace(/^[A-Za-z0-9_-]*(:[^>]*)?>?/, "");
  const tag = `<lora:${name}:1>`;
  p.value = before.slice(0, start) + tag + rest;
  p.selectionStart = p.selectionEnd = start + tag.length;
  $("complete").hidden = true;
  syncSliders();
}

function completeWord(word) {
  const p = $("prompt");
  const pos = p.selectionStart, before = p.value.slice(0, pos);
  const after = p.value.slice(pos).replace(/^[A-Za-z]*/, "");
  const head = before.replace(/[A-Za-z]+$/, "") + word + (/^\s/.test(after) ? "" : " ");
  p.value = head + after;
  p.selectionStart = p.selectionEnd = head.length;
  $("complete").hidden = true;
  syncSliders();
}

function completeToken(token, adapter) {
  const p = $("prompt");
  const pos = p.selectionStart, before = p.value.slice(0, pos);
  const after = p.value.slice(pos).replace(/^[A-Za-z0-9_-]*>?/, "");
  const head = before.replace(/<[A-Za-z0-9_-]*$/, "") + token + (/^\s/.test(after) ? "" : " ");
  p.value = head + after;
  p.selectionStart = p.selectionEnd = head.length;
  $("complete").hidden = true;
  if (adapter && !(adapter in parseTags(p.value))) setTag(adapter, 1);  // the token comes with its adapter
  syncSliders();
}

// A trigger chip of the adapters panel: the word goes in at the caret (never inside a tag), and the adapter's
// tag joins at weight 1 if it is not in the prompt yet: a trigger means nothing without its adapter.
function insertTrigger(word, adapter) {
  const p = $("prompt");
  let pos = p.selectionStart ?? p.value.length;
  if (insideTag(p.value.slice(0, pos))) pos = p.value.length;
  const before = p.value.slice(0, pos), after = p.value.slice(pos);
  const head = before + (before && !/\s$/.test(before) ? " " : "") + word;
  p.value = head + (after && !/^\s/.test(after) ? " " : "") + after;
  p.selectionStart = p.selectionEnd = head.length;
  if (adapter && !(adapter in parseTags(p.value))) setTag(adapter, 1);  // none: an embedding's token
  syncSliders();
}

function onPromptKey(e) {
  const list = $("complete");
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); list.hidden = true; generate(); return; }
  if (list.hidden) return;
  const items = [...list.children];
  let i = items.findIndex((li) => li.classList.contains("sel"));
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    e.preventDefault();
    items[i]?.classList.remove("sel");
    i = (i + (e.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
    items[i].classList.add("sel");
  } else if (e.key === "Enter" || e.key === "Tab") {
    e.preventDefault();
    state.completions[Math.max(i, 0)].apply();
  } else if (e.key === "Escape") {
    list.hidden = true;
  }
}

// ---------------------------------------------------------------- adapters panel
async function loadAdapters() {
  const { adapters, folder } = await api("/api/adapters");
  state.adapters = adapters;
  const box = $("adapters");
  box.innerHTML = "";
  for (const a of adapters) {
    const div = document.createElement("div");
    div.className = `adapter ${a.source}${a.fits === false ? " unfit" : ""}`;
    const fit = a.fits === true ? '<span class="badge ok">fits base</span>'
      : a.fits === false ? `<span class="badge no" title="${a.reason}">other base</span>`
        : '<span class="badge unk" title="no base fingerprint recorded">base unknown</span>';
    div.innerHTML = `<div><span class="name"></span>${fit}</div>
      <div class="row"><input type="range" min="-1" max="2" step="0.05" value="0"><span class="w">0</span></div>
      <div class="meta"></div><div class="triggers"></div>`;
    div.querySelector(".name").textContent = a.name;
    div.querySelector(".meta").textContent =
      `${a.method === "lora" ? "" : a.method + " · "}rank ${a.rank} · alpha ${a.alpha} · ${a.targets} · style ${a.style || "?"}` +
      (a.steps ? ` · ${a.steps} steps` : "") +
      (a.triggers?.length || a.tokens?.length || !isPrompt() ? "" : " · no trigger") +
      (a.source === "shipped" ? " · shipped" : "");
    for (const t of [...(a.triggers || []), ...(a.tokens || [])]) {  // click: into the prompt, with the tag
      const b = document.createElement("button");
      b.className = "trig small";
      b.textContent = t;
      b.title = `${t.startsWith("<") ? "token" : "trigger word"} of ${a.name}: insert it into the prompt`;
      b.dataset.trigger = t;
      b.dataset.adapter = a.name;
      b.disabled = a.fits === false;
      b.addEventListener("click", () => insertTrigger(t, a.name));
      div.querySelector(".triggers").appendChild(b);
    }
    const s = div.querySelector("input");
    s.dataset.adapter = a.name;
    s.disabled = a.fits === false;
    s.addEventListener("input", () => {
      div.querySelector(".w").textContent = fmt(Number(s.value));
      setTag(a.name, Number(s.value));
    });
    s.addEventListener("change", () => { if ($("auto").checked) generate(); });
    box.appendChild(div);
  }
  if (!adapters.length) box.textContent = "no adapters";
  const modes = [...adapters.filter((a) => a.fits !== false).map((a) => [`w:${a.name}`, `weights of ${a.name}`]),
    ["each", "each adapter at weight 1"]];
  const sel = $("compare-mode"), keep = sel.value;
  sel.innerHTML = "";
  for (const [v, t] of modes) sel.add(new Option(t, v));
  if (keep) sel.value = keep;
  $("train-status").dataset.folder = folder || "";
  syncSliders();
}

// The embeddings the prompt may use (GET /api/info): a chip per token; its <name> in the prompt brings it.
function renderEmbeddings() {
  const box = $("embeddings"), items = state.info?.embeddings || [];
  box.innerHTML = "";
  $("embeddings-panel").hidden = !isPrompt();
  if (!items.length) { box.textContent = "none (put NAME.safetensors in the adapters folder's embeddings/)"; return; }
  for (const e of items) {
    const b = document.createElement("button");
    b.className = "trig small";
    b.textContent = e.token;
    b.dataset.token = e.token;
    b.disabled = e.fits === false;
    b.title = e.fits === false ? `${e.name}: ${e.reason}`
      : `${e.name} (${e.source}; ${e.vectors} vector${e.vectors === 1 ? "" : "s"}${e.style ? `, style ${e.style}` : ""}): insert it into the prompt`;
    b.addEventListener("click", () => insertTrigger(e.token));
    box.appendChild(b);
  }
}

// ---------------------------------------------------------------- generation
function request() {
  const seed = $("seed-random").checked ? null : Number($("seed").value);
  return {
    prompt: $("prompt").value, negative: $("negative").disabled ? "" : $("negative").value, n: Number($("n").value), steps: Number($("steps").value),
    guidance: Number($("guidance").value), seed, loras: {},
  };
}

async function streamGenerate(body, onEvent) {
  const r = await fetch("/api/generate/stream", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  if (!r.ok) {
    const e = await r.json().catch(() => ({ error: `${r.status} ${r.statusText}` }));
    throw new Error(e.error);
  }
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let ev = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) ev = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      onEvent(ev, JSON.parse(data));
    }
  }
}

async function generate() {
  if (state.busy) { state.pending = true; return; }  // the latest settings run once the current job ends
  state.busy = true;
  showError("");
  $("generate").disabled = true;
  const out = $("output"), t0 = performance.now();
  let previews = 0, final = null;
  try {
    await streamGenerate(request(), (ev, d) => {
      if (ev === "queued") $("status").textContent = d.waiting > 1 ? `queued (${d.waiting} waiting)` : "starting";
      else if (ev === "preview") {
        previews += 1;
        out.src = `data:image/png;base64,${d.grid}`;
        out.dataset.state = "preview";
        out.dataset.previews = String(Number(out.dataset.previews) + 1);
        $("gen-bar").style.width = `${(100 * d.step) / d.steps}%`;
        $("status").textContent = `step ${d.step}/${d.steps} (predicted x0)`;
      } else if (ev === "done") final = d;
      else if (ev === "error") throw new Error(d.error);
    });
    if (!final) throw new Error("the stream ended without a result");
    show(final);
    const ms = Math.round(performance.now() - t0);
    $("status").textContent = `done in ${ms} ms · seed ${final.settings.seed} · ${previews} previews`;
    addHistory(final);
  } catch (e) {
    showError(e.message);
    $("status").textContent = "failed";
  } finally {
    state.busy = false;
    $("generate").disabled = false;
    if (state.pending) { state.pending = false; generate(); }
  }
}

function show(result) {
  const out = $("output"), warn = $("prompt-warning");
  warn.textContent = (result.warnings || []).join(" · ");
  warn.hidden = !warn.textContent;
  out.src = `data:image/png;base64,${result.grid}`;
  out.dataset.state = "done";
  out.dataset.resultId = result.id;
  $("gen-bar").style.width = "100%";
  $("command").textContent = result.command;
}

// ---------------------------------------------------------------- history
function summary(s) {
  const l = Object.entries(s.loras).map(([n, w]) => `${n} ${fmt(w)}`).join(", ");
  const what = s.prompts ? s.prompts.map((p) => `"${p}"`).join(" | ") + (s.negative ? ` − "${s.negative}"` : "")
    : s.digits.join(",");
  return `${what} ×${s.n} · ${s.steps} steps · w ${s.guidance} · seed ${s.seed}${l ? " · " + l : ""}`;
}

function addHistory(r) {
  state.history.unshift({ id: r.id, grid: r.grid, settings: r.settings, command: r.command });
  state.history = state.history.slice(0, 40);
  try { localStorage.setItem("l4d-history", JSON.stringify(state.history)); } catch (e) { /* full: keep in memory */ }
  renderHistory();
}

function renderHistory() {
  const box = $("history");
  box.innerHTML = "";
  for (const h of state.history) {
    const c = document.createElement("div");
    c.className = "card";
    c.innerHTML = `<img alt="history"><div class="meta"></div>
      <button class="rerun">re-run</button> <button class="copy">copy command</button>`;
    c.querySelector("img").src = `data:image/png;base64,${h.grid}`;
    c.querySelector("img").addEventListener("click", () => show(h));
    c.querySelector(".meta").textContent = summary(h.settings);
    c.querySelector(".rerun").addEventListener("click", () => { apply(h.settings); generate(); });
    c.querySelector(".copy").addEventListener("click", (e) => copy(h.command, e.target));
    box.appendChild(c);
  }
}

function apply(s) {
  const tags = Object.entries(s.loras).map(([n, w]) => `<lora:${n}:${fmt(w)}>`).join(" ");
  $("prompt").value = `${s.prompt} ${tags}`.trim();
  if (!$("negative").disabled) $("negative").value = s.negative || "";
  $("n").value = s.n; $("steps").value = s.steps; $("guidance").value = s.guidance;
  $("seed").value = s.seed; $("seed-random").checked = false;
  syncSliders();
}

async function copy(text, button) {
  try { await navigator.clipboard.writeText(text); } catch (e) {
    const t = document.createElement("textarea");
    t.value = text; document.body.appendChild(t); t.select(); document.execCommand("copy"); t.remove();
  }
  const old = button.textContent;
  button.textContent = "copied";
  setTimeout(() => { button.textContent = old; }, 1200);
}

// ---------------------------------------------------------------- compare (XY plot)
async function compare() {
  showError("");
  const base = request();
  const text = promptText(base.prompt);
  if (base.seed === null) { base.seed = Math.floor(Math.random() * 2 ** 31); $("seed").value = base.seed; }
  const mode = $("compare-mode").value;
  let rows;
  if (mode.startsWith("w:")) {
    const name = mode.slice(2);
    const ws = $("compare-weights").value.split(/[ ,]+/).filter(Boolean).map(Number);
    if (!ws.length || ws.some((w) => !Number.isFinite(w))) { showError("weights: numbers like 0, 0.5, 1"); return; }
    rows = ws.map((w) => [`${name} ${fmt(w)}`, w === 0 ? text : `${text} <lora:${name}:${fmt(w)}>`]);
  } else {
    rows = [["base", text], ...state.adapters.filter((a) => a.fits !== false)
      .map((a) => [a.name, `${text} <lora:${a.name}:1>`])];
  }
  const box = $("compare-rows");
  box.innerHTML = "";
  $("compare").disabled = true;
  try {
    for (const [label, prompt] of rows) {
      const r = await api("/api/generate", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ ...base, prompt }),
      });
      const row = document.createElement("div");
      row.className = "crow";
      row.innerHTML = "<span></span><img alt='compare row'>";
      row.querySelector("span").textContent = label;
      row.querySelector("img").src = `data:image/png;base64,${r.grid}`;
      row.querySelector("img").style.height = `${64 * r.settings.n}px`;
      row.title = r.command;
      box.appendChild(row);
    }
  } catch (e) { showError(e.message); } finally { $("compare").disabled = false; }
}

// ---------------------------------------------------------------- training
function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const rd = new FileReader();
    rd.onload = () => resolve(String(rd.result).split(",", 2)[1] || "");
    rd.onerror = () => reject(new Error("cannot read the file"));
    rd.readAsDataURL(file);
  });
}

async function startTraining() {
  const body = {
    name: $("train-name").value.trim(), style: $("train-style").value,
    rank: Number($("train-rank").value), steps: Number($("train-steps").value),
    method: $("train-method").value,
    validate_every: $("train-validate").disabled ? 0 : Number($("train-validate").value) || 0,
  };
  // prompt-model options: only those the installed train-lora takes (the others are disabled)
  if (!$("train-trigger").disabled && $("train-trigger").value.trim()) body.trigger = $("train-trigger").value.trim();
  if (!$("train-prior").disabled && $("train-prior").checked) body.prior = true;
  if (!$("train-te").disabled && $("train-te").checked) body.text_encoder = true;
  try {
    if (body.style === "upload") {
      const f = $("train-file").files[0];
      if (!f) throw new Error("choose a zip of images in folders 0-9");
      body.zip_base64 = await fileBase64(f);
    }
    const job = await api("/api/train", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    $("train-start").disabled = true;
    state.train = job.id;
    $("train-cancel").hidden = false;
    pollTraining(job.id);
  } catch (e) { $("train-status").textContent = e.message; }
}

async function pollTraining(id) {
  let job;
  try { job = await api(`/api/train/${id}`); } catch (e) { $("train-status").textContent = e.message; return; }
  $("train-bar").style.width = `${100 * job.progress}%`;
  drawLoss(job.loss, job.validation || []);
  const val = job.validation && job.validation.length ? job.validation[job.validation.length - 1] : null;
  const last = (job.loss.length ? ` · loss ${job.loss[job.loss.length - 1][1].toFixed(4)}` : "") +
    (val ? ` · validation ${val[1].toFixed(4)} (step ${val[0]})` : "");
  $("train-status").textContent = `${job.name}: ${job.status} · step ${job.step}/${job.steps}${last} · ${job.seconds} s` +
    (job.error ? ` · ${job.error}` : "");
  if (job.status === "running") { setTimeout(() => pollTraining(id), 1000); return; }
  $("train-start").disabled = false;
  $("train-cancel").hidden = true;
  if (job.status === "done") {
    const where = $("train-status").dataset.folder;
    $("train-status").textContent += where ? ` · saved in ${where}` : " · kept for this session (serve --adapters DIR keeps it)";
    await loadAdapters();
  }
}

// The training loss (orange) and, with "validate every", the held-out loss (red dots) on one scale.
function drawLoss(curve, validation = []) {
  const c = $("loss"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const all = curve.concat(validation);
  if (all.length < 2) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const px = (x) => 4 + ((x - x0) / (x1 - x0 || 1)) * (c.width - 8);
  const py = (y) => c.height - 4 - ((y - y0) / (y1 - y0 || 1)) * (c.height - 8);
  g.strokeStyle = "#f28c28"; g.lineWidth = 1.5; g.beginPath();
  curve.forEach(([x, y], i) => { if (i) g.lineTo(px(x), py(y)); else g.moveTo(px(x), py(y)); });
  g.stroke();
  g.strokeStyle = g.fillStyle = "#e0474c"; g.lineWidth = 1; g.beginPath();
  validation.forEach(([x, y], i) => { if (i) g.lineTo(px(x), py(y)); else g.moveTo(px(x), py(y)); });
  g.stroke();
  validation.forEach(([x, y]) => { g.beginPath(); g.arc(px(x), py(y), 2.5, 0, 2 * Math.PI); g.fill(); });
  g.fillStyle = "#9aa0aa"; g.font = "10px sans-serif";
  g.fillText(`loss ${y1.toFixed(3)}` + (validation.length ? " · red: validation" : ""), 4, 10);
  g.fillText(y0.toFixed(3), 4, c.height - 4);
}

// ---------------------------------------------------------------- the loaded base's kind
function setupModel(i) {
  const prompt = i.model === "prompt";
  document.body.dataset.model = i.model;
  const neg = $("negative");
  neg.disabled = !prompt;
  if (prompt) {
    neg.placeholder = "e.g. thin: guidance steers away from it";
    neg.title = "the negative prompt: guidance pushes from it toward the prompt";
    $("negative-hint").textContent = "";
    $("prompt-hint").innerHTML = "text for the text encoder (<code>a handwritten seven</code>), <code>|</code> " +
      "between prompts (a column each), adapters' trigger words, <code>&lt;lora:name:weight&gt;</code>, " +
      "embeddings' tokens (type <code>&lt;</code>)";
    $("digit-picks").hidden = true;
    $("n-label").textContent = "Images per prompt";
    if ($("prompt").value === "3 5 7") $("prompt").value = i.defaults.prompt;
  }
  const t = i.train || { options: {}, note: "" };
  const opts = [["train-trigger", "trigger"], ["train-prior", "prior"], ["train-te", "text_encoder"]];
  for (const [id, key] of opts) $(id).disabled = !prompt || !t.options[key];
  $("train-prompt").classList.toggle("off", opts.every(([id]) => $(id).disabled));
  $("train-note").textContent = !prompt ? "trigger, --prior, --text-encoder: for prompt models (this base reads digit labels)"
    : t.note ? `${t.note}: those options are off` : "";
  const dl = $("trigger-words");
  for (const w of i.trigger_words || []) dl.appendChild(new Option(w));
}

// ---------------------------------------------------------------- start
async function init() {
  for (let d = 0; d <= 9; d++) {
    const b = document.createElement("button");
    b.textContent = d; b.dataset.digit = d;
    b.addEventListener("click", () => pickDigit(d));
    $("digit-picks").appendChild(b);
  }
  try { state.history = JSON.parse(localStorage.getItem("l4d-history") || "[]"); } catch (e) { state.history = []; }
  renderHistory();
  $("prompt").addEventListener("input", () => { showError("", "prompt-error"); syncSliders(); completion(); });
  $("negative").addEventListener("input", () => showError("", "prompt-error"));
  $("prompt").addEventListener("keydown", onPromptKey);
  $("prompt").addEventListener("blur", () => { $("complete").hidden = true; });
  $("generate").addEventListener("click", generate);
  $("compare").addEventListener("click", compare);
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("history-clear").addEventListener("click", () => {
    state.history = []; localStorage.removeItem("l4d-history"); renderHistory();
  });
  $("train-style").addEventListener("change", () => {
    const upload = $("train-style").value === "upload";
    $("train-file-row").hidden = !upload;
    $("train-validate").disabled = upload;  // validation needs held-out digits: the built-in styles have them
  });
  $("train-start").addEventListener("click", startTraining);
  $("train-cancel").addEventListener("click", () => {
    if (state.train) api(`/api/train/${state.train}`, { method: "DELETE" }).catch((e) => showError(e.message));
  });
  try {
    state.info = await api("/api/info");
    const i = state.info;
    $("model-info").textContent = `${i.checkpoint} · ` +
      (i.model === "prompt" ? `prompt model (text encoder${i.latent ? ", latent + VAE" : ""})` : i.conditioning) +
      ` · ${i.device}`;
    setupModel(i);
    renderEmbeddings();
    $("steps").max = i.limits.steps; $("n").max = i.limits.n;
    $("steps").value = i.defaults.steps; $("guidance").value = i.defaults.guidance;
    await loadAdapters();
  } catch (e) { showError(`cannot reach the server: ${e.message}`); }
}

init();
