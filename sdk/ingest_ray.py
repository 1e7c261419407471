"""`retrieval-sdk index build --runner ray`: gallery ingestion on Ray Data. The images still to embed (the
same resume plan as sdk/ingest.py: ids already stored unchanged are skipped) flow through an actor pool,
each actor holding the bundle's ONNX gallery model; the driver writes each embedded batch durably to the
index at any URL as it arrives, so an interrupted run resumes where it stopped.

Embeddings are those of the single-process run: the actors run the same Embedder on the same files.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sdk.errors import SdkError
from sdk.ingest import IngestReport, embed_chunk, ingest_run, store


class EmbedActor:
    """One Ray actor: the bundle's gallery model, embedding batches of {path, id, meta} rows."""

    def __init__(self, bundle: str, role: str, threads: int | None, thumbnails: int):
        from sdk.embedder import Embedder

        self.embedder = Embedder.from_bundle(bundle, role=role, threads=threads, verify=False)
        self.thumbnails = thumbnails

    def __call__(self, batch: dict) -> dict:
        chunk = [(Path(p), str(i), json.loads(m)) for p, i, m in zip(batch["path"], batch["id"], batch["meta"])]
        good, vectors, thumbs, failed = embed_chunk(self.embedder, chunk, self.thumbnails)
        n, dim = len(chunk), self.embedder.dim
        out_vectors = np.zeros((n, dim), np.float32)
        ok = np.zeros(n, bool)
        position = {item_id: j for j, (_, item_id, _) in enumerate(chunk)}
        thumb_col = np.empty(n, object)
        for j, (_, item_id, _) in enumerate(good):
            out_vectors[position[item_id]] = vectors[j]
            ok[position[item_id]] = True
            thumb_col[position[item_id]] = (thumbs[j] if thumbs else None) or b""
        errors = np.array([""] * n, object)
        for item_id, reason in failed:
            errors[position[item_id]] = reason
        thumb_col[~ok] = b""
        return {"path": batch["path"], "id": batch["id"], "meta": batch["meta"], "vector": out_vectors, "ok": ok,
                "error": errors, "thumb": thumb_col}


def ingest_ray(bundle: str | Path, images_dir: str | Path, index_url: str | Path, *, create: bool = True,
               config: str | None = None, batch_size: int = 32, workers: int = 2, threads: int | None = 1,
               thumbnails: int = 256, address: str | None = None,
               log: Callable[[str], None] = print) -> IngestReport:
    """Embed every image under images_dir into the index at index_url on Ray (`workers` actors of `threads`
    ONNX Runtime threads, default 1; a local Ray with `workers` CPUs on 127.0.0.1 unless `address` names a
    cluster)."""
    try:
        import ray
    except ImportError:
        raise SdkError("--runner ray needs Ray: pip install 'retrieval-sdk[scale]'") from None
    from sdk.ray_compat import actor_pool, init_local_ray

    with ingest_run(bundle, images_dir, index_url, create, config, log) as run:
        if run.todo:
            started = init_local_ray(workers, address)
            try:
                ds = ray.data.from_items([{"path": str(p), "id": i, "meta": json.dumps(m)} for p, i, m in run.todo],
                                         override_num_blocks=max(1, min(len(run.todo) // batch_size, 64)))
                ds = ds.map_batches(EmbedActor, batch_size=batch_size, batch_format="numpy", num_cpus=1,
                                    fn_constructor_args=(str(bundle), run.role, threads or 1, thumbnails), **actor_pool(workers))
                for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
                    ok = batch["ok"].astype(bool)
                    good = [(Path(p), str(i), json.loads(m))
                            for p, i, m, keep in zip(batch["path"], batch["id"], batch["meta"], ok) if keep]
                    thumbs = [bytes(t) or None for t in batch["thumb"][ok]] if thumbnails else None
                    failed = [(str(i), str(e)) for i, e, keep in zip(batch["id"], batch["error"], ok) if not keep]
                    store(run.index, run.space, good, batch["vector"][ok], thumbs, failed, run.report, log)
            finally:
                if started:
                    ray.shutdown()
    return run.report
