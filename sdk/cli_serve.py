"""CLI commands `retrieval-sdk index build|add|info|compact|search` and `serve`: the runtime side, no
torch anywhere; the index, embedder and server load inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sdk.cli_errors import fail, user_errors

index_app = typer.Typer(help="Build and inspect gallery indexes: a folder (faiss + SQLite, crash-safe) or a "
                        "postgresql:// / qdrant:// URL (docs/scale-out.md).", no_args_is_help=True)
INDEX_URL = "Index folder, faiss:///PATH, postgresql://...?collection=NAME or qdrant://HOST:PORT/COLLECTION"
INTERRUPTED = "interrupted; what was acknowledged is saved: run the same command again to resume"


def _ingest(bundle: Path, images: Path, index: str, create: bool, config: Optional[str], batch_size: int,
            threads: Optional[int], progress: bool, runner: str = "local", workers: int = 2,
            ray_address: Optional[str] = None) -> None:
    with user_errors(INTERRUPTED):
        if runner not in ("local", "ray"):
            fail(f"--runner must be 'local' or 'ray', got {runner!r}")
        common = {"create": create, "config": config, "batch_size": batch_size, "threads": threads,
                  "log": lambda m: typer.echo(m, err=True)}
        if runner == "ray":
            from sdk.ingest_ray import ingest_ray

            report = ingest_ray(bundle, images, index, workers=workers, address=ray_address, **common)
        else:
            from sdk.ingest import ingest

            report = ingest(bundle, images, index, progress=progress, **common)
    typer.echo(report.summary())
    if report.failed:
        typer.secho(f"{len(report.failed)} files could not be read (listed above as warnings)", err=True,
                    fg=typer.colors.YELLOW)


BATCH = typer.Option(32, "--batch-size", min=1, help="Images per batch (each batch is saved before the next).")
THREADS = typer.Option(None, "--threads", min=1, help="ONNX Runtime threads (default: all cores).")
PROGRESS = typer.Option(True, "--progress/--no-progress", help="Show a progress bar.")


@index_app.command("build")
def index_build(
    bundle: Path = typer.Argument(..., help="Model bundle folder (manifest.json + gallery.onnx)."),
    images: Path = typer.Argument(..., help="Folder of gallery images (searched recursively)."),
    index: str = typer.Option(..., "--index", help=INDEX_URL + " (created, or resumed)."),
    config: Optional[str] = typer.Option(None, "--config", help="faiss config of a new faiss index (default Flat): "
                                         "Flat, HNSW32, IVF1024,Flat, IVF1024,PQ64 ..."),
    batch_size: int = BATCH, threads: Optional[int] = THREADS, progress: bool = PROGRESS,
    runner: str = typer.Option("local", "--runner", help="local (this process) or ray (an actor pool of "
                                                         "embedders on a local or existing Ray cluster)."),
    workers: int = typer.Option(2, "--workers", min=1, help="--runner ray: embedding actors."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="--runner ray: an existing cluster "
                                              "(default: a local Ray with --workers CPUs on 127.0.0.1)."),
) -> None:
    """Embed IMAGES with the bundle's gallery model into a new index; re-run to resume after an interruption."""
    _ingest(bundle, images, index, True, config, batch_size, threads, progress, runner, workers, ray_address)


@index_app.command("add")
def index_add(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    images: Path = typer.Argument(..., help="Folder of images to add (unchanged, already indexed files are skipped)."),
    index: str = typer.Option(..., "--index", help=INDEX_URL + " (existing)."),
    batch_size: int = BATCH, threads: Optional[int] = THREADS, progress: bool = PROGRESS,
) -> None:
    """Add new or changed images to an existing index (ids are paths relative to IMAGES)."""
    _ingest(bundle, images, index, False, None, batch_size, threads, progress)


@index_app.command("info")
def index_info(path: str = typer.Argument(..., help=INDEX_URL + ".")) -> None:
    """Print an index's embedding space, config and counts as JSON."""
    from dataclasses import asdict

    from sdk.index_url import open_index

    with user_errors(INTERRUPTED), open_index(path, read_only=True) as idx:
        typer.echo(json.dumps(asdict(idx.stats()), indent=2))


