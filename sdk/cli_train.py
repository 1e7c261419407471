"""CLI commands: `retrieval-sdk train ...` (issue P4). Registered on sdk.cli.app; heavy imports stay inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from sdk.cli import app, fail, set_threads, user_errors

train_app = typer.Typer(
    help="Train models into one embedding space (gallery side in the cloud, query side on the phone).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(train_app, name="train")


@train_app.command("aff")
def aff(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="JSON or YAML config (default: the built-in small config = configs/aff_small.json)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (overrides the config's 'out')."),
    set_: List[str] = typer.Option(
        [], "--set", help="Override a config value, e.g. --set train.epochs=1 --set extractors.0.train.epochs=1."),
    overwrite_cache: bool = typer.Option(
        False, help="Re-extract feature caches that belong to another dataset instead of stopping."),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    device: str = typer.Option("cpu", help="Where to train: cpu | cuda | mps (mixed precision on cuda)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """AFF: train DELG/DOLG/CVNet gallery extractors, fuse their features with a dynamic mixer and train a light
    query model with a momentum classifier into the same space; print single-feature, ensemble, mixer and
    query-vs-mixer mAP on a held-out split, and write gallery.pt, query.pt and results.json."""
    if config is not None and not config.is_file():
        fail(f"--config {config} does not exist")
    with user_errors():
        from training.aff.config import load_config
        from training.aff.train import run_aff

        overrides = list(set_) + ([f"out={json.dumps(str(out))}"] if out is not None else [])
        cfg = load_config(config, overrides)
        set_threads(threads)
        run_aff(cfg, progress=progress, overwrite_cache=overwrite_cache, log=typer.echo, device=device)
