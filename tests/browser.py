"""Real headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by the python `playwright`
package (no Playwright browser download, which needs the internet). Imported as `from ..browser import ...`.

A missing browser or playwright fails the test saying how to install them (scripts/setup.sh does), never a
silent skip; RETRIEVAL_SDK_SKIP_BROWSER_TESTS=1 skips the browser tests on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("RETRIEVAL_SDK_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SKIP_ENV = "RETRIEVAL_SDK_SKIP_BROWSER_TESTS"


def unavailable(msg: str) -> None:
    """A missing browser part is a failure (the browser tests are acceptance tests); skipped only on purpose."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{msg} ({SKIP_ENV}=1)")
    pytest.fail(f"{msg}: run `bash scripts/setup.sh` (as root it apt-installs chromium and nodejs, and runs "
                f"`npm ci` in mobile_demo/), or set {SKIP_ENV}=1 to skip the browser tests", pytrace=False)


def sync_playwright():
    """playwright's sync_playwright, once chromium and the package are known to be here."""
    if not CHROMIUM.exists():
        unavailable(f"chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError:
        unavailable("the python package 'playwright' is not installed (pip install -e '.[dev]')")
    return start()


def launch(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
