// unmask demo page: streams /v1/completions (or chat) with `diffusing: true` and animates every denoising
// state; the Instant Edit pane streams /v1/edits the same way. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// One entry per frame drawn: {panel, step, masked, total, final}. Lets a test (or you, in the console) check
// that intermediate masked states were really shown.
window.unmaskLog = [];

// --- Server-Sent Events over fetch (EventSource cannot POST) ---------------------------------------
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch (e) {
    return `HTTP ${res.status}`;
  }
}

// --- drawing ----------------------------------------------------------------------------------------
// A canvas is a list of pieces (the text of each position, null where still masked). Each position is a
// span, so a masked "░" visibly turns into its token; positions committed by this step flash yellow.
// `confidence` (optional, per position): the probability each token had when it was committed, shown as
// a red underline that deepens as it falls, and as the span's tooltip. `drafted` (optional, a Set): under
// the verify policy, where confidence means nothing (every token is the model's own greedy one), the
// positions confirmed from a draft — committed in the same step as the token before them — underlined green.
function drawPieces(el, pieces, changed, confidence, drafted) {
  const fresh = new Set(changed || []);
  const frag = document.createDocumentFragment();
  pieces.forEach((p, i) => {
    const s = document.createElement("span");
    s.className = p === null ? "tok masked" : fresh.has(i) ? "tok fresh" : "tok";
    s.textContent = p === null ? "░" : p;
    const c = confidence ? confidence[i] : null;
    if (p !== null && typeof c === "number") {
      s.classList.add("scored");
      s.style.setProperty("--doubt", (1 - c).toFixed(3));
      s.title = `${(100 * c).toFixed(1)}% sure when committed`;
    }
    if (p !== null && drafted && drafted.has(i)) {
      s.classList.add("drafted");
      s.title = "confirmed from a draft, in one step with the token before it";
    }
    frag.appendChild(s);
  });
  el.replaceChildren(frag);
}

// Final text, with the part that differs from `before` highlighted (common prefix/suffix left plain).
function drawDiff(el, before, after) {
  let a = 0;
  while (a < before.length && a < after.length && before[a] === after[a]) a++;
  let b = 0;
  while (b < before.length - a && b < after.length - a &&
         before[before.length - 1 - b] === after[after.length - 1 - b]) b++;
  const mid = document.createElement("span");
  mid.className = "tok changed";
  mid.textContent = after.slice(a, after.length - b);
  el.replaceChildren(document.createTextNode(after.slice(0, a)), mid,
                     document.createTextNode(after.slice(after.length - b)));
}

// Plays frames no faster than `frame delay` so a fast model still shows its steps; never drops the last.
class Player {
  constructor(draw) { this.draw = draw; this.queue = []; this.running = null; }
  push(frame) {
    this.queue.push(frame);
    if (!this.running) this.running = this.loop();
  }
  async loop() {
    while (this.queue.length) {
      // far behind (a huge number of steps): skip to the newer states, keeping order
      if (this.queue.length > 200) this.queue.splice(0, this.queue.length - 50);
      this.draw(this.queue.shift());
      const delay = Math.max(0, Number($("frame_delay").value) || 0);
      await sleep(delay);
    }
    this.running = null;
  }
  async drain() { while (this.running) await this.running; }
  clear() { this.queue = []; }
}

function setCounter(id, v) { $(id).textContent = v; }
const fmt = (x, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : "–");

// --- Generate ---------------------------------------------------------------------------------------
function numberOr(id, parse = Number) {
  const v = $(id).value.trim();
  return v === "" ? undefined : parse(v);
}

// --- policies: the select and one input per knob, from the server's registry (GET /v1/policies) ----------
let policies = [];

function knobInput(knob) {
  const input = document.createElement("input");
  Object.assign(input, { id: knob.name, type: "number", value: knob.default, title: `${knob.help} (${knob.range})` });
  input.step = knob.type === "int" ? "1" : "any";
  if ("ge" in knob || "gt" in knob) input.min = "ge" in knob ? knob.ge : knob.gt;
  if ("le" in knob || "lt" in knob) input.max = "le" in knob ? knob.le : knob.lt;
  const label = document.createElement("label");
  label.dataset.knob = knob.name;
  label.append(`${knob.name.replace(/_/g, " ")} `, input);
  return label;
}

