"""Probe the AFF mixer's feature-only stage on a finished run's cached features, one candidate setting at a
time (docs/aff.md, "what was tried"): symmetric mAP / R@1 on the run's evaluation split.

    python benchmarks/aff_mixer_probe.py configs/aff_small_instances_ablations.json "token_dropout 0,depth 1"
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from training.aff.config import AFFConfig, load_config
from training.aff.features import FeatureSet, open_cache
from training.aff.mixer import ensemble
from training.aff.train import embed_features, load_splits, symmetric, warm_up_mixer

CANDIDATES = {  # name -> (mixer overrides, train overrides, feature-only fusion kind)
    "defaults": ({}, {}, "transformer"),
    "token_dropout 0": ({"token_dropout": 0.0}, {}, "transformer"),
    "token_dropout 0.3": ({"token_dropout": 0.3}, {}, "transformer"),
    "depth 1": ({"depth": 1}, {}, "transformer"),
    "depth 4": ({"depth": 4}, {}, "transformer"),
    "no local tokens": ({"use_local": False}, {}, "transformer"),
    "warm-up 8 epochs": ({}, {"mixer_epochs": 8}, "transformer"),
    "warm-up 30 epochs": ({}, {"mixer_epochs": 30}, "transformer"),
    "mixer_lr 3e-4": ({}, {"mixer_lr": 3e-4}, "transformer"),
    "arcface m 0.15": ({}, {"arcface_m": 0.15}, "transformer"),
    "concat_mlp same schedule": ({}, {}, "concat_mlp"),
}


def probe(cfg: AFFConfig, names: list[str]) -> None:
    """Print the ensemble, then each candidate's mixer (feature-only stage) on `cfg.out`'s cached features."""
    splits = load_splits(cfg)
    out = Path(cfg.out)

    def feature_set(split: str, data, use_local: bool) -> FeatureSet:
        caches = [open_cache(out / "features" / split / e.name) for e in cfg.extractors]
        return FeatureSet(caches, data.labels, len(data.classes), use_local).load()

    ev = feature_set("eval", splits.eval, True)
    print(f"{'ensemble':28s} mAP {100 * symmetric(ensemble(ev.globals_()), ev.labels)['map']:6.2f}", flush=True)
    for name in names:
        mixer_kw, train_kw, kind = CANDIDATES[name]
        c = replace(cfg, mixer=replace(cfg.mixer, **mixer_kw), train=replace(cfg.train, **train_kw))
        tr, ev = feature_set("train", splits.train, c.mixer.use_local), feature_set("eval", splits.eval, c.mixer.use_local)
        t = time.perf_counter()
        warm = warm_up_mixer(c, c.train, tr, len(splits.train.classes), name, False, lambda _: None, kind=kind)
        r = symmetric(embed_features(warm.mixer, ev), ev.labels)
        print(f"{name:28s} mAP {100 * r['map']:6.2f}  R@1 {100 * r['r1']:6.2f}  ({time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: python benchmarks/aff_mixer_probe.py CONFIG ['{','.join(CANDIDATES)}']")
    torch.set_num_threads(1)
    wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CANDIDATES)
    unknown = [n for n in wanted if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidate {unknown[0]!r}; choose from {', '.join(CANDIDATES)}")
    probe(load_config(sys.argv[1]), wanted)
