"""report.html of `retrieval-sdk evaluate` in real headless Chromium (Debian's /usr/bin/chromium through
Playwright): opened from disk, every image is decoded and shown, the grids (20 worst and 20 best queries,
asymmetric beside symmetric, correct hits framed), the plots and the per-class bars are there, and the
page fetches nothing (no network, no other file) and logs no error.

The report is made from the real photos (UKBench + PhotoTourism, labels from file names) with the tiny
test bundle, or with RETRIEVAL_SDK_REPORT_BUNDLE=PATH with that bundle (the README's, for the screenshot
in docs/); RETRIEVAL_SDK_REPORT_SCREENSHOT=PATH also copies the screenshot there.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..browser import launch, sync_playwright
from .test_evaluate import evaluate

BUNDLE_ENV = "RETRIEVAL_SDK_REPORT_BUNDLE"
SCREENSHOT_ENV = "RETRIEVAL_SDK_REPORT_SCREENSHOT"

pytestmark = [pytest.mark.slow, pytest.mark.shared_data, pytest.mark.timeout(900)]


def test_report_opens_in_chromium_with_every_image_shown(tiny_bundle, real_photos, tmp_path):
    bundle = Path(os.environ.get(BUNDLE_ENV) or tiny_bundle)
    out = tmp_path / "report"
    proc = evaluate(bundle, "--images", real_photos, "--labels", "names", "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    sections = [f for f in res["files"] if not f["gallery_reference"]]

    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        url = (out / "report.html").resolve().as_uri()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)

        images = page.evaluate("""() => [...document.images].map(i => ({src: i.src.slice(0, 22),
            ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth, cls: i.className}))""")
        assert images and all(i["ok"] for i in images), [i for i in images if not i["ok"]][:5]
        assert all(i["src"].startswith("data:image/") for i in images)
        assert page.get_attribute("body", "data-missing-thumbs") == "0"

        assert page.locator("section.file").count() == len(sections)
        first = page.locator("section.file").first
        assert first.locator(".grid.worst .query").count() == 20 and first.locator(".grid.best .query").count() == 20
        for q in first.locator(".query").all()[:3]:
            assert q.locator(".list.asym figure.hit").count() == 8 and q.locator(".list.sym figure.hit").count() == 8
        ok = first.locator("figure.hit.ok img").first
        assert ok.evaluate("e => getComputedStyle(e).borderTopColor") == "rgb(26, 127, 55)"  # correct hits framed
        worst = [float(x) for x in first.locator(".grid.worst .query").evaluate_all(
            "qs => qs.map(q => q.dataset.apAsym)")]
        best = [float(x) for x in first.locator(".grid.best .query").evaluate_all("qs => qs.map(q => q.dataset.apAsym)")]
        assert worst == sorted(worst) and best == sorted(best, reverse=True) and max(worst) <= min(best)
        for plot in ("pr", "hist"):
            assert page.locator(f"section.file img.plot.{plot}").count() == len(sections)
            assert min(page.locator(f"img.plot.{plot}").evaluate_all("ps => ps.map(p => p.naturalWidth)")) > 300
        assert first.locator(".classes .cls").count() == res["classes"] == 18
        assert page.locator("table.summary tbody tr").count() == len(res["files"])

        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    assert not errors, errors
    assert set(requests) == {url}, [r for r in requests if r != url]  # data: URIs are no requests
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "report.png", os.environ[SCREENSHOT_ENV])
