"""CLI commands that train: `retrieval-sdk quickstart`, `backbones`, `train aff`, `train distill` and `train cgd`. torch, timm and
training load inside the commands, so the runtime commands work without the `train` extra."""

from __future__ import annotations

import ctypes
import functools
import inspect
import json
from pathlib import Path
from typing import List, Optional

import typer

from sdk.cli_errors import fail, require_folders, user_errors

THREADS = typer.Option(None, help="torch CPU threads (default: all cores).")
PROGRESS = typer.Option(True, help="Show progress bars.")
OUT = typer.Option(None, help="Output folder (overrides the config's 'out').")
DEVICE = typer.Option("cpu", help="Where to train: cpu | cuda | mps (mixed precision on cuda).")
KEYWORD = inspect.Parameter.KEYWORD_ONLY
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt options (malloc.h)


def _existing_config(config: Optional[Path]) -> Optional[Path]:
    if config is not None and not config.is_file():
        fail(f"--config {config} does not exist")
    return config


def config_option(example: str):
    """--config/-c, checked to be a file before the command runs; `example` goes in the help's parentheses."""
    return typer.Option(None, "--config", "-c", callback=_existing_config, help=f"JSON or YAML config ({example}).")


def set_option(example: str):
    """--set KEY=VALUE (repeatable); `example` follows the help's "e.g."."""
    return typer.Option([], "--set", help=f"Override a config value, e.g. {example}.")


