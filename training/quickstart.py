"""The first end-to-end run: a pretrained gallery model, a phone-side query model trained into its space,
and symmetric vs asymmetric mAP on held-out objects.

The default query model is the gallery's own network (EfficientNet-Lite2) run at a smaller input side
(0.85 of the gallery's: 136 px at 160, 0.84x its latency): it starts as a copy of the gallery model,
weights and whitening, then one end-to-end epoch of 1 - cos(query at 136 px, gallery at 160 px) on random
crops adapts it to the smaller input. Any other `query_backbone` (MobileNetV2, EfficientNet-Lite0/1, ...)
gets its ImageNet weights + GeM + an FC fitted in closed form onto the gallery's embeddings (`inherit`
off does the same for the gallery's backbone). README's table has what each measures on real photos.

Data: the procedural instance set (default) or `--images DIR` with class subfolders. Classes are
split into training objects (used for the compatibility fine-tune) and held-out objects (evaluated
leave-one-out: every held-out image queries all the others). Real photos that ship in installed packages
(training/photos.py) and the user's `unlabelled` folder join the fit with many random crops each: the
procedural objects alone do not teach the query model what real photos look like.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from training.backbones import resolve_backbone
from training.compatible import CompatConfig, photo_views, train_compatible
from training.data import image_folder, make_instance_set, split_classes, unlabelled_folder
from training.embed import embed_images
from training.evaluate import asymmetric_eval
from training.fit import resolve_device
from training.heads import Whitening, learn_pca_whitening
from training.photos import photo_sources
from training.models import (CheckpointMeta, EmbeddingModel, ModelConfig, load_checkpoint, new_space_id,
                             save_checkpoint)


@dataclass(frozen=True)
class QuickstartConfig:
    out: Path = Path("runs/quickstart")
    images: Path | None = None
    gallery_backbone: str = "efficientnet_lite2"
    gallery: Path | None = None  # a trained gallery checkpoint (e.g. `train cgd`'s model.safetensors) instead of GeM + PCA
    query_backbone: str = "efficientnet_lite2"  # the gallery's network at query_size: measured best per cost (README)
    image_size: int = 160
    query_size: int | None = None  # the query model's input side; None: QUERY_SCALE x the gallery's when it inherits
    inherit: bool = True  # a query backbone equal to the gallery's starts as a copy of the gallery model
    embedding_dim: int = 128  # the gallery space: GeM + PCA-whitening to this many dims (capped by data)
    whitening_power: float = 0.25  # 0.25: square-rooted PCA whitening (rank distillation's); 0.5: full whitening
    photos: bool = True  # add the real photos that ship in installed packages (training/photos.py)
    debian_photos: bool = True  # with `photos`: the Debian packages' too (GCompris, wallpapers), where installed
    unlabelled: Path | None = None  # a folder of the user's own unlabelled photos, treated like `photos`
    eval_photos: tuple[Path, ...] = ()  # labelled photo folders to check the pair on (export.images.label_of layouts)
    n_objects: int = 100
    n_views: int = 5
    held_out: float = 0.2  # fraction of classes kept unseen for evaluation
    compat: CompatConfig = CompatConfig()  # its `epochs` and `closed_form` are set from `epochs` and `inherit`
    epochs: int | None = None  # end-to-end compatibility epochs; None: 1 for an inheriting query model (it adapts
    # to its smaller input), 0 after a closed-form fit (more lowered every real-photo figure: docs/distill.md)
    seed: int = 0
    progress: bool = True
    device: str = "cpu"  # where the end-to-end compatibility epochs train (cpu | cuda | mps)


def run_quickstart(cfg: QuickstartConfig, log=print) -> dict:
    """Train and evaluate; write checkpoints and results.json to cfg.out; return the results."""
    resolve_device(cfg.device)  # fail before any work when the device or a backbone is not here
    for name in (cfg.query_backbone, *([] if cfg.gallery else [cfg.gallery_backbone])):
        resolve_backbone(name)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = image_folder(cfg.images) if cfg.images is not None else make_instance_set(
        cfg.out / "procedural", n_objects=cfg.n_objects, n_views=cfg.n_views, seed=cfg.seed)
    train, held_out = split_classes(data, held_out=cfg.held_out, seed=cfg.seed)
    log(f"data: {len(data.paths)} images of {len(data.classes)} classes -> "
        f"{len(train.paths)} training images, {len(held_out.paths)} held-out images "
        f"({len(set(held_out.labels))} unseen classes)")

    progress = cfg.progress
    packaged = photo_sources(cfg.debian_photos) if cfg.photos else {}
    mine = unlabelled_folder(cfg.unlabelled) if cfg.unlabelled else []
    photos = [p for paths in packaged.values() for p in paths] + mine
    if photos:
        sources = [f"{len(paths)} {name}" for name, paths in packaged.items()] + ([f"{len(mine)} {cfg.unlabelled}"] if mine else [])
        log(f"real photos: {len(photos)} unlabelled ({', '.join(sources)})")
    gallery, space = _gallery(cfg, list(train.paths) + photos, log)
    query, inherits = _query(cfg, gallery)
    size = query.spec.input_size[0]
    if inherits:
        log(f"query model: a copy of the gallery model ({cfg.query_backbone}, its whitening) at {size} px, "
            f"the gallery at {gallery.spec.input_size[0]} px")
    else:
        log(f"query model: {cfg.query_backbone} + GeM + FC -> {query.embedding_dim}-d at {size} px, weights: "
            f"{query.backbone.weights_source}")
    epochs = cfg.epochs if cfg.epochs is not None else int(inherits)
    compat = replace(cfg.compat, closed_form=not inherits, epochs=epochs)
    history = train_compatible(query, gallery, gallery.spec, train.paths, compat, progress=progress,
                               device=cfg.device, photos=photos)
    fitted = (f"closed-form FC fit on {history['pairs']} pairs ({photo_views(compat, len(photos))} random crops per "
              f"photo), cosine loss {history['fit_cosine_loss']:.3f}" if compat.closed_form
              else "the gallery's weights and whitening kept")
    log(f"compatibility fine-tune: {fitted}"
        + "".join(f"; epoch {i + 1} loss {x:.3f}" for i, x in enumerate(history["epoch_losses"])))

    g_emb = embed_images(gallery, held_out.paths, gallery.spec, desc="gallery (held-out)", progress=progress)
    q_emb = embed_images(query, held_out.paths, query.spec, desc="query (held-out)", progress=progress)
    labels = np.asarray(held_out.labels)
    result = asymmetric_eval(q_emb, g_emb, labels, labels, query_emb_g=g_emb, exclude_self=True)

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
    log(result.summary())
    if cfg.eval_photos:
        results["real_photos"] = photo_check(query, gallery, cfg.eval_photos, progress, log)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=2))
    log(f"wrote {cfg.out / 'query.safetensors'}, {cfg.out / 'gallery.safetensors'}, {cfg.out / 'results.json'} "
        f"(space {space}) in {results['seconds']:.0f} s")
    return results


QUERY_SCALE = 0.85  # an inheriting query model's input side over the gallery's: 0.84x its latency (README)


def _query(cfg: QuickstartConfig, gallery: EmbeddingModel) -> tuple[EmbeddingModel, bool]:
    """The query model, and whether it inherits: with `cfg.inherit` and the gallery's backbone, a copy of the
    gallery model (network, pooling, whitening) at `cfg.query_size` (default QUERY_SCALE x the gallery's
    side); otherwise the pretrained query backbone + GeM + an FC to fit, at `cfg.query_size or image_size`."""
    if cfg.inherit and cfg.query_backbone == gallery.config.backbone:
        size = cfg.query_size or round(QUERY_SCALE * gallery.spec.input_size[0])
        query = EmbeddingModel(replace(gallery.config, input_size=size))
        query.load_state_dict(gallery.state_dict())
        return query, True
    config = ModelConfig(cfg.query_backbone, "gem", embedding_dim=gallery.embedding_dim,
                         input_size=cfg.query_size or cfg.image_size)
    return EmbeddingModel(config, pretrained=True), False


def _gallery(cfg: QuickstartConfig, fit_images: list, log) -> tuple[EmbeddingModel, str]:
    """The gallery model and its space id: `cfg.gallery`'s checkpoint as trained (its space kept), or the
    pretrained backbone + GeM + PCA-whitening learned on `fit_images` (a new space)."""
    if cfg.gallery is not None:
        gallery, meta = load_checkpoint(cfg.gallery, expect="embedding_model")
        c = gallery.config
        log(f"gallery model: {cfg.gallery} ({c.backbone} + {c.pooling.upper()}"
            f"{' ' + c.cgd_config if c.pooling == 'cgd' else ''} -> {gallery.embedding_dim}-d, as trained)")
        return gallery.eval(), meta.embedding_space or new_space_id("quickstart")
    dim = min(cfg.embedding_dim, len(fit_images) - 1)
    gallery = EmbeddingModel(
        ModelConfig(cfg.gallery_backbone, "gem", embedding_dim=dim, input_size=cfg.image_size), pretrained=True
    ).eval()
    pooled = embed_images(gallery.pooled, fit_images, gallery.spec, desc="gallery whitening", progress=cfg.progress)
    gallery.whiten = Whitening.from_pca(*learn_pca_whitening(pooled, dim, power=cfg.whitening_power))
    kind = {0.25: "square-rooted PCA-whitening", 0.5: "PCA-whitening"}.get(cfg.whitening_power,
                                                                          f"PCA-whitening^{cfg.whitening_power}")
    log(f"gallery model: {cfg.gallery_backbone} + GeM + {kind} -> {dim}-d, weights: "
        f"{gallery.backbone.weights_source}")
    return gallery, new_space_id("quickstart")


def photo_check(query: EmbeddingModel, gallery: EmbeddingModel, folders, progress: bool = False, log=print) -> dict:
    """The pair on labelled photo folders none of it trained on: per folder leave-one-out asymmetric vs
    symmetric mAP; over all of them, how often a photo's query embedding finds its own gallery embedding
    first (else another photo of the same object or place), and the mean cosine between the two (how well
    the phone model reproduces the gallery's)."""
    from export.images import find_images, label_of

    rows, q_all, g_all, l_all = {}, [], [], []
    for folder in folders:
        paths = find_images(folder, "evaluation photo")
        labels = np.asarray([label_of(p, Path(folder)) for p in paths])
        g = embed_images(gallery, paths, gallery.spec, desc=f"gallery ({Path(folder).name})", progress=progress)
        q = embed_images(query, paths, query.spec, desc=f"query ({Path(folder).name})", progress=progress)
        r = asymmetric_eval(q, g, labels, labels, query_emb_g=g, exclude_self=True)
        rows[Path(folder).name] = {"asymmetric_map": r.asym_map, "symmetric_map": r.sym_map, "ratio": r.ratio,
                                   "images": len(paths)}
        q_all.append(q)
        g_all.append(g)
        l_all += [f"{Path(folder).name}/{label}" for label in labels]
    q, g, every_label = np.concatenate(q_all), np.concatenate(g_all), np.asarray(l_all)
    scores = q @ g.T
    first = scores.argmax(1)
    found = int((first == np.arange(len(q))).sum())
    same = int(((first != np.arange(len(q))) & (every_label[first] == every_label)).sum())
    own = {"found_itself_first": found, "found_same_object_first": same, "images": len(q),
           "mean_cosine_to_own": float(np.diag(scores).mean())}
    log(f"{'photos':24s}{'images':>8s}{'asym mAP':>10s}{'sym mAP':>10s}{'asym/sym':>10s}")
    for name, row in rows.items():
        log(f"{name:24s}{row['images']:8d}{row['asymmetric_map'] * 100:10.2f}{row['symmetric_map'] * 100:10.2f}"
            f"{row['ratio']:10.3f}")
    log(f"a photo's query embedding finds its own gallery embedding first for {found} of {len(q)} (another photo "
        f"of the same object first for {same} more); mean cosine to it {own['mean_cosine_to_own']:.3f}")
    return {"folders": rows, "self_retrieval": own}
