"""The first end-to-end run: a pretrained gallery model, a MobileNetV2 query model fine-tuned into its
space, and symmetric vs asymmetric mAP on held-out objects.

Data: the procedural instance set (default) or `--images DIR` with class subfolders. Classes are
split into training objects (used for the compatibility fine-tune) and held-out objects (evaluated
leave-one-out: every held-out image queries all the others).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.compatible import CompatConfig, train_compatible
from training.data import LabelledImages, image_folder, make_instance_set, split_classes
from training.embed import embed_images
from training.evaluate import asymmetric_eval
from training.fit import resolve_device
from training.heads import Whitening, learn_pca_whitening
from training.models import CheckpointMeta, EmbeddingModel, ModelConfig, new_space_id, save_checkpoint


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path = Path("runs/quickstart")
    images: Path | None = None
    gallery_backbone: str = "efficientnet_lite2"
    query_backbone: str = "mobilenetv2_100"
    image_size: int = 160
    embedding_dim: int = 128  # the gallery space: GeM + PCA-whitening to this many dims (capped by data)
    n_objects: int = 100
    n_views: int = 5
    held_out: float = 0.2  # fraction of classes kept unseen for evaluation
    compat: CompatConfig = CompatConfig()
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # where the end-to-end compatibility epochs train (cpu | cuda | mps)


def load_images(cfg: QuickstartConfig) -> LabelledImages:
    if cfg.images is not None:
        return image_folder(cfg.images)
    return make_instance_set(cfg.out / "procedural", n_objects=cfg.n_objects, n_views=cfg.n_views, seed=cfg.seed)


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    """Train and evaluate; write checkpoints and results.json to cfg.out; return the results."""
    resolve_device(cfg.device)  # fail before any work when the device is not here
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = load_images(cfg)
    train, held_out = split_classes(data, held_out=cfg.held_out, seed=cfg.seed)
    log(f"data: {len(data.paths)} images of {len(data.classes)} classes -> "
        f"{len(train.paths)} training images, {len(held_out.paths)} held-out images "
        f"({len(set(held_out.labels))} unseen classes)")

    progress = cfg.progress
    dim = min(cfg.embedding_dim, len(train.paths) - 1)
    gallery = EmbeddingModel(
        ModelConfig(cfg.gallery_backbone, "gem", embedding_dim=dim, input_size=cfg.image_size), pretrained=True
    ).eval()
    pooled = embed_images(gallery.pooled, train.paths, gallery.spec, desc="gallery whitening", progress=progress)
    gallery.whiten = Whitening.from_pca(*learn_pca_whitening(pooled, dim))
    log(f"gallery model: {cfg.gallery_backbone} + GeM + PCA-whitening -> {dim}-d, weights: "
        f"{gallery.backbone.weights_source}")
    query = EmbeddingModel(
        ModelConfig(cfg.query_backbone, "gem", embedding_dim=dim, input_size=cfg.image_size), pretrained=True
    )
    log(f"query model: {cfg.query_backbone} + GeM + FC -> {dim}-d, weights: {query.backbone.weights_source}")

    history = train_compatible(query, gallery, gallery.spec, train.paths, cfg.compat, progress=progress,
                               device=cfg.device)
    log(f"compatibility fine-tune: closed-form FC fit on {len(train.paths) * (1 + cfg.compat.views)} pairs, "
        f"cosine loss {history['fit_cosine_loss']:.3f}"
        + "".join(f"; epoch {i + 1} loss {x:.3f}" for i, x in enumerate(history["epoch_losses"])))

    g_emb = embed_images(gallery, held_out.paths, gallery.spec, desc="gallery (held-out)", progress=progress)
    q_emb = embed_images(query, held_out.paths, query.spec, desc="query (held-out)", progress=progress)
    labels = np.asarray(held_out.labels)
    result = asymmetric_eval(q_emb, g_emb, labels, labels, query_emb_g=g_emb, exclude_self=True)

    space = new_space_id("quickstart")
    meta = dict(embedding_space=space, extra={"asymmetric_map": result.asym_map, "symmetric_map": result.sym_map})
    save_checkpoint(gallery, cfg.out / "gallery.safetensors", CheckpointMeta(role="gallery", name="gallery", **meta))
    save_checkpoint(query, cfg.out / "query.safetensors", CheckpointMeta(role="query", name="query", **meta))
    results = {
        "embedding_space": space,
        "symmetric_map": result.sym_map,
        "asymmetric_map": result.asym_map,
        "asymmetric_over_symmetric": result.asym_map / result.sym_map,
        "symmetric_recall_at_1": result.sym_recall_at_1,
        "asymmetric_recall_at_1": result.asym_recall_at_1,
        "compat": history,
        "seconds": time.perf_counter() - t0,
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    log(result.summary())
    log(f"wrote {cfg.out / 'query.safetensors'}, {cfg.out / 'gallery.safetensors'}, {cfg.out / 'results.json'} "
        f"(space {space}) in {results['seconds']:.0f} s")
    return results
