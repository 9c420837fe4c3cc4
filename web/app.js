"use strict";
// fastflow's demo page: the sampler exported by `python -m fastflow.export` (noise [B,1,28,28], labels [B][, w [1]]
// -> images [B,1,28,28] in [0, 1]) run by onnxruntime-web's wasm back end on one thread, from ./vendor/ (`make web`).
//
// window.fastflowGenerate(digit, count, {w, noise, raw}) draws `count` digits ("all": 0-9 in turn) and resolves
// to {ms, drawMs, count, labels} (and with raw, the graph's output `images`); ms times session.run alone.
// `noise` (count·784 numbers) replaces the page's own draw, so a test can feed the noise fastflow.sample uses.
// ?seed=N makes the page's own noise repeatable.
// window.fastflowReady is set once the model is loaded ({loadMs, inputs, version}), window.fastflowError if not.

const PIXELS = 28 * 28;
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
let session = null;
let takesW = false;
let queue = Promise.resolve(); // one generation at a time
const uniform = mulberry32(params.has("seed") ? Number(params.get("seed")) >>> 0 : crypto.getRandomValues(new Uint32Array(1))[0]);

function mulberry32(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (((t ^ (t >>> 14)) >>> 0) + 0.5) / 4294967296; // in (0, 1): log() below stays finite
  };
}

function gaussian(n) {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(uniform()));
    const a = 2 * Math.PI * uniform();
    out[i] = r * Math.cos(a);
    if (i + 1 < n) out[i + 1] = r * Math.sin(a);
  }
  return out;
}

function checkRequest(digit, count) {
  if (!(digit === "all" || (Number.isInteger(digit) && digit >= 0 && digit <= 9))) {
    throw new Error(`digit must be 0-9 or "all", got ${digit}`);
  }
  if (!(Number.isInteger(count) && count >= 1 && count <= 256)) {
    throw new Error(`count must be an integer in 1-256, got ${count}`);
  }
}

function draw(images, labels) {
  const grid = $("grid");
  grid.replaceChildren();
  for (let i = 0; i < labels.length; i++) {
    const canvas = document.createElement("canvas");
    canvas.width = canvas.height = 28;
    canvas.dataset.label = String(labels[i]);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    const img = ctx.createImageData(28, 28);
    for (let p = 0; p < PIXELS; p++) {
      const v = Math.round(Math.min(1, Math.max(0, images[i * PIXELS + p])) * 255);
      img.data[4 * p] = img.data[4 * p + 1] = img.data[4 * p + 2] = v;
      img.data[4 * p + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    grid.appendChild(canvas);
  }
}

async function run(digit, count, opts) {
  checkRequest(digit, count);
  if (!session) throw new Error("the model is not loaded");
  const labels = new BigInt64Array(count);
  for (let i = 0; i < count; i++) labels[i] = BigInt(digit === "all" ? i % 10 : digit);
  const noise = opts.noise ? Float32Array.from(opts.noise) : gaussian(count * PIXELS);
  if (noise.length !== count * PIXELS) throw new Error(`noise must hold ${count * PIXELS} numbers, got ${noise.length}`);
  const feeds = {
    noise: new ort.Tensor("float32", noise, [count, 1, 28, 28]),
    labels: new ort.Tensor("int64", labels, [count]),
  };
  const w = opts.w ?? Number($("w").value);
  if (takesW) feeds.w = new ort.Tensor("float32", Float32Array.of(w), [1]);
  const t0 = performance.now();
  const out = await session.run(feeds);
  const ms = performance.now() - t0;
  const t1 = performance.now();
  draw(out.images.data, labels);
  const drawMs = performance.now() - t1;
  $("digit").value = String(digit); // the controls show what was drawn, however it was asked for
  $("count").value = String(count);
  if (takesW) $("w").value = String(w);
  const what = digit === "all" ? "digits 0–9" : `digit ${digit}`;
  $("status").textContent =
    `${count} × ${what}${takesW ? `, w = ${w}` : ""}: generated in ${ms.toFixed(1)} ms ` +
    `(${(ms / count).toFixed(2)} ms a digit; onnxruntime-web wasm, 1 thread)`;
  const result = { ms, drawMs, count, labels: Array.from(labels, Number) };
  if (opts.raw) result.images = Array.from(out.images.data); // the graph's output itself, before drawing
  return result;
}

function generate(digit, count, opts = {}) {
  const job = queue.then(() => run(digit, count, opts));
  queue = job.catch(() => {});
  return job;
}

async function onClick() {
  const pick = $("digit").value;
  const digit = pick === "all" ? "all" : Number(pick);
  $("go").disabled = true;
  try {
    await generate(digit, Number($("count").value));
  } catch (e) {
    $("status").textContent = `error: ${e.message}`;
  } finally {
    $("go").disabled = false;
  }
}

async function init() {
  ort.env.wasm.wasmPaths = new URL("./vendor/", location.href).href; // ort resolves a relative one from its script
  ort.env.wasm.numThreads = 1;
  try {
    const t0 = performance.now();
    session = await ort.InferenceSession.create("./model.onnx", { executionProviders: ["wasm"] });
    const loadMs = performance.now() - t0;
    takesW = session.inputNames.includes("w");
    if (params.has("w")) $("w").value = params.get("w");
    $("w-label").classList.toggle("hidden", !takesW);
    const version = (ort.env.versions && ort.env.versions.web) || "?";
    $("info").textContent =
      `model.onnx (inputs ${session.inputNames.join(", ")}) loaded in ${loadMs.toFixed(0)} ms; ` +
      `onnxruntime-web ${version}, wasm, 1 thread`;
    $("go").disabled = false;
    window.fastflowReady = { loadMs, inputs: session.inputNames, version };
  } catch (e) {
    $("info").textContent = `could not load model.onnx (${e.message}); export one: make demo`;
    window.fastflowError = String(e && e.message ? e.message : e);
  }
}

window.fastflowGenerate = generate;
$("go").addEventListener("click", onClick);
init();
