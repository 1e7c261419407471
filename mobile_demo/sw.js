// Service worker of the mobile demo: the app and onnxruntime-web keep working offline after the first
// load. Network first (so a server update shows at once), the cache when the network fails. The
// model itself is cached by app.js under its sha256; the API (outside this scope's folder) always
// goes to the network.

const CACHE = "retrieval-sdk-demo-app-v1";
const SHELL = [
  "./",
  "index.html",
  "app.js",
  "preprocess.js",
  "style.css",
  "manifest.webmanifest",
  "icons/icon.svg",
  "icons/icon-192.png",
  "icons/icon-512.png",
  "model/manifest.json",
  "ort/ort.wasm.min.mjs",
  "ort/ort-wasm-simd-threaded.mjs",
  "ort/ort-wasm-simd-threaded.wasm",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) {
      if (name.startsWith("retrieval-sdk-demo-app-") && name !== CACHE) await caches.delete(name);
    }
    await self.clients.claim();
  })());
});

async function networkFirst(request) {
  const cache = await caches.open(CACHE);
  try {
    const response = await fetch(request);
    if (response.ok && response.type === "basic") {
      const old = await cache.match(request);
      const etag = response.headers.get("etag");
      if (!old || !etag || old.headers.get("etag") !== etag) await cache.put(request, response.clone());
    }
    return response;
  } catch (err) {
    const hit = await cache.match(request, { ignoreSearch: true });
    if (hit) return hit;
    if (request.mode === "navigate") {
      const shell = await cache.match("./");
      if (shell) return shell;
    }
    throw err;
  }
}

self.addEventListener("fetch", (event) => {
  const request = event.request;
  const url = new URL(request.url);
  const scope = new URL(self.registration.scope);
  if (request.method !== "GET" || url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  if (url.pathname.endsWith(".onnx")) return; // app.js caches the model by its sha256
  event.respondWith(networkFirst(request));
});
