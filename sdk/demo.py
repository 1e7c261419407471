"""The mobile web demo (`retrieval-sdk serve --demo`): mobile_demo/ served by the gallery server.

The page runs the bundle's query model in the browser with onnxruntime-web (WASM) and searches this
server's /v1/search with the embedding. Everything comes from this origin, nothing from a CDN:

  /demo/                      the app (mobile_demo/: index.html, app.js, preprocess.js, sw.js, ...)
  /demo/ort/<file>            onnxruntime-web from mobile_demo/node_modules (`npm ci` installs it)
  /demo/model/manifest.json   the bundle's manifest (preprocessing spec, embedding space, sha256s)
  /demo/model/<file>          the query model's ONNX file(s) listed in the manifest (never the gallery's)

Responses carry COOP/COEP, so the page is cross-origin isolated where the browser allows it (HTTPS or
localhost) and onnxruntime-web may use WASM threads; elsewhere it runs single-threaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sdk.bundle import BundleError, read_manifest
from sdk.errors import SdkError

DEMO_DIR_ENV = "RETRIEVAL_SDK_DEMO_DIR"
DEFAULT_DEMO_DIR = Path(__file__).resolve().parents[1] / "mobile_demo"
ORT_PACKAGE = Path("node_modules") / "onnxruntime-web"
# The WASM-only ES module build and the single runtime it loads (SIMD; threads when isolated).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
NOT_SERVED = {"node_modules", "package.json", "package-lock.json", "README.md"}

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
    ".json": "application/json", ".webmanifest": "application/manifest+json", ".wasm": "application/wasm",
    ".png": "image/png", ".svg": "image/svg+xml", ".ico": "image/x-icon", ".onnx": "application/octet-stream",
}
# The page may only talk to its own origin: a request elsewhere (a CDN, a tracker) is blocked by the browser.
CSP = ("default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self' blob:; "
       "connect-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "style-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'")


class DemoError(SdkError):
    """The demo cannot be served: app files, onnxruntime-web or a usable query model are missing."""


@dataclass(frozen=True)
class DemoInfo:
    """What mount_demo serves (for the start-up message and tests)."""

    prefix: str
    demo_dir: Path
    ort_version: str
    model_files: tuple[str, ...]
    embedding_space: str


def find_demo_dir(demo_dir: str | Path | None = None) -> Path:
    """The mobile_demo folder: the argument, $RETRIEVAL_SDK_DEMO_DIR, or the one beside sdk/."""
    folder = Path(demo_dir or os.environ.get(DEMO_DIR_ENV) or DEFAULT_DEMO_DIR)
    if not (folder / "index.html").is_file():
        raise DemoError(f"mobile demo not found at {folder} (no index.html): run from a retrieval-sdk checkout "
                        f"or set {DEMO_DIR_ENV} to its mobile_demo folder")
    return folder


def _ort_files(demo_dir: Path) -> tuple[dict[str, Path], str]:
    import json

    package = demo_dir / ORT_PACKAGE
    missing = [f for f in ORT_FILES if not (package / "dist" / f).is_file()]
    if missing:
        raise DemoError(f"onnxruntime-web is not installed in {demo_dir} (missing {', '.join(missing)}): "
                        f"run `npm ci` in {demo_dir} (scripts/setup.sh does it)")
    version = json.loads((package / "package.json").read_text()).get("version", "?")
    return {f"ort/{f}": package / "dist" / f for f in ORT_FILES}, version


def _app_files(demo_dir: Path) -> dict[str, Path]:
    files = {}
    for path in sorted(demo_dir.rglob("*")):
        rel = path.relative_to(demo_dir)
        if path.is_file() and rel.parts[0] not in NOT_SERVED and not any(p.startswith(".") for p in rel.parts):
            files[rel.as_posix()] = path
    return files


def _model_files(bundle: Path, role: str) -> tuple[dict[str, Path], str]:
    manifest = read_manifest(bundle)
    entry = manifest.model(role)
    onnx = [f for f in entry.files if f.format == "onnx"]
    if not onnx:
        entry.file("onnx")  # raises BundleError with the export command in the message
    files = {"model/manifest.json": bundle / "manifest.json"}
    for f in onnx:
        if Path(f.path).is_absolute() or ".." in Path(f.path).parts:
            raise BundleError(f"bundle file path {f.path!r} must be relative to the bundle folder")
        files[f"model/{Path(f.path).as_posix()}"] = bundle / f.path
    return files, manifest.embedding_space


def mount_demo(app, bundle: str | Path, *, prefix: str = "/demo", demo_dir: str | Path | None = None,
               role: str = "query", cross_origin_isolated: bool = True) -> DemoInfo:
    """Serve the mobile web demo on `app` (the gallery server's FastAPI app) under `prefix`.

    bundle: the model bundle whose `role` model the phone runs (normally the server's own bundle; another
    bundle of a different embedding space makes the page show its space-mismatch message).
    Raises DemoError (a ValueError) naming the fix when something the page needs is missing.
    """
    from starlette.responses import FileResponse, RedirectResponse, Response

    prefix = "/" + prefix.strip("/")
    folder = find_demo_dir(demo_dir)
    ort, ort_version = _ort_files(folder)
    models, space = _model_files(Path(bundle), role)
    files = {**_app_files(folder), **ort, **models}
    files[""] = folder / "index.html"

    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
               "Cross-Origin-Resource-Policy": "same-origin", "Content-Security-Policy": CSP,
               "Referrer-Policy": "no-referrer"}
    if cross_origin_isolated:
        headers |= {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}

    async def serve_file(request):
        path = files.get(request.path_params["path"])
        if path is None or not path.is_file():
            return Response('{"detail":"not found"}', 404, media_type="application/json")
        st = path.stat()
        etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        media_type = MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers={**headers, "ETag": etag})
        return FileResponse(path, media_type=media_type, headers={**headers, "ETag": etag}, stat_result=st)

    async def to_app(request):
        return RedirectResponse(prefix + "/", status_code=307)

    app.add_route(prefix, to_app, methods=["GET"], include_in_schema=False)
    app.add_route(prefix + "/{path:path}", serve_file, methods=["GET"], include_in_schema=False)
    if not any(getattr(r, "path", None) == "/" for r in app.router.routes):
        app.add_route("/", to_app, methods=["GET"], include_in_schema=False)
    return DemoInfo(prefix=prefix, demo_dir=folder, ort_version=ort_version,
                    model_files=tuple(k.removeprefix("model/") for k in models), embedding_space=space)
