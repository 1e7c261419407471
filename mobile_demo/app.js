// retrieval-sdk mobile demo: the bundle's query model runs here (onnxruntime-web, WASM); the embedding
// goes to the gallery server (POST /v1/search) and the nearest gallery images come back.
//
// Everything is fetched from this origin (the server that serves this page): the app, onnxruntime-web
// (ort/), the model and its manifest (model/), the API (../v1/). The model and the app are cached for
// offline use (the service worker and the model cache below).

import { parseSpec, preprocessPixels } from "./preprocess.js";

const MODEL_CACHE = "retrieval-sdk-demo-models";
const PRECISIONS = ["fp32", "fp16", "int8"];
const MAX_PIXELS = 16_000_000; // larger photos are scaled down first (canvas limits on phones)
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const api = (path) => new URL(`../${path}`, location.href).href;

const state = {
  ort: null,
  session: null,
  manifest: null,
  entry: null,
  file: null,
  spec: null,
  threads: 1,
  serverSpace: null,
  stream: null,
  blobUrls: [],
  busy: false,
};

class UserMessage extends Error {}

// ------------------------------------------------------------------------------------------ UI bits
function setStatus(kind, text) {
  const el = $("status");
  el.dataset.state = kind;
  el.textContent = text;
}

function showBanner(kind, title, text) {
  const el = $("banner");
  el.hidden = false;
  el.dataset.kind = kind;
  el.replaceChildren();
  const strong = document.createElement("strong");
  strong.textContent = title;
  el.append(strong, document.createTextNode(text));
}

function showMessage(text, kind = "info") {
  const el = $("message");
  el.hidden = !text;
  el.dataset.kind = kind;
  el.textContent = text || "";
}

function setBusy(busy) {
  state.busy = busy;
  const ready = !!state.session && !busy;
  $("camera-button").disabled = !ready;
  $("file-input").disabled = !ready;
  $("file-label").dataset.disabled = String(!ready);
  $("shutter").disabled = !ready;
}

const ms = (t) => (t < 10 ? t.toFixed(1) : Math.round(t).toString()) + " ms";

// ------------------------------------------------------------------------------------------ model
function pickFile(entry) {
  const want = params.get("precision");
  const files = entry.files.filter((f) => f.format === "onnx" && (!want || f.precision === want));
  files.sort((a, b) => PRECISIONS.indexOf(a.precision) - PRECISIONS.indexOf(b.precision));
  if (!files.length) {
    throw new UserMessage(`The bundle has no ${want ? want + " " : ""}ONNX file for the query model; ` +
      "export one with `retrieval-sdk export --format onnx`.");
  }
  return files[0];
}

