"""The model bundle (contract 2 of ARCHITECTURE.md): a folder of exported model files + manifest.json.

export/ writes it, the SDK embedder, the server and the web demo read it. Every model trained into
one space shares the manifest's `embedding_space` id; the server refuses vectors from another space.
Each file carries its sha256 so a truncated or swapped file is caught before it is run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdk.errors import SdkError
from sdk.preprocess import PreprocessSpec

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "retrieval-sdk/bundle"
BUNDLE_VERSION = 1
FORMATS = ("onnx", "tflite", "coreml")
PRECISIONS = ("fp32", "fp16", "int8")


class BundleError(SdkError):
    """A bundle folder is missing, malformed, or its files do not match the manifest."""


@dataclass(frozen=True)
class ModelFile:
    """One exported file of a model (a path relative to the bundle folder)."""

    path: str
    format: str  # onnx | tflite | coreml
    precision: str = "fp32"  # fp32 | fp16 | int8
    sha256: str = ""
    size_bytes: int = 0
    input_name: str = "image"
    output_name: str = "embedding"
    layout: str = "NCHW"  # NCHW for ONNX, NHWC for TFLite
    batch: str = "dynamic"  # "dynamic" or a fixed size such as "1"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BundleError(f"file {self.path}: format must be one of {FORMATS}, got {self.format!r}")
        if self.precision not in PRECISIONS:
            raise BundleError(f"file {self.path}: precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class ModelEntry:
    """A model of the bundle (role 'query' or 'gallery') and its exported files."""

    name: str
    role: str
    embedding_dim: int
    preprocess: PreprocessSpec
    files: list[ModelFile] = field(default_factory=list)
    dtype: str = "float32"
    source_checkpoint: str = ""

    def file(self, format: str, precision: str | None = None) -> ModelFile:
        """The file of this format (and precision; default: the most precise one present)."""
        matches = [f for f in self.files if f.format == format and (precision is None or f.precision == precision)]
        if not matches:
            have = ", ".join(f"{f.format}/{f.precision}" for f in self.files) or "none"
            want = format + (f"/{precision}" if precision else "")
            raise BundleError(f"model '{self.name}' has no {want} file (has: {have}); export it with "
                              f"`retrieval-sdk export --format {format}`")
        return min(matches, key=lambda f: PRECISIONS.index(f.precision))


@dataclass
class Manifest:
    embedding_space: str
    models: dict[str, ModelEntry]
    format: str = BUNDLE_FORMAT
    format_version: int = BUNDLE_VERSION
    extra: dict = field(default_factory=dict)

    def model(self, role: str = "query") -> ModelEntry:
        if role not in self.models:
            raise BundleError(f"bundle has no '{role}' model (has: {', '.join(self.models) or 'none'})")
        return self.models[role]

    def to_dict(self) -> dict:
        d = asdict(self)
        for role, entry in self.models.items():
            d["models"][role]["preprocess"] = entry.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        if d.get("format") != BUNDLE_FORMAT:
            raise BundleError(f"not a retrieval-sdk bundle manifest (format={d.get('format')!r})")
        if d.get("format_version") != BUNDLE_VERSION:
            raise BundleError(f"bundle format version {d.get('format_version')} is not supported by this "
                              f"retrieval-sdk (reads version {BUNDLE_VERSION}); upgrade retrieval-sdk")
        try:
            models = {
                role: ModelEntry(**{**m, "preprocess": PreprocessSpec.from_dict(m["preprocess"]),
                                    "files": [ModelFile(**f) for f in m.get("files", [])]})
                for role, m in d["models"].items()
            }
            return cls(embedding_space=d["embedding_space"], models=models, extra=d.get("extra", {}))
        except (KeyError, TypeError) as e:
            raise BundleError(f"malformed manifest: {e.__class__.__name__}: {e}") from None


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a folder (e.g. a CoreML .mlpackage) as the hash of its sorted file hashes."""
    path, h = Path(path), hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode() + b"\0" + sha256_path(f).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read BUNDLE/manifest.json; with verify, check every listed file exists and matches its sha256."""
    bundle = Path(bundle)
    mpath = bundle / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{bundle} is not a model bundle (no {MANIFEST}); create one with `retrieval-sdk export`")
    try:
        manifest = Manifest.from_dict(json.loads(mpath.read_text()))
    except json.JSONDecodeError as e:
        raise BundleError(f"{mpath} is not valid JSON ({e})") from None
    if verify:
        for entry in manifest.models.values():
            for f in entry.files:
                p = bundle / f.path
                if not p.exists():
                    raise BundleError(f"bundle file missing: {p} (listed in {MANIFEST}); re-export the bundle")
                if f.sha256 and sha256_path(p) != f.sha256:
                    raise BundleError(f"bundle file {p} does not match its sha256 in {MANIFEST} "
                                      "(corrupt or replaced); re-export the bundle")
    return manifest


def _write_text(text: str, path: Path) -> None:
    path.write_text(text, encoding="utf-8")


def save_atomic(payload: object, path: str | Path, write: Callable[[object, Path], None] = _write_text) -> Path:
    """Write `payload` with `write(payload, tmp)` (default: as UTF-8 text) to a temporary file, then rename it:
    a crash never leaves a half-written file under `path`. The one atomic writer of sdk, export and training."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(payload, tmp)
    tmp.replace(path)
    return path


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json atomically (temp file + rename)."""
    return save_atomic(json.dumps(manifest.to_dict(), indent=2), Path(bundle) / MANIFEST)


def describe_file(bundle: str | Path, path: str, **kwargs) -> ModelFile:
    """A ModelFile for BUNDLE/path with its sha256 and size filled in."""
    full = Path(bundle) / path
    size = sum(p.stat().st_size for p in full.rglob("*") if p.is_file()) if full.is_dir() else full.stat().st_size
    return ModelFile(path=path, sha256=sha256_path(full), size_bytes=size, **kwargs)
