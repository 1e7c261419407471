"""Typed run configs from JSON or YAML files with dotted overrides: the one loader of every `train` command.

    cfg = load_config_file(AFFConfig, "configs/aff_small.json", ["train.epochs=1", "extractors.0.train.epochs=1"])

A config is a frozen dataclass. A field typed as another dataclass is a section (a nested mapping), a
tuple field takes a JSON list (of sections, when typed so); keys starting with "$" are comments. Unknown
keys and impossible values are ConfigErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from training.errors import TrainingError


class ConfigError(TrainingError):
    """A config file, section or override that cannot be used."""


def from_dict(cls: type, d: Any, where: str = "config"):
    """Build the dataclass `cls` from a mapping, sections and tuples included; errors name `where`.key."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if not str(k).startswith("$")}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; expected some of {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kw = {k: _typed(hints[k], v, k if where == "config" else f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
    except TrainingError as e:  # a value the dataclass itself refuses: already names its key
        raise ConfigError(str(e)) from None


def _typed(tp: Any, value: Any, where: str) -> Any:
    """`value` as the field type `tp` asks: a section for a dataclass, a tuple for a tuple, else as given."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return value if value is None or len(options) != 1 else _typed(options[0], value, where)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where)
    if origin is tuple and isinstance(value, list):
        item = args[0] if args else Any
        return tuple(_typed(item, v, f"{where}.{i}") for i, v in enumerate(value))
    return value


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON types (tuples as lists): what results.json records and from_dict reads."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(d: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply "a.b.c=value" overrides (value parsed as JSON, else kept as a string) to a nested dict;
    list items are addressed by index ("extractors.0.epochs=1")."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, _, raw = item.partition("=")
        keys = path.strip().split(".")
        node: Any = d
        for i, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: i + 1]))
        last = keys[-1]
        if isinstance(node, list):
            node[_index(node, last, path)] = _parse_value(raw)
        elif isinstance(node, dict):
            node[last] = _parse_value(raw)
        else:
            raise ConfigError(f"override {path!r}: {'.'.join(keys[:-1])} is not a section")
    return d


def _index(node: list, key: str, path: str) -> int:
    if not key.lstrip("-").isdigit() or not -len(node) <= int(key) < len(node):
        raise ConfigError(f"override {path!r}: {key!r} is not an index of a list of {len(node)}")
    return int(key)


def _child(node: Any, key: str, path: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, key, path)]
    if isinstance(node, dict):
        if key not in node:
            node[key] = {}
        return node[key]
    raise ConfigError(f"override path {path!r} goes through a value, not a section")


def read_config_file(path: str | Path) -> dict:
    """A JSON (.json) or YAML (.yaml/.yml) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed (pip install pyyaml), or use JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections")
    return data


def load_config_file(cls: type, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                     defaults: dict | None = None):
    """`cls` from `defaults` (or the file at `path`, JSON/YAML), then dotted `overrides`."""
    base = read_config_file(path) if path is not None else (defaults or {})
    return from_dict(cls, apply_overrides(base, list(overrides)))


def check_known(values: Any, known: Any, what: str) -> None:
    """A ConfigError naming the first of `values` that is not in `known` (the choices, as the message lists them)."""
    bad = [v for v in values if v not in known]
    if bad:
        raise ConfigError(f"unknown {what} {bad[0]!r}; choose from {known}")


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _holds(value: Any, rule: str) -> bool:
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value is None and rule.endswith(" or null")
    rule = rule.removesuffix(" or null")
    if rule[0] in "[(":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        return (lo <= value if rule[0] == "[" else lo < value) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return _COMPARE[op](value, float(bound))