async function sha256Hex(bytes) {
  if (!crypto.subtle) return null; // not a secure context (plain http on a LAN address)
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

// The model bytes, from the model cache when this exact file (sha256) was downloaded before.
async function fetchModel(file) {
  const url = new URL(`model/${file.path}?sha256=${file.sha256}`, location.href).href;
  const cache = self.caches ? await caches.open(MODEL_CACHE).catch(() => null) : null;
  let resp = cache ? await cache.match(url) : undefined;
  const cached = !!resp;
  if (!resp) {
    try {
      resp = await fetch(url);
    } catch {
      throw new UserMessage("Cannot download the model: the server is unreachable and the model is not cached yet.");
    }
    if (!resp.ok) throw new UserMessage(`Cannot download the model: HTTP ${resp.status}.`);
  }
  const bytes = new Uint8Array(await resp.arrayBuffer());
  const sha = await sha256Hex(bytes);
  if (sha && file.sha256 && sha !== file.sha256) {
    if (cache) await cache.delete(url);
    throw new UserMessage("The downloaded model does not match the sha256 in the bundle manifest; reload the page.");
  }
  if (cache && !cached) {
    for (const old of await cache.keys()) await cache.delete(old); // keep only the current model
    await cache.put(url, new Response(bytes, { headers: { "Content-Type": "application/octet-stream" } }));
  }
  return { bytes, cached };
}

async function loadOrt() {
  try {
    return await import("./ort/ort.wasm.min.mjs");
  } catch (e) {
    throw new UserMessage("onnxruntime-web could not be loaded from this server (ort/ort.wasm.min.mjs): " +
      "run `npm ci` in mobile_demo/ on the server. " + e.message);
  }
}

async function loadModel() {
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch("model/manifest.json", { cache: "no-cache" });
  } catch {
    throw new UserMessage("The server is unreachable and the app has not been cached yet: connect and reload.");
  }
  if (!resp.ok) throw new UserMessage(`Cannot read the bundle manifest: HTTP ${resp.status}.`);
  const manifest = await resp.json();
  const entry = manifest.models && manifest.models.query;
  if (!entry) throw new UserMessage("The bundle has no query model.");
  const spec = parseSpec(entry.preprocess);
  const file = pickFile(entry);
  const [ort, model] = await Promise.all([loadOrt(), fetchModel(file)]);
  const isolated = self.crossOriginIsolated === true;
  const threads = Number(params.get("threads")) ||
    (isolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1);
  ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  ort.env.wasm.numThreads = threads;
  ort.env.logLevel = "error";
  const session = await ort.InferenceSession.create(model.bytes, {
    executionProviders: ["wasm"],
    graphOptimizationLevel: "all",
  });
  // One warm-up run, so the first query's latency is the model's, not the JIT's.
  const [h, w] = spec.input_size;
  const dims = spec.layout === "NCHW" ? [1, 3, h, w] : [1, h, w, 3];
  const input = session.inputNames.includes(file.input_name) ? file.input_name : session.inputNames[0];
  const output = session.outputNames.includes(file.output_name) ? file.output_name : session.outputNames[0];
  await session.run({ [input]: new ort.Tensor("float32", new Float32Array(h * w * 3), dims) });
  Object.assign(state, { ort, session, manifest, entry, file, spec, threads, input, output });
  const loadMs = performance.now() - t0;
  $("model-line").textContent = `${entry.name || "query"} · ${entry.embedding_dim}-d · ${h}×${w} ${spec.interpolation} · ` +
    `space ${manifest.embedding_space}`;
  $("runtime-line").textContent = `onnxruntime-web WASM · ${threads} thread${threads > 1 ? "s" : ""}` +
    `${isolated ? " (cross-origin isolated)" : ""} · ${file.precision} ${(model.bytes.length / 1e6).toFixed(1)} MB` +
    `${model.cached ? " from cache" : ""} · ready in ${ms(loadMs)}`;
  return { loadMs };
}

// ------------------------------------------------------------------------------------------ server
function authHeaders() {
  const key = localStorage.getItem("retrieval-sdk-demo.api-key");
  return key ? { "X-API-Key": key } : {};
}

function mismatchText(mine, theirs) {
  return `This phone's model embeds into space "${mine}", but the server's gallery is space "${theirs}". ` +
    "Vectors of different spaces are not comparable, so the server refuses the search. Serve the demo with " +
    "the bundle the gallery index was built with, or export a query model trained into the server's space.";
}

async function checkServer() {
  let resp;
  try {
    resp = await fetch(api("v1/model"), { headers: authHeaders() });
  } catch {
    showBanner("warn", "Server unreachable.", " The model still runs on this device; searching needs the server.");
    return;
  }
  if (resp.status === 401 || resp.status === 403) {
    showBanner("warn", "API key needed.", " The server asks for a key with the 'read' scope: enter it under Settings.");
    return;
  }
  if (!resp.ok) return;
  const info = await resp.json();
  state.serverSpace = info.embedding_space;
  const mine = state.manifest.embedding_space;
  if (info.embedding_space !== mine) {
    showBanner("error", "Embedding spaces do not match.", " " + mismatchText(mine, info.embedding_space));
  } else if (info.embedding_dim !== state.entry.embedding_dim) {
    showBanner("error", "Embedding sizes do not match.",
      ` The model gives ${state.entry.embedding_dim}-d vectors, the server expects ${info.embedding_dim}-d.`);
  } else {
    $("banner").hidden = true;
    $("subtitle").textContent = `gallery of ${info.index.items} images · same embedding space`;
  }
}

