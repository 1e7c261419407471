"""AFF configuration: the shipped config files, dotted overrides and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.aff.config import AFFConfig, load_config
from training.config import ConfigError, apply_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_small_config_file_is_the_default():
    assert load_config(CONFIGS / "aff_small.json") == AFFConfig()
    assert load_config() == AFFConfig()


def test_small_instances_config_uses_the_procedural_set():
    cfg = load_config(CONFIGS / "aff_small_instances.json")
    assert cfg.data.kind == "instances" and cfg.data.split in ("images", "classes")
    assert [e.kind for e in cfg.extractors] == ["delg", "dolg", "cvnet"]


@pytest.mark.parametrize("name,base", [("aff_small_ablations", "aff_small"),
                                       ("aff_small_instances_ablations", "aff_small_instances")])
def test_ablation_configs_are_their_base_config_plus_the_studies(name, base):
    from dataclasses import replace

    cfg, plain = load_config(CONFIGS / f"{name}.json"), load_config(CONFIGS / f"{base}.json")
    assert cfg.fusion_variants == ("concat_mlp", "laff", "orthogonal") and cfg.leave_one_out
    assert cfg.robustness.noise_dim == 128 and [e.kind for e in cfg.robustness.extractors] == ["cvnet", "cvnet", "rmac"]
    assert all(e.train.epochs == 0 for e in cfg.robustness.extractors)  # weak: ImageNet-only or untrained
    assert cfg.extractors == plain.extractors and cfg.mixer == plain.mixer and cfg.train == plain.train
    assert replace(cfg.data, train_limit=plain.data.train_limit, eval_limit=plain.data.eval_limit) == plain.data


def test_full_config_is_resnet101_on_gldv2():
    cfg = load_config(CONFIGS / "aff_full.json")
    assert cfg.data.kind == "gldv2" and cfg.data.csv.endswith(".csv")
    assert [(e.kind, e.backbone) for e in cfg.extractors] == [("delg", "resnet101"), ("dolg", "resnet101"),
                                                              ("cvnet", "resnet101")]
    assert cfg.query.backbone == "mobilenetv2_100" and cfg.train.classifier == "momentum" and cfg.train.alpha == 0.99


def test_overrides_reach_nested_sections_and_list_items():
    cfg = load_config(overrides=["train.epochs=1", "extractors.1.train.epochs=0", "extractors.0.scales=[1, 1.5]",
                                 "query.backbone=efficientnet_lite0", "ablations=[]", "out=runs/x"])
    assert cfg.train.epochs == 1 and cfg.extractors[1].train.epochs == 0 and cfg.extractors[0].scales == (1.0, 1.5)
    assert cfg.query.backbone == "efficientnet_lite0" and cfg.ablations == () and cfg.out == "runs/x"
    assert AFFConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides,match", [
    (["train.epoch=1"], "train: unknown key 'epoch'"),
    (["train.classifier=ema"], "train.classifier must be 'momentum' or 'shared'"),
    (["extractors.7.dim=3"], "'7' is not an index of a list of 3"),
    (["extractors.0.kind=netvlad"], "kind must be one of"),
    (["data.kind=fashion"], "data.kind must be one of"),
    (["data.kind=instances"], "split='test' needs a dataset with a test split"),
    (["ablations=[\"no_local\"]"], "unknown ablation 'no_local'"),
    (["mixer.dim=30"], "dim divisible by heads"),
    (["extractors.1.name=delg"], "extractor names repeat"),
    (["train.epochs"], "must look like key.path=value"),
    (["colour=red"], "config: unknown key 'colour'"),
    (["fusion_variants=[\"gated\"]"], "unknown fusion variant 'gated'"),
    (["robustness.noise_dim=-1"], "robustness.noise_dim must be >= 0"),
    (["robustness.noise_draws=[\"fresh\"]"], "noise_draws must be distinct entries of \\['fixed', 'redrawn'\\]"),
    (["robustness.extractors=[{\"kind\": \"rmac\", \"name\": \"dolg\"}]"], "repeated: \\['dolg'\\]"),
    (["robustness.noise_dim=8", "robustness.extractors=[{\"kind\": \"rmac\", \"name\": \"noise\"}]"],
     "repeated: \\['noise'\\]"),
    (["leave_one_out=true", "extractors=[{\"kind\": \"cvnet\"}]"], "leave_one_out needs at least two extractors"),
    (["robustness.extractors=[{\"kind\": \"rmac\", \"dimension\": 3}]"], "unknown key 'dimension'"),
])
def test_bad_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_yaml_and_broken_files(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  epochs: 2\nmixer:\n  depth: 1\n")
    cfg = load_config(yaml_file)
    assert cfg.train.epochs == 2 and cfg.mixer.depth == 1 and cfg.extractors == AFFConfig().extractors
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.json")


def test_apply_overrides_does_not_touch_the_input():
    base = {"train": {"epochs": 3}}
    out = apply_overrides(base, ["train.epochs=1", "train.alpha=0.9"])
    assert base == {"train": {"epochs": 3}} and out == {"train": {"epochs": 1, "alpha": 0.9}}