def check_fields(cfg: Any, rules: dict, where: str = "", error: type[Exception] = ConfigError) -> None:
    """Raise `error` naming `where`.key and the value of the first field of `cfg` that breaks its rule: a tuple of
    choices, or a range (">= 1", "> 0", "[0, 1)", "(0, 1]"; "... or null" lets None pass). A key of `rules` may
    name several fields (space-separated) that share one rule."""
    for keys, rule in rules.items():
        for key in keys.split():
            value = getattr(cfg, key)
            if (value in rule) if isinstance(rule, tuple) else _holds(value, rule):
                continue
            if isinstance(rule, tuple):
                rule = " or ".join(map(repr, rule)) if len(rule) == 2 else f"one of {rule}"
            elif rule[0] in "[(":
                rule = f"in {rule}"
            raise error(f"{where + '.' if where else ''}{key} must be {rule}, got {value!r}")


class Checked:
    """Base of the config dataclasses: after __init__, each field named in `_checks` is held to its rule by
    check_fields, which raises an `_error` naming `_where`.key."""

    _checks: ClassVar[dict] = {}
    _where: ClassVar[str] = ""
    _error: ClassVar[type[Exception]] = ConfigError

    def __post_init__(self) -> None:
        check_fields(self, self._checks, self._where, self._error)


class Config(Checked):
    """Base of the top-level config dataclasses: `to_dict`, `from_dict` (errors name `_where`) and `load` as above."""

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return from_dict(cls, d, cls._where or "config")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
        """Defaults, updated by a JSON/YAML file and then by dotted `--set key=value` overrides."""
        return load_config_file(cls, path, overrides)


DATA_KINDS = ("fashion_mnist", "instances", "folder", "csv", "gldv2")
SPLITS = ("test", "classes", "images")


@dataclass(frozen=True)
class DataConfig(Checked):
    """Which labelled set, and how its held-out evaluation split is made.

    kind: fashion_mnist (idx files under `root`) | instances (the procedural set, written under OUT/data) |
    folder (ROOT/<class>/<image>) | csv (`csv` with path,label) | gldv2 (`csv` = train.csv or
    train_clean.csv, `root` = the image tree). split: "test" (Fashion-MNIST's own test split: unseen
    images of the training classes) | "images" (per class, a `held_out` fraction of its images is
    held out: unseen views of seen objects) | "classes" (a `held_out` fraction of the classes is held
    out: unseen objects, the AFF/landmark setting).
    """

    kind: str = "fashion_mnist"
    root: str | None = None
    csv: str | None = None
    split: str = "test"
    held_out: float = 0.3
    train_limit: int | None = 6000
    eval_limit: int | None = 2000
    n_objects: int = 120
    n_views: int = 8
    image_size: int = 128
    seed: int = 0
    _where = "data"
    _checks = {"kind": DATA_KINDS, "split": SPLITS, "held_out": "(0, 1)", "train_limit eval_limit": ">= 2 or null"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split == "test" and self.kind != "fashion_mnist":
            raise ConfigError(f"data.split='test' needs a dataset with a test split (fashion_mnist); for "
                              f"{self.kind} use 'images' or 'classes'")
        if self.kind in ("csv", "gldv2") and not self.csv:
            raise ConfigError(f"data.kind={self.kind} needs data.csv (the CSV file)")
        if self.kind in ("folder", "gldv2") and not self.root:
            raise ConfigError(f"data.kind={self.kind} needs data.root (the image folder)")


@dataclass(frozen=True)
class RunConfig(Config):
    """The fields every `train` command's config shares: the run's `name` and `out` folder (by default the
    command's name and runs/<it>, given as `class CGDConfig(RunConfig, run="cgd")`), the labelled `data`,
    the extra `ablations` rows and the `seed`."""

    _run: ClassVar[str] = "run"
    name: str = ""
    out: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="instances", split="classes"))
    ablations: tuple[str, ...] = ()
    seed: int = 0

    def __init_subclass__(cls, run: str = "", **kw) -> None:
        super().__init_subclass__(**kw)
        cls._run = run or cls._run

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name or self._run)
        object.__setattr__(self, "out", self.out or f"runs/{self._run}")
        super().__post_init__()

    def start(self, device: str) -> Path:
        """A run's first step: `device` checked (an absent GPU stops the run before any work), `out` created."""
        from training.fit import resolve_device  # training.fit imports this module

        resolve_device(device)
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        return out