function b64(floats) {
  const bytes = new Uint8Array(floats.buffer, floats.byteOffset, floats.byteLength);
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function search(embedding) {
  const k = Math.max(1, Math.min(100, Number($("top-k").value) || 12));
  const body = { space: state.manifest.embedding_space, embedding_b64: b64(embedding), dtype: "float32", k };
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch(api("v1/search"), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
  } catch {
    throw new UserMessage("The server is unreachable (offline?): the photo was embedded on this device, " +
      "but searching the gallery needs the server.");
  }
  const data = await resp.json().catch(() => ({}));
  if (resp.status === 409) {
    const theirs = state.serverSpace || "another space";
    showBanner("error", "Embedding spaces do not match.", " " + mismatchText(state.manifest.embedding_space, theirs));
    throw new UserMessage(`The server refused the query: ${data.detail || "embedding space mismatch"}`);
  }
  if (resp.status === 401 || resp.status === 403) {
    throw new UserMessage(`The server needs an API key with the 'read' scope (Settings): ${data.detail || resp.status}`);
  }
  if (!resp.ok) throw new UserMessage(`Search failed: ${data.detail || "HTTP " + resp.status}`);
  return { ...data, roundTripMs: performance.now() - t0 };
}

async function thumbnail(img, id, tile) {
  try {
    const resp = await fetch(api(`v1/items/${encodeURIComponent(id)}/thumbnail`), { headers: authHeaders() });
    if (!resp.ok) throw new Error(String(resp.status));
    const url = URL.createObjectURL(await resp.blob());
    state.blobUrls.push(url);
    img.src = url;
    await img.decode().catch(() => {});
  } catch {
    const ph = document.createElement("div");
    ph.className = "thumb placeholder";
    ph.textContent = id;
    img.replaceWith(ph);
  }
  tile.dataset.loaded = "true";
}

function renderResults(results) {
  for (const url of state.blobUrls.splice(0)) URL.revokeObjectURL(url);
  const list = $("results");
  list.replaceChildren();
  const loads = results.map((hit, i) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.dataset.id = hit.id;
    li.dataset.score = String(hit.score);
    const img = document.createElement("img");
    img.className = "thumb";
    img.alt = hit.id;
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `${i + 1}. ${hit.score.toFixed(3)}`;
    const id = document.createElement("div");
    id.className = "id";
    id.textContent = hit.id.split("/").pop() || hit.id; // ids are often relative paths: show the file name
    id.title = hit.id;
    const bar = document.createElement("div");
    bar.className = "scorebar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, hit.score)) * 100}%`;
    bar.append(fill);
    meta.append(score, id, bar);
    li.append(img, meta);
    list.append(li);
    return thumbnail(img, hit.id, li);
  });
  return Promise.all(loads);
}

// ------------------------------------------------------------------------------------------ query
async function decodeFile(file) {
  let bitmap;
  try {
    // EXIF orientation applied (photos show upright); colour values as stored, like PIL (no ICC conversion).
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });
  } catch {
    throw new UserMessage(`"${file.name}" is not an image this browser can read (try JPEG, PNG or WebP).`);
  }
  try {
    return readPixels(bitmap, bitmap.width, bitmap.height);
  } finally {
    bitmap.close();
  }
}

function readPixels(source, width, height) {
  const scale = width * height > MAX_PIXELS ? Math.sqrt(MAX_PIXELS / (width * height)) : 1;
  const w = Math.max(1, Math.round(width * scale));
  const h = Math.max(1, Math.round(height * scale));
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(source, 0, 0, w, h);
  return { pixels: ctx.getImageData(0, 0, w, h).data, width: w, height: h, exact: scale === 1 };
}

