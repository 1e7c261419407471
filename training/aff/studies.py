"""The AFF paper's ablation studies as extra tables of `retrieval-sdk train aff`, each on the run's cached
features and split, each mixer from the same feature-only stage (settings and seed) as the main one:

- fusion variants (`fusion_variants`): concat+MLP, LAFF-style, DOLG-style orthogonal fusion, each trained
  like the mixer (feature-only warm-up, then jointly with its own query model through the momentum
  classifier), so every variant has a symmetric and an asymmetric row;
- robustness (`robustness`): weak extractors and/or a pure Gaussian-noise feature added to the gallery
  features; ensemble vs mixer (feature-only stage), with and without them;
- leave-one-feature-out (`leave_one_out`): the mixer (feature-only stage) without each gallery feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.aff.config import AFFConfig
from training.aff.features import FeatureCache, FeatureSet
from training.aff.mixer import ensemble
from training.fit import Checkpoints

Log = Callable[[str], None]


@dataclass(frozen=True)
class StudyData:
    """What every study trains and evaluates on: the caches of each split (aligned by position with the
    run's extractors), the labels and class counts."""

    train: Sequence[FeatureCache]
    eval: Sequence[FeatureCache]
    train_labels: np.ndarray
    eval_labels: np.ndarray
    num_classes: int
    eval_classes: int
    use_local: bool

    def sets(self, train: Sequence[FeatureCache], eval_: Sequence[FeatureCache],
             redraw: Sequence[str] = ()) -> tuple[FeatureSet, FeatureSet]:
        """Training and evaluation sets; `redraw` (noise features) is drawn afresh in training only."""
        return (FeatureSet(train, self.train_labels, self.num_classes, self.use_local, redraw).load(),
                FeatureSet(eval_, self.eval_labels, self.eval_classes, self.use_local).load())


def feature_only_row(cfg: AFFConfig, data: StudyData, train: Sequence[FeatureCache], eval_: Sequence[FeatureCache],
                     desc: str, progress: bool, log: Log, device: str, checkpoints: Checkpoints | None,
                     warm=None, redraw: Sequence[str] = ()) -> dict:
    """Symmetric mAP / R@1 of the ensemble and of the mixer (feature-only stage; `warm` reuses a trained one)
    over these features."""
    from training.aff.train import embed_features, symmetric, warm_up_mixer  # train.py runs the studies

    train_set, eval_set = data.sets(train, eval_, redraw)
    if warm is None:
        warm = warm_up_mixer(cfg, cfg.train, train_set, data.num_classes, desc, progress, log, device, checkpoints)
    labels = eval_set.labels
    return {"features": eval_set.names, "ensemble": symmetric(ensemble(eval_set.globals_()), labels),
            "mixer": symmetric(embed_features(warm.mixer, eval_set), labels)}


def robustness_study(cfg: AFFConfig, data: StudyData, groups: dict[str, tuple[list, list, tuple[str, ...]]],
                     clean_warm, progress: bool, log: Log, device: str, checkpoints: Checkpoints | None) -> list[dict]:
    """Rows: the clean features, then the clean features + each noisy group (name -> (train caches, eval
    caches, names of its features redrawn in training))."""
    rows = [{"name": "clean", **feature_only_row(cfg, data, data.train, data.eval, "", progress, log, device,
                                                  checkpoints, clean_warm)}]
    for name, (train, eval_, redraw) in groups.items():
        log(f"robustness: + {name}")
        rows.append({"name": f"+ {name}", **feature_only_row(cfg, data, [*data.train, *train], [*data.eval, *eval_],
                                                             f"[+ {name}]", progress, log, device, checkpoints,
                                                             redraw=redraw)})
    return rows


def leave_one_out_study(cfg: AFFConfig, data: StudyData, clean_warm, progress: bool, log: Log, device: str,
                        checkpoints: Checkpoints | None) -> list[dict]:
    """Rows: all features, then all but each one in turn."""
    rows = [{"name": "all", **feature_only_row(cfg, data, data.train, data.eval, "", progress, log, device,
                                                checkpoints, clean_warm)}]
    for i, cache in enumerate(data.train):
        keep = [j for j in range(len(data.train)) if j != i]
        log(f"leave-one-out: without {cache.name}")
        rows.append({"name": f"without {cache.name}", **feature_only_row(
            cfg, data, [data.train[j] for j in keep], [data.eval[j] for j in keep], f"[without {cache.name}]",
            progress, log, device, checkpoints)})
    return rows


def study_checks(report: dict) -> dict:
    """Pass/fail of each study's claim: the mixer beats every variant; noise costs the ensemble more than
    the mixer; removing any feature costs the mixer."""
    checks = {}
    main = report["variants"]["main"]
    for kind, v in report.get("fusions", {}).items():
        checks[f"mixer_beats_{kind}"] = {"pass": main["mixer"]["map"] > v["mixer"]["map"] and main["asym"]["map"] > v["asym"]["map"],
                                        "mixer_sym": main["mixer"]["map"], "mixer_asym": main["asym"]["map"],
                                        "variant_sym": v["mixer"]["map"], "variant_asym": v["asym"]["map"]}
    rob = report.get("robustness")
    if rob:
        clean = rob[0]
        for row in rob[1:]:
            ens_drop = clean["ensemble"]["map"] - row["ensemble"]["map"]
            mix_drop = clean["mixer"]["map"] - row["mixer"]["map"]
            checks[f"robust_to {row['name'][2:]}"] = {"pass": ens_drop > mix_drop, "ensemble_drop": ens_drop,
                                                      "mixer_drop": mix_drop}
    loo = report.get("leave_one_out")
    if loo:
        full = loo[0]["mixer"]["map"]
        worse = {r["name"]: full - r["mixer"]["map"] for r in loo[1:]}
        checks["every_feature_helps"] = {"pass": all(d > 0 for d in worse.values()), "drop": worse}
    return checks


def format_studies(report: dict) -> list[str]:
    """The studies' tables and checks, as printed after the main table."""
    lines: list[str] = []
    pct = lambda r: f"{100 * r['map']:7.2f} {100 * r['r1']:7.2f}"  # noqa: E731
    fusions = report.get("fusions")
    if fusions:
        qb = report["config"]["query"]["backbone"]
        lines += ["", f"fusion variants (each trained like the mixer, then jointly with its own {qb} query model through "
                      "the momentum classifier):",
                  f"{'fusion':30s} {'sym mAP':>8s} {'sym R@1':>8s} {'asym mAP':>9s} {'asym R@1':>9s} {'asym/sym':>9s}"]
        for name, v in [("dynamic mixer (AFF)", report["variants"]["main"])] + [(k, v) for k, v in fusions.items()]:
            lines.append(f"{name:30s} {100 * v['mixer']['map']:8.2f} {100 * v['mixer']['r1']:8.2f} "
                         f"{100 * v['asym']['map']:9.2f} {100 * v['asym']['r1']:9.2f} {v['ratio']:9.3f}")
    for key, title in (("robustness", "robustness to noisy gallery features (symmetric; mixer = feature-only stage):"),
                       ("leave_one_out", "leave-one-feature-out (symmetric; mixer = feature-only stage):")):
        rows = report.get(key)
        if not rows:
            continue
        lines += ["", title, f"{'gallery features':40s} {'ensemble mAP':>12s} {'R@1':>7s}  {'mixer mAP':>9s} {'R@1':>7s}"]
        for i, r in enumerate(rows):  # the first row names the features the others add to or leave out
            name = f"{r['name']} ({', '.join(r['features'])})" if i == 0 else r["name"]
            lines.append(f"{name:40s} {pct(r['ensemble']):>20s}  {pct(r['mixer']):>17s}")
    c = report["checks"]
    yes = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    study = [k for k in c if k.startswith(("mixer_beats_", "robust_to", "every_feature")) and k not in
             ("mixer_beats_best_single", "mixer_beats_ensemble")]
    if study:
        lines.append("")
    for k in study:
        s = c[k]
        if k.startswith("mixer_beats_"):
            lines.append(f"[{yes(s['pass'])}] mixer beats {k[len('mixer_beats_'):]}: sym {100 * s['mixer_sym']:.2f} vs "
                         f"{100 * s['variant_sym']:.2f}, asym {100 * s['mixer_asym']:.2f} vs {100 * s['variant_asym']:.2f}")
        elif k.startswith("robust_to"):
            lines.append(f"[{yes(s['pass'])}] with {k[len('robust_to '):]} the ensemble loses more than the mixer: "
                         f"{100 * s['ensemble_drop']:.2f} vs {100 * s['mixer_drop']:.2f} mAP")
        else:
            lines.append(f"[{yes(s['pass'])}] every feature helps the mixer (mAP lost without it: "
                         + ", ".join(f"{n[len('without '):]} {100 * d:.2f}" for n, d in s["drop"].items()) + ")")
    return lines