def prepare_torch(threads: Optional[int]) -> None:
    """Before a training command: torch's CPU `threads` (None: all cores), and on glibc a heap that keeps
    freed memory for reuse. By default glibc hands torch's large activation buffers back to the kernel after
    each batch and page-faults them in again: on a 2-core AMD EPYC the quickstart spent 222 of its 6:47 in
    the kernel (75M page faults); with this 4:33, the same figures and the same peak memory."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): its allocator is left as it is
        return
    for option in (M_TRIM_THRESHOLD, M_MMAP_THRESHOLD):
        libc.mallopt(option, 2**31 - 1)  # the largest int mallopt takes: no trimming, large buffers stay on the heap


def quickstart(
    images: Optional[Path] = typer.Option(None, help="Folder with one subfolder per class (default: a procedural set)."),
    out: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints and results.json go."),
    gallery_backbone: str = typer.Option("efficientnet_lite2", help="Pretrained gallery backbone."),
    gallery: Optional[Path] = typer.Option(None, help="A trained gallery checkpoint (e.g. `train cgd`'s model.safetensors) "
                                                       "instead of the pretrained backbone + GeM + PCA-whitening."),
    query_backbone: str = typer.Option("efficientnet_lite2", help="Query backbone (phone side). The gallery's own "
                                                                  "starts as a copy of the gallery model (see --inherit)."),
    image_size: int = typer.Option(160, min=32, help="Input size of the gallery model (and of the query model by default)."),
    query_size: Optional[int] = typer.Option(None, min=32, help="Input size of the query model (default: 0.85 x "
                                                                 "--image-size when it inherits, else --image-size)."),
    inherit: bool = typer.Option(True, help="A query backbone equal to the gallery's starts as a copy of the gallery "
                                            "model (weights and whitening) instead of a closed-form FC fit."),
    dim: int = typer.Option(128, min=2, help="Embedding dim of the shared space (gallery PCA-whitening)."),
    whitening_power: float = typer.Option(0.25, min=0.0, max=0.5, help="Gallery PCA-whitening power: 0.25 square-rooted "
                                                                        "(default), 0.5 full whitening, 0 PCA only."),
    objects: int = typer.Option(100, min=4, help="Procedural set: number of objects."),
    views: int = typer.Option(5, min=2, help="Procedural set: views per object."),
    crops: int = typer.Option(4, min=0, help="Random crops per training image for the closed-form FC fit."),
    photos: bool = typer.Option(True, help="Add the real photos shipped in installed packages (scikit-image, and the "
                                           "Debian packages scripts/setup.sh installs)."),
    debian_photos: bool = typer.Option(True, help="Include the Debian packages' photos (GCompris, wallpapers) in --photos."),
    unlabelled: Optional[Path] = typer.Option(None, help="A folder of your own unlabelled photos to fit on too."),
    photo_crops: Optional[int] = typer.Option(None, min=0, help="Random crops per real photo (packaged and --unlabelled); "
                                                               "default: 4000 in all, at most 40 and at least 4 each."),
    eval_photos: List[Path] = typer.Option([], help="A labelled photo folder to check the pair on (repeatable): "
                                                    "class subfolders, ukbench%05d.jpg or name_<digits>.jpg."),
    epochs: Optional[int] = typer.Option(None, min=0, help="End-to-end compatibility epochs (default: 1 for an "
                                                           "inheriting query model, 0 after a closed-form FC fit)."),
    seed: int = typer.Option(0),
    threads: Optional[int] = THREADS,
    device: str = typer.Option("cpu", help="Where the end-to-end epochs train: cpu | cuda | mps."),
    progress: bool = PROGRESS,
) -> None:
    """Embed a gallery with a pretrained gallery model, train a query model into its space (by default the
    gallery's network at 0.85 x its input side), and print symmetric and asymmetric mAP on held-out classes."""
    require_folders("--images", images, expected=" (expected DIR/<class>/<image>.jpg)")
    if gallery is not None and not gallery.is_file():
        fail(f"--gallery {gallery} is not a checkpoint file (e.g. runs/cgd/model.safetensors)")
    require_folders("--unlabelled", unlabelled, expected=" of photos")
    require_folders("--eval-photos", *eval_photos)
    with user_errors():
        from training import quickstart as qs
        from training.compatible import CompatConfig

        prepare_torch(threads)
        cfg = qs.QuickstartConfig(
            out=out, images=images, gallery_backbone=gallery_backbone, gallery=gallery, query_backbone=query_backbone,
            image_size=image_size, query_size=query_size, inherit=inherit, embedding_dim=dim, whitening_power=whitening_power, n_objects=objects, n_views=views, photos=photos,
            debian_photos=debian_photos,
            unlabelled=unlabelled, eval_photos=tuple(eval_photos), compat=CompatConfig(views=crops, photo_views=photo_crops, seed=seed),
            epochs=epochs,
            seed=seed, progress=progress, device=device,
        )
        qs.run_quickstart(cfg, log=typer.echo)


def backbones() -> None:
    """List the backbone registry: name.tag (the first tag of a name is its default), input, weight source."""
    with user_errors():
        from training import backbones as bb

    for name, cfg in bb.REGISTRY.items():
        h, w = cfg.spec.input_size
        default = "*" if bb.DEFAULT_TAGS[cfg.arch] == cfg.tag else " "
        typer.echo(f"{default} {name:42s} {cfg.kind:4s} {h}x{w}  {cfg.weight_source():52s} {cfg.description}")


train_app = typer.Typer(
    help="Train models into one embedding space (gallery side in the cloud, query side on the phone).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@train_app.command("aff")
def aff(
    config: Optional[Path] = config_option("default: the built-in small config = configs/aff_small.json"),
    out: Optional[Path] = OUT,
    set_: List[str] = set_option("--set train.epochs=1 --set extractors.0.train.epochs=1"),
    overwrite_cache: bool = typer.Option(
        False, help="Re-extract feature caches that belong to another dataset instead of stopping."),
    threads: Optional[int] = THREADS,
    device: str = DEVICE,
    resume: bool = typer.Option(True, help="Continue an interrupted run from OUT/checkpoints (--no-resume: start "
                                           "every stage afresh)."),
    progress: bool = PROGRESS,
) -> None:
    """AFF: train DELG/DOLG/CVNet gallery extractors, fuse their features with a dynamic mixer and train a light
    query model with a momentum classifier into the same space; print single-feature, ensemble, mixer and
    query-vs-mixer mAP on a held-out split, and write gallery.pt, query.pt and results.json."""
    with user_errors():
        from training.aff.config import load_config
        from training.aff.train import run_aff

        _train(load_config, run_aff, config, list(set_) + flag_overrides({"out": out and str(out)}), threads,
               progress=progress, overwrite_cache=overwrite_cache, device=device, resume=resume)


def flag_overrides(flags: dict) -> list[str]:
    """Command-line flags as `--set key=value` overrides (JSON values); flags left at None are not given."""
    return [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]


def _train(load, run, config: Optional[Path], overrides: list[str], threads: Optional[int], **run_options) -> None:
    """What every train command ends with: its config with the overrides, the thread count, then the run."""
    cfg = load(config, overrides)
    prepare_torch(threads)
    run(cfg, log=typer.echo, **run_options)


def train_command(name: str, config: str, set_: str):
    """Register `train NAME` with the options the train commands share: --config first (`config`: its help's
    example), then the command's own, then --out, --set (`set_`: the example), --threads, --device, --progress.
    The command checks its own options and returns (load config, run, flags as config keys) for _train."""
    shared = {"out": (Optional[Path], OUT), "set_": (List[str], set_option(set_)), "threads": (Optional[int], THREADS),
              "device": (str, DEVICE), "progress": (bool, PROGRESS)}

    def register(command):
        @functools.wraps(command)
        def train(config, out, set_, threads, device, progress, **options) -> None:
            with user_errors():
                load, run, flags = command(**options)
                overrides = flag_overrides({"out": out and str(out), **flags}) + list(set_)
                _train(load, run, config, overrides, threads, device=device, progress=progress)

        own = [p.replace(kind=KEYWORD) for p in inspect.signature(command).parameters.values()]
        params = [inspect.Parameter("config", KEYWORD, default=config_option(config), annotation=Optional[Path]), *own,
                  *(inspect.Parameter(k, KEYWORD, default=d, annotation=t) for k, (t, d) in shared.items())]
        train.__signature__ = inspect.Signature(params)
        train.__annotations__ = {p.name: p.annotation for p in params}  # what typer reads the types from
        return train_app.command(name)(train)

    return register


@train_command("distill", config="e.g. configs/distill_fashion_mnist.json", set_="--set epochs=5 --set loss.tau=0.7")
def distill(
    teacher: Optional[str] = typer.Option(None, help="The black-box teacher: a .safetensors checkpoint, a bundle folder, "
                                                     "or a `retrieval-sdk serve` URL (write key in $RETRIEVAL_SDK_TEACHER_KEY)."),
    images: Optional[Path] = typer.Option(None, help="Folder of unlabelled images to distil on (any depth)."),
    eval_images: Optional[Path] = typer.Option(None, help="Labelled folder (one subfolder per class) to evaluate on."),
    student: Optional[str] = typer.Option(None, help="Student backbone (see `retrieval-sdk backbones`)."),
    init: Optional[Path] = typer.Option(None, help="Start the student from this checkpoint (e.g. runs/quickstart/query.safetensors)."),
    mode: Optional[str] = typer.Option(None, help="symmetric (the paper: the student ranks like the teacher) or "
                                                  "asymmetric (the student also lands in the teacher's space)."),
    teacher_budget: Optional[int] = typer.Option(None, min=0, help="Most images sent to the teacher (cached ones are free)."),
    ablation: List[str] = typer.Option([], help="Also train with this switch, same data: no_augmentation, "
                                                "no_mixup_labelling, grad_through_mixed, symmetric, asymmetric."),
):
    """Rank distillation: train a phone-size student from a black-box teacher's rankings on unlabelled images;
    print the teacher's and the student's mAP (and the ablations') in one table, write student.safetensors."""
    if mode not in (None, "symmetric", "asymmetric"):
        fail(f"--mode must be symmetric or asymmetric, got {mode!r}")
    require_folders("--images", images)
    require_folders("--eval-images", eval_images)
    from training.distill import ABLATIONS, load_distill_config, run_distill

    return load_distill_config, run_distill, {
        "teacher": teacher, "images": images and str(images), "eval_images": eval_images and str(eval_images),
        "student.backbone": student, "student.init": init and str(init), "teacher_budget": teacher_budget,
        "ablations": list(ablation) or None, **{f"loss.{k}": v for k, v in ABLATIONS.get(mode, {}).items()}}


@train_command("cgd", config="e.g. configs/cgd_fashion_mnist.json", set_="--set train.epochs=2 --set sampler.k=4")
def cgd(
    images: Optional[Path] = typer.Option(None, help="Labelled folder, one subfolder per class; a held-out share of "
                                                     "the classes is kept unseen for evaluation."),
    descriptors: Optional[str] = typer.Option(None, help="Descriptor configuration, letters S (SPoC), M (MAC), G (GeM); "
                                                         "the first feeds the classifier (default SG)."),
    dim: Optional[int] = typer.Option(None, min=1, help="Total embedding dim, split evenly over the descriptors."),
    backbone: Optional[str] = typer.Option(None, help="Backbone (see `retrieval-sdk backbones`)."),
    ablation: List[str] = typer.Option([], help="Also train this descriptor configuration (repeatable), same data "
                                                "and batches, e.g. --ablation S --ablation M --ablation G."),
):
    """CGD: train a retrieval model on labelled images (batch-hard triplet + smoothed softmax on P x K batches);
    print R@1/2/4/8 and mAP on held-out images for each descriptor configuration and the pretrained-GeM baseline,
    write model.safetensors (exportable; usable as a quickstart gallery, a teacher or a query model)."""
    require_folders("--images", images, expected=" (expected DIR/<class>/<image>.jpg)")
    from training.cgd import load_cgd_config, run_cgd

    flags = {"model.descriptors": descriptors, "model.dim": dim, "model.backbone": backbone,
             "ablations": list(ablation) or None}
    if images is not None:
        flags.update({"data.kind": "folder", "data.root": str(images), "data.split": "classes"})
    return load_cgd_config, run_cgd, flags


@train_command("mabnet", config="e.g. configs/mabnet_instances.json; configs/mabnet_full.json is the paper's ViT-S/16",
               set_="--set train.epochs=2 --set crops.n_local=4")
def mabnet(
    backbone: Optional[str] = typer.Option(None, help="Backbone of both blocks (see `retrieval-sdk backbones`)."),
    ablation: List[str] = typer.Option([], help="Also train this ablation (repeatable): no_transfer, reversed_transfer, "
                                                "no_kl, assistant_reference, reversed_flow, master_only, per_iteration."),
    lam: List[float] = typer.Option([], "--lambda", help="Also train with this transfer lambda (repeatable): the sweep."),
):
    """MABNet: train master and assistant gallery blocks (multi-crop, KL, ArcFace, weight transfer) on labelled
    images; print MABNet, MABNet(C), re-ranking, ablation and lambda-sweep mAP in one table (and a distilled query
    model's asym/sym with a `query` section), write mabnet.safetensors (exportable; an AFF extractor kind)."""
    from training.mabnet.train import load_mabnet_config, run_mabnet

    return load_mabnet_config, run_mabnet, {"model.backbone": backbone, "ablations": list(ablation) or None,
                                            "lambdas": list(lam) or None}


def register(app: typer.Typer) -> None:
    app.command()(quickstart)
    app.command()(backbones)
    app.add_typer(train_app, name="train")
