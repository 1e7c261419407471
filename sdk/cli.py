"""`retrieval-sdk` command line. Training commands import torch lazily, inside the command, so the
runtime commands work on an install without the `train` extra."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Asymmetric image retrieval for mobile: gallery models in the cloud, a light query model on the phone.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@contextmanager
def user_errors():
    """Turn the errors a user can fix (ValueError family, missing files, missing extras) into one line."""
    try:
        yield
    except ModuleNotFoundError as e:
        extra = "train" if e.name in ("torch", "timm", "torchvision", "scipy") else "all"
        fail(f"missing package '{e.name}': install the extra with  pip install 'retrieval-sdk[{extra}]'")
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def import_training(module: str):
    with user_errors():
        return importlib.import_module(f"training.{module}")


def set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command()
def quickstart(
    images: Optional[Path] = typer.Option(None, help="Folder with one subfolder per class (default: a procedural set)."),
    out: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints and results.json go."),
    gallery_backbone: str = typer.Option("efficientnet_lite2", help="Pretrained gallery backbone."),
    query_backbone: str = typer.Option("mobilenetv2_100", help="Pretrained query backbone (phone side)."),
    image_size: int = typer.Option(160, min=32, help="Input size for both models."),
    dim: int = typer.Option(128, min=2, help="Embedding dim of the shared space (gallery PCA-whitening)."),
    objects: int = typer.Option(100, min=4, help="Procedural set: number of objects."),
    views: int = typer.Option(5, min=2, help="Procedural set: views per object."),
    crops: int = typer.Option(1, min=0, help="Random crops per training image for the closed-form FC fit."),
    epochs: int = typer.Option(0, min=0, help="End-to-end compatibility epochs after the FC fit."),
    seed: int = typer.Option(0),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (default: all cores)."),
    device: str = typer.Option("cpu", help="Where the end-to-end epochs train: cpu | cuda | mps."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Embed a gallery with a pretrained gallery model, fine-tune a MobileNetV2 query model into its
    space, and print symmetric and asymmetric mAP on held-out classes."""
    qs = import_training("quickstart")
    from training.compatible import CompatConfig

    if images is not None and not images.is_dir():
        fail(f"--images {images} is not a folder (expected DIR/<class>/<image>.jpg)")
    set_threads(threads)
    cfg = qs.QuickstartConfig(
        out=out, images=images, gallery_backbone=gallery_backbone, query_backbone=query_backbone,
        image_size=image_size, embedding_dim=dim, n_objects=objects, n_views=views,
        compat=CompatConfig(views=crops, epochs=epochs, seed=seed),
        seed=seed, progress=progress, device=device,
    )
    with user_errors():
        qs.run_quickstart(cfg, log=typer.echo)


@app.command()
def backbones() -> None:
    """List the backbone registry: name.tag (the first tag of a name is its default), input, weight source."""
    bb = import_training("backbones")

    for name, cfg in bb.REGISTRY.items():
        h, w = cfg.spec.input_size
        default = "*" if bb.DEFAULT_TAGS[cfg.arch] == cfg.tag else " "
        typer.echo(f"{default} {name:42s} {cfg.kind:4s} {h}x{w}  {cfg.weight_source():52s} {cfg.description}")


@app.command()
def version() -> None:
    """Print the installed version."""
    from sdk import __version__

    typer.echo(__version__)


# Command groups live in their own modules and register themselves on `app` (each imports its heavy
# dependencies inside the command, so `import sdk.cli` stays torch-free).
from sdk import cli_export, cli_serve, cli_train  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    app()
