"""CLI commands `retrieval-sdk export` and `verify`. torch, onnx, litert-torch and coremltools load inside
the commands, so `import sdk.cli` stays torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sdk.cli_errors import require_folders, user_errors


def export_command(
    checkpoint: Path = typer.Argument(..., help="Query model checkpoint (.pt written by training/quickstart)."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write (files + manifest.json)."),
    format: List[str] = typer.Option(["onnx"], "--format", "-f",
                                     help="onnx | tflite | coreml | all (repeat or comma-separate)."),
    precision: List[str] = typer.Option(["fp32"], "--precision", "-p",
                                        help="fp32 | fp16 | int8 (repeat or comma-separate); fp32 files are "
                                             "always written as the reference."),
    calibration: Optional[Path] = typer.Option(None, "--calibration",
                                               help="Folder of real photos to calibrate int8 (needed for int8)."),
    gallery: Optional[Path] = typer.Option(None, "--gallery",
                                           help="Gallery model checkpoint of the same space: exported to ONNX."),
    max_calibration_images: int = typer.Option(200, min=1, help="Calibrate on at most this many images."),
    coreml_image_input: bool = typer.Option(False, "--coreml-image-input",
                                            help="CoreML input as an image (camera bitmap) instead of a tensor."),
    tflite_metadata: bool = typer.Option(True, help="Write TFLite metadata (via the isolated tflite-support env)."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Export a query model (and optionally its gallery model) to ONNX / TFLite / CoreML with parity checks,
    quantization and a model bundle with manifest.json."""
    with user_errors():
        from export.bundle import export_bundle

        require_folders("--calibration", calibration, expected="; pass a folder of photos (50-300 is plenty)")
        manifest = export_bundle(checkpoint, out, gallery_checkpoint=gallery, formats=format, precisions=precision,
                                 calibration=calibration, max_calibration_images=max_calibration_images,
                                 coreml_image_input=coreml_image_input, tflite_metadata=tflite_metadata,
                                 progress=progress, log=typer.echo)
    record = manifest.extra.get("export", {})
    parity = record.get("parity", {})
    typer.echo(f"\nwrote bundle {out} (embedding space {manifest.embedding_space}):")
    typer.echo(f"  {'file':26} {'format':7} {'prec':5} {'layout':6} {'batch':7} {'size':>10}  parity vs torch")
    for role, entry in manifest.models.items():
        for f in entry.files:
            p = parity.get(f.path, {})
            text = (f"max abs diff {p['max_abs_diff']:.1e}, min cos {p['min_cosine']:.5f}" if p.get("images")
                    else "")
            if p.get("note"):
                text += f" ({p['note']})"
            typer.echo(f"  {f.path:26} {f.format:7} {f.precision:5} {f.layout:6} {f.batch:7} "
                       f"{f.size_bytes / 1e6:>7.2f} MB  {text}")
    for note in record.get("notes", []):
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
    if "calibration" in record:
        c = record["calibration"]
        typer.echo(f"int8 calibrated on {c['images']} images from {c['folder']}")
    typer.echo(f"manifest: {out / 'manifest.json'}; check it with: retrieval-sdk verify {out} --images DIR")


def verify_command(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `retrieval-sdk export`."),
    images: List[Path] = typer.Option([], "--images", "-i",
                                      help="Image folder(s) to compare on (repeatable; labels from class "
                                           "subfolders or file names give mAP). Default: a procedural set."),
    checkpoint: Optional[Path] = typer.Option(None, help="Query checkpoint (default: the manifest's source)."),
    gallery_checkpoint: Optional[Path] = typer.Option(None, help="Gallery checkpoint (default: the manifest's)."),
    threads: int = typer.Option(1, min=1, help="Threads for every runtime (latency column)."),
    runs: int = typer.Option(10, min=1, help="Timed runs per file for the latency column."),
    max_images: int = typer.Option(200, min=2, help="At most this many images per folder."),
    tflite_support: bool = typer.Option(True, help="Compare tflite-support's ImageEmbedder on .tflite files."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here."),
    progress: bool = typer.Option(True, help="Show progress bars."),
) -> None:
    """Run every file of a bundle with every runtime available here on sample images; print size, max abs
    diff and cosine to the torch model, mAP, latency per file, and PASS/FAIL acceptance checks
    (exit code 1 when a check fails)."""
    with user_errors():
        from export.verify import format_report, verify_bundle, write_json

        require_folders("--images", *images)
        report = verify_bundle(bundle, images, checkpoint=checkpoint, gallery_checkpoint=gallery_checkpoint,
                               threads=threads, runs=runs, tflite_support=tflite_support, max_images=max_images,
                               progress=progress, log=typer.echo)
        typer.echo(format_report(report))
        if json_out:
            write_json(report, json_out)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
    app.command("verify")(verify_command)
