"""Gallery ingestion of N real images (default 10k Fashion-MNIST training images written as PNG files): the
single-process run (`retrieval-sdk index build`) against `--runner ray` (a local Ray: --workers actors,
node on 127.0.0.1; run it under `unshare -n` to keep every port on loopback). Checks that the Ray run
stores exactly the single-process ids and embeddings, and prints the throughput of each (images/s on
this node), which docs/scale-out.md extrapolates.

    unshare -n sh -c 'ip link set lo up && exec python benchmarks/ray_ingest_bench.py --n 10000'
    python benchmarks/ray_ingest_bench.py --n 500 --backbone efficientnet_lite0 --pretrained
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def gallery_bundle(out: Path, backbone: str, pretrained: bool, dim: int) -> Path:
    """An ONNX bundle whose gallery model is `backbone` + GeM (ImageNet weights when `pretrained`)."""
    from export.bundle import export_bundle
    from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, save_checkpoint

    model = EmbeddingModel(ModelConfig(backbone, "gem", embedding_dim=dim), pretrained=pretrained)
    ckpt = save_checkpoint(model, out / "gallery.pt", CheckpointMeta(embedding_space="bench", role="gallery"))
    export_bundle(ckpt, out / "bundle", gallery_checkpoint=ckpt)
    return out / "bundle"


def write_images(folder: Path, n: int) -> None:
    """n Fashion-MNIST training images as PNG files, one subfolder per class."""
    from PIL import Image

    from training.data import fashion_mnist_arrays

    data = fashion_mnist_arrays(split="train", limit=n)
    for j, (pixels, label) in enumerate(zip(data.images, data.labels)):
        (folder / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).convert("RGB").save(folder / f"c{label}" / f"{j:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--backbone", default="tiny_resnet")
    ap.add_argument("--pretrained", action="store_true")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--index", default=None, help="index URL for the Ray run (default: a faiss folder)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from sdk.index_url import open_index
    from sdk.ingest import ingest
    from sdk.ingest_ray import ingest_ray

    tmp = Path(tempfile.mkdtemp(prefix="rsdk-ray-bench-"))
    try:
        bundle = gallery_bundle(tmp, args.backbone, args.pretrained, args.dim)
        write_images(tmp / "images", args.n)
        quiet = lambda m: None  # noqa: E731
        local = ingest(bundle, tmp / "images", tmp / "local", batch_size=args.batch_size, threads=args.workers,
                       progress=False, log=quiet)
        print(f"single process: {local.summary()}, {local.added / local.seconds:.1f} images/s", flush=True)
        url = args.index or str(tmp / "ray")
        ray = ingest_ray(bundle, tmp / "images", url, batch_size=args.batch_size, workers=args.workers, threads=1,
                         log=quiet)
        print(f"ray ({args.workers} actors): {ray.summary()}, {ray.added / ray.seconds:.1f} images/s", flush=True)
        with open_index(tmp / "local") as a, open_index(url) as b:
            ids_a, ids_b = sorted(a.ids()), sorted(b.ids())
            same_ids = ids_a == ids_b
            diff = float(np.abs(a.get_vectors(ids_a) - b.get_vectors(ids_a)).max()) if same_ids else float("nan")
        result = {"n": args.n, "backbone": args.backbone, "pretrained": args.pretrained, "workers": args.workers,
                  "single_process_s": round(local.seconds, 1), "ray_s": round(ray.seconds, 1),
                  "single_process_images_per_s": round(local.added / local.seconds, 1),
                  "ray_images_per_s": round(ray.added / ray.seconds, 1), "same_ids": same_ids,
                  "max_abs_embedding_diff": diff}
        print(json.dumps(result))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        if not same_ids or not diff <= 1e-6:
            sys.exit("the Ray run does not match the single-process run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
