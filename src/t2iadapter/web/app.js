// The t2iadapter page: draw or upload a condition, extract, pick adapters and ControlNets, generate with progress, keep a
// history.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: null, source: null, job: null, adapters: {}, controlnets: {} };

// ------------------------------------------------------------------ API

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const token = sessionStorage.getItem("t2iadapter-token");
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, { method, headers: headers(body !== undefined), body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch (_) { data = null; }
  if (res.status === 401) { $("token-form").hidden = false; }
  if (!res.ok) {
    let detail = data && data.detail !== undefined ? data.detail : res.statusText;
    if (typeof detail !== "string") detail = detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    const retry = res.headers.get("Retry-After");
    const err = new Error(`${res.status}: ${detail}${retry ? ` (retry in ${retry} s)` : ""}`);
    err.status = res.status;
    throw err;
  }
  return data;
}

function setStatus(el, text, isError) {
  el.textContent = text;
  el.classList.toggle("error", !!isError);
}

// ------------------------------------------------------------------ canvas

const canvas = $("canvas");
const ctx = canvas.getContext("2d");
let drawing = null;

function clearCanvas() {
  ctx.globalCompositeOperation = "source-over";
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

function point(ev) {
  const r = canvas.getBoundingClientRect();
  return { x: (ev.clientX - r.left) * canvas.width / r.width, y: (ev.clientY - r.top) * canvas.height / r.height };
}

function stroke(from, to) {
  const eraser = document.querySelector("input[name=tool]:checked").value === "eraser";
  ctx.strokeStyle = eraser ? "#000" : $("pen-color").value;
  ctx.lineWidth = Number($("brush").value);
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

canvas.addEventListener("pointerdown", (ev) => {
  canvas.setPointerCapture(ev.pointerId);
  drawing = point(ev);
  stroke(drawing, drawing);
});
canvas.addEventListener("pointermove", (ev) => {
  if (!drawing) return;
  const p = point(ev);
  stroke(drawing, p);
  drawing = p;
});
for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { drawing = null; });

function canvasBase64() {
  return canvas.toDataURL("image/png").split(",")[1];
}

function drawImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      clearCanvas();
      const s = Math.min(canvas.width / img.width, canvas.height / img.height);
      const w = img.width * s, h = img.height * s;
      ctx.drawImage(img, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      resolve();
    };
    img.onerror = () => reject(new Error("the file is not an image the browser can show"));
    img.src = src;
  });
}

// ------------------------------------------------------------------ extraction

async function extract() {
  const name = $("extractor").value;
  if (!state.source) { state.source = canvas.toDataURL("image/png"); $("restore").disabled = false; }
  setStatus($("extract-status"), `extracting with ${name}…`);
  try {
    const out = await api("POST", "/v1/extract", { extractor: name, image: state.source.split(",")[1] });
    await drawImage("data:image/png;base64," + out.png);
    setStatus($("extract-status"), `${name}: ${out.width}x${out.height}, ${out.channels} channel(s)`);
  } catch (e) {
    setStatus($("extract-status"), e.message, true);
  }
}

// ------------------------------------------------------------------ adapters

// A row per registered adapter and ControlNet (`group`: "adapters" or "controlnets", the request field of its options).
function adapterRow(a, group = "adapters") {
  const div = document.createElement("div");
  div.className = "adapter";
  div.innerHTML = `
    <label><input type="checkbox" class="use"> <b></b></label>
    <span class="muted kind"></span>
    <img alt="condition snapshot" title="condition (the canvas when none is set)">
    <div class="row">
      <label>weight <input type="range" class="weight" min="0" max="2" step="0.05" value="1"></label>
      <output class="weight-value">1.00</output>
      <label>from <input type="number" class="start" min="0" max="1" step="0.05" value="0"></label>
      <label>to <input type="number" class="end" min="0" max="1" step="0.05" value="1"></label>
      <button type="button" class="snap">Use canvas</button>
    </div>`;
  div.querySelector("b").textContent = a.name;
  div.querySelector(".kind").textContent = group === "controlnets" ? "ControlNet" : `${a.kind}, ${a.channels || "?"}-ch`;
  div.querySelector(".use").checked = false;  // the user picks which adapter the drawing goes to
  div.querySelector(".use").id = `${group === "controlnets" ? "controlnet" : "adapter"}-${a.name}`;
  const weight = div.querySelector(".weight");
  weight.addEventListener("input", () => { div.querySelector(".weight-value").textContent = Number(weight.value).toFixed(2); });
  const entry = { el: div, condition: null };
  div.querySelector(".snap").addEventListener("click", () => {
    entry.condition = canvasBase64();
    div.querySelector("img").src = "data:image/png;base64," + entry.condition;
  });
  state[group][a.name] = entry;
  return div;
}

// ------------------------------------------------------------------ generation

function request() {
  const req = {
    prompt: $("prompt").value.trim(),
    negative_prompt: $("negative").value.trim() || null,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    width: Number($("width").value) || null,
    height: Number($("height").value) || null,
    scheduler: $("scheduler").value || null,
    compose: $("compose").value,
    fuser_windows: $("fuser-windows").value,
    conditions: {},
    adapters: {},
    controlnets: {},
  };
  if ($("seed").value !== "") req.seed = Number($("seed").value);
  sourceFields(req);
  const drawn = canvasBase64();
  let shown = null;
  for (const [group, name, a] of ["adapters", "controlnets"].flatMap((g) => Object.entries(state[g]).map(([n, e]) => [g, n, e]))) {
    if (!a.el.querySelector(".use").checked) continue;
    req.conditions[name] = a.condition || drawn;
    req[group][name] = {
      weight: Number(a.el.querySelector(".weight").value),
      window: `${a.el.querySelector(".start").value}:${a.el.querySelector(".end").value}`,
    };
    shown = shown || req.conditions[name];
  }
  return { req, shown: shown || drawn };
}