function drawPreview(rgb, w, h) {
  const canvas = $("query-canvas");
  canvas.width = w;
  canvas.height = h;
  const rgba = new Uint8ClampedArray(w * h * 4);
  for (let i = 0; i < w * h; i++) {
    rgba[4 * i] = rgb[3 * i];
    rgba[4 * i + 1] = rgb[3 * i + 1];
    rgba[4 * i + 2] = rgb[3 * i + 2];
    rgba[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(new ImageData(rgba, w, h), 0, 0);
}

async function embed(decoded, decodeMs) {
  const t1 = performance.now();
  const pre = preprocessPixels(decoded.pixels, decoded.width, decoded.height, 4, state.spec);
  const t2 = performance.now();
  const out = await state.session.run({ [state.input]: new state.ort.Tensor("float32", pre.input, pre.dims) });
  const t3 = performance.now();
  const raw = Float32Array.from(out[state.output].data);
  let norm = 0;
  for (const v of raw) norm += v * v;
  norm = Math.sqrt(norm) || 1;
  const embedding = raw.map((v) => v / norm);
  const timings = { decode: decodeMs, preprocess: t2 - t1, inference: t3 - t2 };
  timings.device = timings.decode + timings.preprocess + timings.inference;
  // Debug hook for tests and the curious: exactly what the model was fed and what it returned.
  window.__lastInput = {
    input: pre.input, dims: pre.dims, rgb: pre.rgb, geometry: pre.geometry, output: raw, embedding,
    decoded: { width: decoded.width, height: decoded.height, exact: decoded.exact }, timings, threads: state.threads,
  };
  return { pre, embedding, timings };
}

async function runQuery(getPixels) {
  if (state.busy || !state.session) return;
  setBusy(true);
  setStatus("busy", "embedding…");
  showMessage("");
  $("lat-search").textContent = "–";
  try {
    const t0 = performance.now();
    const decoded = await getPixels();
    const { pre, embedding, timings } = await embed(decoded, performance.now() - t0);
    $("query").hidden = false;
    drawPreview(pre.rgb, pre.geometry.tw, pre.geometry.th);
    $("lat-device").textContent = ms(timings.device);
    $("lat-parts").textContent = `${ms(timings.decode)} · ${ms(timings.preprocess)} · ${ms(timings.inference)}`;
    setStatus("busy", "searching…");
    const result = await search(embedding);
    $("lat-search").textContent = `${ms(result.roundTripMs)} (server ${ms(result.took_ms)})`;
    await renderResults(result.results);
    showMessage(result.results.length ? "" : "The gallery is empty: add images with `retrieval-sdk index build`.");
    $("results").dataset.done = String(Date.now());
    setStatus("ready", "ready");
  } catch (e) {
    $("results").replaceChildren();
    showMessage(e instanceof UserMessage ? e.message : `Something went wrong: ${e.message}`, "error");
    setStatus(e instanceof UserMessage ? "ready" : "error", e instanceof UserMessage ? "ready" : "error");
    if (!(e instanceof UserMessage)) console.error(e);
  } finally {
    $("results").dataset.done = String(Date.now());
    setBusy(false);
  }
}

// ------------------------------------------------------------------------------------------ camera
async function openCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    if (!isSecureContext) {
      showBanner("warn", "The live camera needs HTTPS.",
        " Browsers only open the camera on https:// pages (or localhost); taking a photo with the file picker instead.");
    }
    $("camera-input").click();
    return;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: { ideal: "environment" }, width: { ideal: 1920 }, height: { ideal: 1080 } },
      audio: false,
    });
  } catch (e) {
    showMessage(`The camera is not available (${e.name}); use Photo instead.`, "error");
    return;
  }
  const video = $("video");
  video.srcObject = state.stream;
  $("viewfinder").hidden = false;
  await video.play().catch(() => {});
}

function closeCamera() {
  if (state.stream) for (const t of state.stream.getTracks()) t.stop();
  state.stream = null;
  $("viewfinder").hidden = true;
}

function onFile(input) {
  const file = input.files && input.files[0];
  input.value = "";
  if (file) runQuery(() => decodeFile(file));
}

// ------------------------------------------------------------------------------------------ start
function registerServiceWorker() {
  if (!("serviceWorker" in navigator) || params.has("nosw")) return;
  navigator.serviceWorker.register("sw.js", { scope: "./" }).catch((e) => console.warn("service worker:", e.message));
}

async function main() {
  $("api-key").value = localStorage.getItem("retrieval-sdk-demo.api-key") || "";
  $("api-key").addEventListener("change", (e) => {
    localStorage.setItem("retrieval-sdk-demo.api-key", e.target.value.trim());
    if (state.session) checkServer();
  });
  $("settings-form").addEventListener("submit", (e) => e.preventDefault());
  $("file-input").addEventListener("change", (e) => onFile(e.target));
  $("camera-input").addEventListener("change", (e) => onFile(e.target));
  $("camera-button").addEventListener("click", openCamera);
  $("close-camera").addEventListener("click", closeCamera);
  $("shutter").addEventListener("click", () => {
    const video = $("video");
    runQuery(async () => readPixels(video, video.videoWidth, video.videoHeight));
  });
  registerServiceWorker();
  setStatus("loading", "loading model…");
  try {
    await loadModel();
  } catch (e) {
    setStatus("error", "no model");
    showBanner("error", "The model could not be loaded.", " " + (e instanceof UserMessage ? e.message : e.message || e));
    if (!(e instanceof UserMessage)) console.error(e);
    return;
  }
  setBusy(false);
  setStatus("ready", "ready");
  await checkServer();
  document.body.dataset.ready = "true";
}

main();