@index_app.command("compact")
def index_compact(
    path: Optional[str] = typer.Argument(None, help="Index folder or URL (not served by a running server)."),
    server: Optional[str] = typer.Option(None, "--server", help="URL of the `retrieval-sdk serve` holding the index."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="RETRIEVAL_SDK_API_KEY",
                                          help="A write key for --server (or $RETRIEVAL_SDK_API_KEY)."),
) -> None:
    """Drop deleted/replaced vectors (tombstones) and write a fresh snapshot: of an index folder, or of the
    index a running server holds (--server URL; it keeps answering searches meanwhile)."""
    from sdk.index import IndexLockedError
    from sdk.index_url import open_index

    with user_errors(INTERRUPTED):
        if (path is None) == (server is None):
            fail("give an index folder or --server URL (for an index a running server holds), not both")
        if server is not None:
            from sdk.client import Client

            with Client(server, api_key=api_key, check_space=False) as c:
                r = c.compact()
            typer.echo(f"dropped {r['dropped']} tombstones; {r['items']} items")
            return
        try:
            idx = open_index(path)
        except IndexLockedError as e:
            fail(f"{e}; if a server holds it, run `retrieval-sdk index compact --server URL`")
        with idx:
            dropped = idx.compact()
            idx.save()
            typer.echo(f"dropped {dropped} tombstones; {len(idx)} items")


@index_app.command("search")
def index_search(
    bundle: Path = typer.Argument(..., help="Model bundle folder."),
    image: Path = typer.Argument(..., help="Query image."),
    index: str = typer.Option(..., "--index", help=INDEX_URL + "."),
    k: int = typer.Option(10, "-k", min=1, help="Results to print."),
    rerank: str = typer.Option("none", help="none, aqe, alpha_qe or diffusion."),
) -> None:
    """Embed IMAGE with the query model and print the top-k ids and scores."""
    from sdk.embedder import Embedder
    from sdk.index_url import open_index
    from sdk.rerank import rerank_search

    with user_errors(INTERRUPTED), open_index(index, read_only=True) as idx:
        emb = Embedder.from_bundle(bundle, role="query")
        for hit in rerank_search(idx, emb.embed_one(image), k, rerank, space=emb.space)[0]:
            typer.echo(f"{hit.score:.4f}  {hit.id}")


def serve(
    bundle: Path = typer.Option(..., "--bundle", help="Model bundle folder (query + gallery models)."),
    index: str = typer.Option(..., "--index", help=INDEX_URL + " (created empty if absent; a database URL "
                                                    "lets several stateless replicas serve one gallery)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback should use API keys."),
    port: int = typer.Option(8000, min=0, max=65535),
    api_keys_file: Optional[Path] = typer.Option(
        None, "--api-keys-file", help="Lines 'KEY read' / 'KEY read,write' (also read from $RETRIEVAL_SDK_API_KEYS)."),
    config: str = typer.Option("Flat", "--config", help="faiss config for a new index."),
    threads: Optional[int] = THREADS,
    checkpoint_every: int = typer.Option(20000, "--checkpoint-every", min=1,
                                         help="Added vectors between index snapshots (the write-ahead log covers the rest)."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.01, help="Largest request body."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
    demo: bool = typer.Option(False, "--demo", help="Also serve the mobile web demo at /demo/ (the query model runs "
                                                    "in the browser; needs `npm ci` in mobile_demo/)."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="PEM certificate: serve HTTPS "
                                                "(phones open the camera only on HTTPS; see docs/mobile_demo.md)."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="PEM private key for --ssl-certfile."),
) -> None:
    """Serve the gallery: search by embedding or image, add/delete items, /docs for the API."""
    from sdk.index_url import redact
    from sdk.server import ServerConfig, load_api_keys
    from sdk.server import serve as run

    with user_errors(INTERRUPTED):
        if (ssl_certfile is None) != (ssl_keyfile is None):
            fail("HTTPS needs both --ssl-certfile and --ssl-keyfile (e.g. from `mkcert HOST`)")
        for f in (ssl_certfile, ssl_keyfile):
            if f is not None and not f.is_file():
                fail(f"{f} does not exist; pass PEM files (e.g. made by `mkcert HOST`)")
        keys = load_api_keys(api_keys_file)
        cfg = ServerConfig(bundle=bundle, index=index, index_config=config, api_keys=keys, threads=threads,
                           checkpoint_every=checkpoint_every,
                           max_body_bytes=int(max_body_mb * 1024 * 1024))
        scheme = "https" if ssl_certfile else "http"
        shown = "<this machine's address>" if host in ("0.0.0.0", "::") else host
        ready = (f"serving {redact(index)} with bundle {bundle} on {scheme}://{shown}:{port} "
                 f"({str(len(keys)) + ' API keys' if keys else 'no API keys: open access'}); API docs at /docs")

        def on_ready(app) -> None:
            if demo:
                from sdk.demo import mount_demo

                mount_demo(app, bundle)
            typer.echo(ready + (f"; mobile demo at {scheme}://{shown}:{port}/demo/" if demo else ""), err=True)

        run(cfg, host=host, port=port, log_level=log_level, on_ready=on_ready,
            ssl_certfile=ssl_certfile and str(ssl_certfile), ssl_keyfile=ssl_keyfile and str(ssl_keyfile))


def register(app: typer.Typer) -> None:
    app.add_typer(index_app, name="index")
    app.command()(serve)