async function loadPolicies() {
  const list = await (await fetch("/v1/policies")).json();
  policies = list.data;
  $("policy").replaceChildren(...policies.map((p) => Object.assign(document.createElement("option"),
    { value: p.name, textContent: p.name, title: p.help })));
  $("policy").value = list.default;
  const knobs = new Map();  // policies that read the same knob share its input
  policies.forEach((p) => p.params.forEach((k) => knobs.set(k.name, k)));
  $("policy-params").replaceChildren(...[...knobs.values()].map(knobInput));
  showKnobs();
}

function policyKnobs() {
  const p = policies.find((q) => q.name === $("policy").value);
  return p ? p.params.map((k) => k.name) : [];
}

const verifying = () => $("policy").value === "verify";

// Positions a verify step confirmed from drafts: all it committed but the first (the model's own next token).
function confirmedDrafts(changed) {
  return [...(changed || [])].sort((a, b) => a - b).slice(1);
}

function showKnobs() {  // only the chosen policy's knobs are shown and sent
  $("legend-confidence").hidden = verifying();
  $("legend-verify").hidden = !verifying();
  const used = new Set(policyKnobs());
  document.querySelectorAll("#policy-params label").forEach((l) => { l.hidden = !used.has(l.dataset.knob); });
  $("policy").title = (policies.find((q) => q.name === $("policy").value) || {}).help || "";
}

function generateBody() {
  const body = {
    max_tokens: numberOr("max_tokens", parseInt),
    block_length: numberOr("block_length", parseInt),
    policy: $("policy").value,
    steps: numberOr("steps", parseInt),
    temperature: numberOr("temperature"),
    top_p: numberOr("top_p"),
    seed: numberOr("seed", parseInt),
    stream: true, diffusing: true, stream_options: { include_usage: true },
  };
  if (body.policy !== "fixed") delete body.steps;  // steps only shape the fixed schedule
  policyKnobs().forEach((name) => { body[name] = numberOr(name); });
  Object.keys(body).forEach((k) => body[k] === undefined && delete body[k]);
  return body;
}

let genAbort = null;

async function generate() {
  const chat = document.querySelector("input[name=kind]:checked").value === "chat";
  const prompt = $("prompt").value;
  const body = generateBody();
  if (chat) body.messages = [{ role: "user", content: prompt }];
  else body.prompt = prompt;
  const verify = verifying();
  // per-token confidence for the underline; under verify the underline marks confirmed drafts instead
  if ($("shade").checked && !verify) body.logprobs = chat ? true : 0;
  const drafted = new Set();
  const out = $("gen-output");
  const canvas = $("canvas");
  $("gen-error").textContent = "";
  $("prompt-echo").textContent = chat ? "" : prompt;
  canvas.replaceChildren();
  ["c-step", "c-masked", "c-tps", "c-tpstep", "c-nfe", "c-time"].forEach((id) => setCounter(id, "–"));
  out.dataset.state = "running";
  $("go").disabled = true;
  $("stop").disabled = false;

  const player = new Player((f) => {
    drawPieces(canvas, f.d.pieces, f.d.changed, f.d.confidence, f.drafted);
    setCounter("c-step", f.d.step);
    setCounter("c-masked", `${f.d.masked}/${f.d.total}`);
    if (f.tps !== undefined) setCounter("c-tps", fmt(f.tps));
    window.unmaskLog.push({ panel: "generate", step: f.d.step, masked: f.d.masked, total: f.d.total,
                            final: !!f.d.final });
    out.scrollTop = out.scrollHeight;
  });
  genAbort = new AbortController();
  const t0 = performance.now();
  let usage = null;
  let finalText = null;
  try {
    const res = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: genAbort.signal,
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (!chunk.choices || !chunk.choices.length) continue;
      const c = chunk.choices[0];
      if (!c.diffusion) continue;
      const secs = (performance.now() - t0) / 1000;
      if (verify) confirmedDrafts(c.diffusion.changed).forEach((i) => drafted.add(i));
      player.push({ d: c.diffusion, tps: (c.diffusion.total - c.diffusion.masked) / Math.max(secs, 1e-3),
                    drafted: verify && $("shade").checked ? new Set(drafted) : null });
      if (c.finish_reason) finalText = chat ? c.delta.content : c.text;
    }
    await player.drain();
    if (finalText !== null && canvas.textContent !== finalText) canvas.textContent = finalText;
    if (usage) {
      setCounter("c-tps", fmt(usage.completion_tokens / Math.max(usage.seconds, 1e-6)));
      setCounter("c-tpstep", fmt(usage.tokens_per_step, 2));
      setCounter("c-nfe", usage.nfe);
      setCounter("c-step", usage.steps);
      setCounter("c-time", fmt(usage.seconds, 2));
    }
    out.dataset.state = "done";
  } catch (e) {
    player.clear();
    out.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    if (e.name !== "AbortError") $("gen-error").textContent = e.message;
  } finally {
    $("go").disabled = false;
    $("stop").disabled = true;
    genAbort = null;
  }
}

