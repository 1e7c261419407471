"""CLI command `retrieval-sdk evaluate`: a bundle on the user's own labelled photos (sdk/eval_run.py), with
results.json and a self-contained report.html. Runtime side: no torch; the evaluation loads inside."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from sdk.cli_errors import user_errors


def evaluate(
    bundle: Path = typer.Argument(..., help="Model bundle folder (manifest.json, query files, gallery model)."),
    images: Path = typer.Option(..., "--images", "-i", help="Labelled photos: the queries (and, leave-one-out, "
                                "the gallery); with --gnd the folder of the gnd file's images."),
    labels: str = typer.Option("auto", "--labels", help="auto (class subfolders, else file names), folders, "
                               "names (ukbenchNNNNN / NAME_123.jpg) or a CSV file 'path,label'."),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Gallery photos (protocol query-gallery)."),
    gallery_labels: Optional[str] = typer.Option(None, "--gallery-labels",
                                                 help="Labels of --gallery, as --labels (default: the same mode)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", help="leave-one-out | query-gallery | revisited "
                                           "(default: from --gnd / --gallery)."),
    gnd: Optional[Path] = typer.Option(None, "--gnd", help="Revisited ground truth (gnd_*.pkl): E/M/H mAP."),
    gallery_bundle: Optional[Path] = typer.Option(None, "--gallery-bundle",
                                                  help="Bundle with the gallery model when BUNDLE has none."),
    rerank: List[str] = typer.Option([], "--rerank", help="Also after re-ranking: aqe, alpha-qe, diffusion "
                                     "(repeat or comma-separate)."),
    only: List[str] = typer.Option([], "--only", help="Evaluate only these files: FORMAT, FORMAT/PRECISION or a "
                                   "path (repeatable; default every file)."),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", "-o", help="Report folder: results.json, "
                             "report.html, cache/."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Ranked list length for mP@10, PR curves and grids "
                              "(0: 1000, revisited: the whole database)."),
    index: str = typer.Option("Flat", "--index", help="faiss index for the ranked lists: Flat (exact), HNSW32, ..."),
    grid_queries: int = typer.Option(20, "--grid-queries", min=1, help="Worst and best queries shown in grids."),
    grid_k: int = typer.Option(8, "--grid-k", min=1, help="Results per query in the grids."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Runtime threads (default: all cores)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per embedding batch."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse embeddings cached under OUT/cache."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Evaluate every query-side file of BUNDLE (fp32/fp16/int8, ONNX/TFLite) on labelled photos: asymmetric
    vs symmetric mAP, Recall@1/5/10, mP@10, speed; writes results.json and report.html to --out."""
    with user_errors("interrupted; embeddings finished so far are cached: run the same command again"):
        from sdk.eval_report import write_report
        from sdk.eval_run import EvalConfig, format_table, run_evaluation, write_results

        methods = tuple(m.strip() for item in rerank for m in item.split(",") if m.strip())
        cfg = EvalConfig(bundle=bundle, images=images, labels=labels, gallery=gallery, gallery_labels=gallery_labels,
                         protocol=protocol, gnd=gnd, gallery_bundle=gallery_bundle, rerank=methods,
                         only=tuple(o.strip() for item in only for o in item.split(",") if o.strip()), out=out,
                         top_k=top_k, index=index, grid_queries=grid_queries, grid_k=grid_k, threads=threads,
                         batch_size=batch_size, cache=cache, progress=progress)
        run = run_evaluation(cfg, log=lambda m: typer.echo(m, err=True))
        for name, reason in run.unreadable[:10]:
            typer.secho(f"warning: skipped {name}: {reason}", err=True, fg=typer.colors.YELLOW)
        if len(run.unreadable) > 10:
            typer.secho(f"warning: ... and {len(run.unreadable) - 10} more unreadable images (all in results.json)",
                        err=True, fg=typer.colors.YELLOW)
        typer.echo(format_table(run))
        results = write_results(run, out)
        report = write_report(run, out / "report.html")
    typer.echo(f"wrote {results} and {report}")


def register(app: typer.Typer) -> None:
    app.command()(evaluate)
