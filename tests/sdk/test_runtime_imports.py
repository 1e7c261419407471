"""The runtime installs and imports without torch (ARCHITECTURE.md: sdk never imports torch at import)."""

from __future__ import annotations

import subprocess
import sys


def test_import_sdk_does_not_import_torch():
    code = "import sys, sdk, sdk.preprocess, sdk.cli; bad = [m for m in ('torch', 'timm', 'training') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
