"""The corpus job on Ray Data: the plan's parts -> map_batches over an actor pool of model replicas.

One replica per GPU, or per `cpus_per_replica` CPU cores without GPUs. Each actor loads the model
once (worker.PartEmbedder) and embeds whole parts, writing each part's parquet file atomically
itself: Ray's write_parquet names and splits files its own way, while exactly-once needs one
whole file per part. Ray retries a part whose actor died; the retry finds the file whole and
skips it, or writes it again.

Locally Ray starts by itself (and stops at the end); with RAY_ADDRESS set, the job joins that
cluster, as Ray users expect. Every node must have this package installed.
"""

import os


class _RayPartEmbedder:
    """The actor: one model replica."""

    def __init__(self, settings: dict):
        from .worker import PartEmbedder

        self.worker = PartEmbedder(settings)

    def __call__(self, batch):
        import json

        results = [self.worker.embed_part(json.loads(p)) for p in batch["part"]]
        return {key: [r[key] for r in results] for key in ("index", "rows", "tokens", "truncated", "seconds", "skipped")}


def _init_ray():
    """(ray, started_here): joins RAY_ADDRESS when set, else starts a quiet local instance."""
    import ray

    if ray.is_initialized():
        return ray, False
    import logging

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # our progress bar says what Ray Data's would
    quiet = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=256 << 20, **quiet)
    return ray, True


def run_on_ray(settings: dict, parts, on_done, replicas=None, cpus_per_replica=None) -> None:
    import json

    ray, started = _init_ray()
    try:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts rows and tokens
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        if settings["device"] == "cuda" and gpus:
            size, need = replicas or gpus, {"num_gpus": 1, "num_cpus": 1}
        else:
            per = cpus_per_replica or min(cpus, 4)
            size = replicas or max(1, cpus // per)
            # the actors may take every core: the parts are already in Ray's object store, no read task waits for one
            need = {"num_cpus": min(per, cpus / size)}
            settings = dict(settings, device="cpu", threads=settings.get("threads") or per)
        ds = ray.data.from_items([{"part": json.dumps(p)} for p in parts])
        out = ds.map_batches(
            _RayPartEmbedder,
            fn_constructor_kwargs={"settings": settings},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(size, len(parts))),
            **need,
        )
        for row in out.iter_rows():
            on_done(row)
    finally:
        if started:
            ray.shutdown()
