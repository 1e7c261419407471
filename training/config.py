"""Typed run configs from JSON or YAML files with dotted overrides: the one loader of every `train` command.

    cfg = load_config_file(AFFConfig, "configs/aff_small.json", ["train.epochs=1", "extractors.0.train.epochs=1"])

A config is a frozen dataclass. A field typed as another dataclass is a section (a nested mapping), a
tuple field takes a JSON list (of sections, when typed so); keys starting with "$" are comments. Unknown
keys and impossible values are ConfigErrors that name the key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

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


class Config:
    """Base of the config dataclasses: `to_dict`, `from_dict` (errors name `_where`) and `load` as above."""

    _where = "config"

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict):
        return from_dict(cls, d, cls._where)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
        """Defaults, updated by a JSON/YAML file and then by dotted `--set key=value` overrides."""
        return load_config_file(cls, path, overrides)