// --- Instant Edit -----------------------------------------------------------------------------------
let selection = null;
let lastEdit = null;

// The server counts characters (code points); a textarea counts UTF-16 units, two per emoji.
const charOffset = (text, units) => [...text.slice(0, units)].length;

function updateSelection() {
  const ta = $("edit-input");
  const [s, e] = [charOffset(ta.value, ta.selectionStart), charOffset(ta.value, ta.selectionEnd)];
  selection = e > s ? [s, e] : null;
  $("selection").textContent = selection ? `selection ${s}–${e} (${e - s} chars)` : "no selection";
  $("edit-span").disabled = !selection;
}

async function runEdit(extra) {
  const input = $("edit-input").value;
  const out = $("edit-output");
  const canvas = $("edit-canvas");
  $("edit-error").textContent = "";
  out.dataset.state = "running";
  $("edit-accept").disabled = true;
  ["edit-span", "edit-auto", "edit-instr"].forEach((id) => ($(id).disabled = true));
  const player = new Player((f) => {
    drawPieces(canvas, f.pieces, f.changed);
    setCounter("e-step", f.step);
    setCounter("e-masked", f.masked);
    window.unmaskLog.push({ panel: "edit", step: f.step, masked: f.masked, total: f.total, final: false });
  });
  try {
    const res = await fetch("/v1/edits", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ input, stream: true, diffusing: true, ...extra }),
    });
    if (!res.ok) throw new Error(await errorMessage(res));
    let result = null;
    let usage = null;
    for await (const chunk of sseEvents(res)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const c = chunk.choices && chunk.choices[0];
      if (!c) continue;
      if (c.finish_reason) { result = c.text; usage = chunk.usage; }
      else if (c.diffusion) player.push(c.diffusion);
    }
    await player.drain();
    if (result !== null) {
      drawDiff(canvas, input, result);
      lastEdit = result;
      $("edit-accept").disabled = false;
    }
    if (usage) {
      setCounter("e-step", usage.steps);
      setCounter("e-time", fmt(usage.seconds, 2));
    }
    out.dataset.state = "done";
  } catch (e) {
    out.dataset.state = "error";
    $("edit-error").textContent = e.message;
  } finally {
    $("edit-auto").disabled = false;
    $("edit-instr").disabled = false;
    updateSelection();
  }
}

// --- wiring -----------------------------------------------------------------------------------------
let defaultsShown = false;
async function checkServer() {
  try {
    const models = await (await fetch("/v1/models")).json();
    const m = models.data[0];
    $("model").textContent = `${m.id} · context ${m.max_model_len}`;
    if (!defaultsShown) {  // the model's recommended decoding (generation_config.json), once: then the user's
      const d = m.defaults || {};
      if (d.block_length) $("block_length").value = d.block_length;
      await loadPolicies();  // the policy and its knobs, at the model's defaults
      defaultsShown = true;
    }
    const health = await (await fetch("/health")).json();
    $("server-status").textContent = health.status === "ok" ? `ready · queue ${health.queue_depth}` : health.status;
    $("server-status").className = health.status === "ok" ? "pill ok" : "pill bad";
  } catch (e) {
    $("server-status").textContent = "server unreachable";
    $("server-status").className = "pill bad";
  }
}

$("go").addEventListener("click", generate);
$("policy").addEventListener("change", showKnobs);
$("stop").addEventListener("click", () => genAbort && genAbort.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
["select", "mouseup", "keyup"].forEach((ev) => $("edit-input").addEventListener(ev, updateSelection));
$("edit-span").addEventListener("click", () => selection && runEdit({ mode: "spans", spans: [selection] }));
$("edit-auto").addEventListener("click", () => runEdit({ mode: "auto" }));
$("edit-instr").addEventListener("click", () => runEdit({
  mode: "instruction", instruction: $("instruction").value, strength: Number($("strength").value),
}));
$("edit-accept").addEventListener("click", () => {
  if (lastEdit !== null) $("edit-input").value = lastEdit;
  $("edit-accept").disabled = true;
  updateSelection();
});
checkServer();