// img2img / inpainting (issue 15): an uploaded start image, optional mask, strength and paste-back.
const source = { init_image: null, mask_image: null };

function sourceFields(req) {
  if (!source.init_image) return;
  req.init_image = source.init_image;
  if ($("strength").value !== "") req.strength = Number($("strength").value);
  if (source.mask_image) {
    req.mask_image = source.mask_image;
    req.paste_back = $("paste-back").checked;
  }
  if (!$("width").dataset.touched) req.width = req.height = null;  // the start image's own size
}

for (const [id, key] of [["init-image", "init_image"], ["mask-image", "mask_image"]]) {
  $(id).addEventListener("change", async (ev) => {
    const file = ev.target.files[0];
    source[key] = file ? await new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(file); }) : null;
  });
}
for (const id of ["width", "height"]) $(id).addEventListener("input", () => { $("width").dataset.touched = "1"; });

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function generate() {
  const { req, shown } = request();
  $("sent-condition").src = "data:image/png;base64," + shown;
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  setStatus($("status"), "queued…");
  try {
    let job = await api("POST", "/v1/jobs", req);
    state.job = job.id;
    while (job.status === "queued" || job.status === "running") {
      $("progress").value = job.progress;
      setStatus($("status"), job.status === "queued" ? `queued (position ${job.position})` : `step ${Math.round(job.progress * req.steps)}/${req.steps}`);
      await sleep(200);
      job = await api("GET", `/v1/jobs/${job.id}`);
    }
    if (job.status !== "done") throw new Error(`${job.status}: ${job.error || ""}`);
    $("progress").value = 1;
    showResult(job.result, shown);
    setStatus($("status"), `done in ${job.result.seconds.toFixed(1)} s (seed ${job.result.parameters.seed})`);
  } catch (e) {
    setStatus($("status"), e.message, true);
  } finally {
    state.job = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function showResult(result, condition) {
  const p = result.parameters;
  result.images.forEach((image, i) => {
    const url = "data:image/png;base64," + image.png;
    if (i === 0) {
      $("result").src = url;
      $("result-caption").textContent = `result — seed ${p.seed}`;
    }
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = url;
    img.alt = p.prompt;
    const cond = document.createElement("img");
    cond.src = "data:image/png;base64," + condition;
    cond.alt = "condition";
    const link = document.createElement("a");
    link.href = url;
    link.download = `t2iadapter-${p.seed}-${i}.png`;
    link.textContent = "download PNG";
    const caption = document.createElement("div");
    const used = [...(p.adapters || []), ...(p.controlnets || []).map((c) => c.name)];
    caption.textContent = `${p.prompt} · seed ${p.seed} · ${p.steps} steps · ${used.join("+") || "text only"}`;
    li.append(img, cond, caption, link);
    $("history").prepend(li);
  });
}

// ------------------------------------------------------------------ start

async function load() {
  try {
    const m = await api("GET", "/v1/models");
    state.models = m;
    $("base").textContent = `base: ${m.base}`;
    const controlnets = (m.controlnets || []).map((name) => ({ name }));
    $("adapters").replaceChildren(...m.adapters.map((a) => adapterRow(a)), ...controlnets.map((c) => adapterRow(c, "controlnets")));
    if (!m.adapters.length && !controlnets.length) $("adapters").textContent = "no adapters registered: text only";
    $("extractor").replaceChildren(...m.extractors.map((e) => new Option(`${e.name}${e.needs_weights ? " (model)" : ""}`, e.name)));
    for (const s of m.schedulers) $("scheduler").append(new Option(s, s));
    $("width").value = m.default_size[0];
    $("height").value = m.default_size[1];
    $("width").max = $("height").max = m.limits.max_side;
    $("steps").max = m.limits.max_steps;
    $("steps").value = Math.min(m.defaults.steps, m.limits.max_steps);  // the server's GenerationRequest defaults
    $("guidance").value = m.defaults.guidance_scale;
    $("compose").value = m.defaults.compose;
    $("fuser-windows").value = m.defaults.fuser_windows;
    $("compose").querySelector("option[value=fuser]").disabled = !m.fuser;  // the server was started with --fuser
    $("compose").title = m.fuser ? "how the checked adapters combine" : "weighted sum (the server has no fuser)";
    setStatus($("status"), "ready");
  } catch (e) {
    setStatus($("status"), e.message, true);
  }
}

$("clear").addEventListener("click", () => { clearCanvas(); state.source = null; $("restore").disabled = true; });
$("upload").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  const url = await new Promise((resolve) => { const r = new FileReader(); r.onload = () => resolve(r.result); r.readAsDataURL(file); });
  try {
    await drawImage(url);
    state.source = url;
    $("restore").disabled = false;
  } catch (e) {
    setStatus($("extract-status"), e.message, true);
  }
});
$("restore").addEventListener("click", () => state.source && drawImage(state.source));
$("extract").addEventListener("click", extract);
$("compose").addEventListener("change", () => { $("fuser-windows").disabled = $("compose").value !== "fuser"; });
$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", () => state.job && api("DELETE", `/v1/jobs/${state.job}`).catch(() => {}));
$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem("t2iadapter-token", $("token").value);
  $("token-form").hidden = true;
  load();
});

clearCanvas();
load();
