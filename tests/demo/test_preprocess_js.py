"""The web demo's preprocessing (mobile_demo/preprocess.js) against sdk.preprocess, run under node:
the same decoded pixels must give the same uint8 crop and the same float32 tensor, bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdk.preprocess import PreprocessSpec, normalize, resize_image

ROOT = Path(__file__).resolve().parents[2]
PREPROCESS_JS = ROOT / "mobile_demo" / "preprocess.js"
SKIP_ENV = "RETRIEVAL_SDK_SKIP_BROWSER_TESTS"

# Reads cases.json ({file, width, height, channels, spec}), writes <file>.rgb and <file>.f32 beside each.
RUNNER = """
import { readFileSync, writeFileSync } from "node:fs";
import { parseSpec, preprocessPixels } from %s;
for (const c of JSON.parse(readFileSync(process.argv[1], "utf8"))) {
  const pixels = new Uint8Array(readFileSync(c.file));
  const out = preprocessPixels(pixels, c.width, c.height, c.channels, parseSpec(c.spec));
  writeFileSync(c.file + ".rgb", out.rgb);
  writeFileSync(c.file + ".f32", new Uint8Array(out.input.buffer));
}
"""

SPECS = [
    dict(input_size=(96, 96), interpolation="bicubic"),
    dict(input_size=(96, 96), interpolation="bilinear"),
    dict(input_size=(96, 96), interpolation="nearest"),
    dict(input_size=(224, 224), interpolation="bicubic", crop_pct=0.875),
    dict(input_size=(160, 120), interpolation="bilinear", crop_pct=0.9),
    dict(input_size=(64, 80), resize="exact", interpolation="bicubic"),
    dict(input_size=(64, 80), resize="exact", interpolation="nearest", channel_order="BGR", layout="NHWC"),
    dict(input_size=(33, 33), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), value_range=1.0),
]


def node() -> str:
    exe = shutil.which("node")
    if exe is None:  # a failure, not a silent skip (like the browser test)
        msg = "node (Node.js) is not installed"
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{msg} ({SKIP_ENV}=1)")
        pytest.fail(f"{msg}: run `bash scripts/setup.sh` (as root it apt-installs nodejs), or set {SKIP_ENV}=1 "
                    "to skip the mobile demo tests", pytrace=False)
    return exe


def test_preprocess_js_matches_pillow(tmp_path, ukbench_dir):
    exe = node()
    rng = np.random.default_rng(0)
    photo = np.asarray(Image.open(ukbench_dir / "ukbench00000.jpg").convert("RGB"))
    images = {
        "photo": photo,  # 640x480, a real downscale
        "odd": rng.integers(0, 256, (53, 37, 3), np.uint8),  # upscaled
        "wide": rng.integers(0, 256, (97, 301, 3), np.uint8),
        "same": rng.integers(0, 256, (96, 96, 3), np.uint8),  # no resampling at all
        "half": rng.integers(0, 256, (64, 99, 3), np.uint8),  # 99 * 96/64 = 148.5: Python rounds half to even
    }
    cases, expected = [], []
    for name, rgb in images.items():
        h, w, _ = rgb.shape
        rgba = np.concatenate([rgb, rng.integers(0, 256, (h, w, 1), np.uint8)], axis=2)  # alpha is ignored
        for i, kw in enumerate(SPECS):
            spec = PreprocessSpec(**kw)
            for channels, pixels in ((3, rgb), (4, rgba)):
                f = tmp_path / f"{name}-{i}-{channels}.raw"
                f.write_bytes(np.ascontiguousarray(pixels).tobytes())
                cases.append({"file": str(f), "width": w, "height": h, "channels": channels, "spec": spec.to_dict()})
                crop = np.asarray(resize_image(Image.fromarray(rgb), spec))
                expected.append((f, crop, normalize(crop, spec), f"{name} {kw} channels={channels}"))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = RUNNER % json.dumps(PREPROCESS_JS.as_uri())
    subprocess.run([exe, "--input-type=module", "-e", script, str(tmp_path / "cases.json")], check=True,
                   timeout=120, cwd=tmp_path)
    for f, crop, tensor, what in expected:
        got_rgb = np.frombuffer(Path(str(f) + ".rgb").read_bytes(), np.uint8).reshape(crop.shape)
        got = np.frombuffer(Path(str(f) + ".f32").read_bytes(), np.float32).reshape(tensor.shape)
        assert np.array_equal(got_rgb, crop), f"{what}: {np.count_nonzero(got_rgb != crop)} pixel values differ"
        assert np.array_equal(got, tensor), f"{what}: max abs diff {np.abs(got - tensor).max()}"
