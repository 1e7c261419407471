"""Shared fixtures. Data under ../shared/data is optional for a user outside the team: tests that need
it skip with a clear reason, except in CI (CI=true), where a missing folder is a failure."""

from __future__ import annotations

import os
from pathlib import Path

# Idle OpenMP threads spin by default; on a shared 2-core machine the spinning of one test's
# thread pool starves the next. Must be set before torch (or onnxruntime) loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def require_path(path: Path, what: str) -> Path:
    """Return `path`, or skip (locally) / fail (in CI) when it does not exist."""
    if path.exists():
        return path
    msg = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must provide it: see .ci/run)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_path(SHARED_DATA, "../shared/data")


@pytest.fixture(scope="session")
def ukbench_dir(shared_data) -> Path:
    return require_path(shared_data / "real-photos" / "ukbench-56", "UKBench photos")


@pytest.fixture(scope="session")
def phototourism_dir(shared_data) -> Path:
    return require_path(shared_data / "real-photos" / "phototourism-13", "PhotoTourism photos")


@pytest.fixture(scope="session")
def revisitop_dir(shared_data) -> Path:
    return require_path(shared_data / "revisitop", "revisitop gnd files")


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    return require_path(FASHION_MNIST_DIR, "Fashion-MNIST (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def real_photos(shared_data) -> Path:
    return require_path(shared_data / "real-photos", "real photos (UKBench + PhotoTourism)")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-init query (ResNet + GeM) and gallery (EfficientNet + CGD) checkpoints of one space."""
    from tests.export.conftest import make_checkpoint

    d = tmp_path_factory.mktemp("ckpt")
    return {
        "query": make_checkpoint(d / "query.pt"),
        "gallery": make_checkpoint(d / "gallery.pt", backbone="tiny_efficientnet", pooling="cgd", role="gallery",
                                   seed=1),
    }


@pytest.fixture(scope="session")
def bundle(tmp_path_factory, ckpts, real_photos) -> Path:
    """Every format x precision of the tiny query model, plus the gallery model in ONNX: exported once per
    session (export's tests and evaluate's share it). TFLite metadata (the isolated tflite-support env) is
    covered by tests/export/test_tflite_support.py."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "b"
    export_bundle(ckpts["query"], out, gallery_checkpoint=ckpts["gallery"], formats="all",
                  precisions=("fp32", "fp16", "int8"), calibration=real_photos, tflite_metadata=False)
    return out


@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(module, "name", n): module.name raises KeyboardInterrupt on its n-th call (the process dies
    mid-run, for resume tests); the returned function puts the real one back."""

    def patch(module, name: str, n: int):
        real, calls = getattr(module, name), []

        def interrupted(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, interrupted)
        return lambda: monkeypatch.setattr(module, name, real)

    return patch
