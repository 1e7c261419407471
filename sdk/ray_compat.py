"""The one place that knows Ray's API history: how to ask Ray Data for a fixed pool of N actors, and how
to start a local Ray that listens on loopback only.

`Dataset.map_batches` took `compute=ActorPoolStrategy(size=N)` (Ray < 2.9), then `concurrency=N` (2.9 to
2.4x, `compute` deprecated), then `compute=ActorPoolStrategy(size=N)` again with `concurrency` deprecated
(Ray 2.60 documents it as "This argument is deprecated. Use ``compute`` argument.").
"""

from __future__ import annotations

import inspect
import os


def actor_pool(size: int) -> dict:
    """map_batches keyword arguments for a pool of exactly `size` actors, in this Ray's preferred form."""
    from ray.data import ActorPoolStrategy, Dataset

    params = inspect.signature(Dataset.map_batches).parameters
    doc = Dataset.map_batches.__doc__ or ""
    if "concurrency" in params and "concurrency: This argument is deprecated" not in doc:
        return {"concurrency": size}
    return {"compute": ActorPoolStrategy(size=size)}


def init_local_ray(num_cpus: int, address: str | None = None) -> bool:
    """Connect to the Ray cluster at `address`, or start a local one: `num_cpus` CPUs, no dashboard, no usage
    reporting, the node pinned to 127.0.0.1. True when this call started it (the caller shuts it down)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phone-home from an ingestion run
    import ray

    if ray.is_initialized():
        return False
    quiet = {"log_to_driver": False, "configure_logging": True, "logging_level": "error"}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=256 * 1024 * 1024, **quiet)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    return True
