"""`nomic-moe serve --engine ray`: the same app as N Ray Serve replicas, each with its own batcher.

One replica per GPU, or per `cpus_per_replica` cores. Ray's own backpressure is set to agree with
the batcher: a replica takes enough requests at once to fill its batches (max_ongoing_requests)
and Ray queues a bounded number more before it sheds load with 503 (max_queued_requests); the
replica's batcher still answers 429 with Retry-After when its token budget is full. A replica is
given longer to drain than one request may take (graceful_shutdown_timeout_s).

With RAY_ADDRESS set, it joins that cluster; `serve run` takes `app_builder` from a YAML config:

    applications:
      - name: nomic-moe
        route_prefix: /
        import_path: nomic_moe_serving.ray_serve:app_builder
        args: {model: /models/nomic-embed-text-v2-moe, dtype: bfloat16, device: cuda}
        deployments:
          - name: NomicMoEReplica
            num_replicas: 2
            ray_actor_options: {num_gpus: 1}
"""

import dataclasses
import os
import signal
import sys

from ray import serve

from .app import create_app
from .engine import Engine, log
from .settings import Settings

ONGOING_PER_REPLICA = 256  # requests one replica's batcher may hold: enough to fill a batch with queries


@serve.ingress()
class NomicMoEReplica:
    """One model replica: loads, warms up, then serves the FastAPI app of app.py."""

    def __init__(self, settings: dict):
        self.engine = Engine(Settings(**settings))
        self.engine.start()
        if not self.engine.wait_ready():
            raise RuntimeError(f"the replica could not load the model: {self.engine.error}")

    def __serve_build_asgi_app__(self):
        return create_app(self.engine)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=30)


def deployment(settings: Settings, gpus: int = 0, cpus: int = 1):
    """The Ray Serve application for these settings (replicas from settings, the cluster's GPUs, or cores)."""
    on_gpu = settings.device.startswith("cuda") or settings.provider == "cuda"
    if on_gpu:
        replicas, actor = settings.replicas or max(gpus, 1), {"num_gpus": 1, "num_cpus": 1}
    else:
        per = settings.cpus_per_replica or min(cpus, 4)
        replicas = settings.replicas or max(1, cpus // per)
        actor = {"num_cpus": min(per, cpus / replicas)}
        settings = dataclasses.replace(settings, threads=settings.threads or per)
    d = serve.deployment(NomicMoEReplica).options(
        num_replicas=replicas,
        ray_actor_options=actor,
        max_ongoing_requests=ONGOING_PER_REPLICA,
        max_queued_requests=4 * ONGOING_PER_REPLICA * replicas,
        graceful_shutdown_timeout_s=settings.request_timeout + 10,
        health_check_period_s=5,
    )
    return d.bind(dataclasses.asdict(settings)), replicas


def app_builder(args: dict):
    """For `serve run` / a Serve YAML config: args are Settings' fields."""
    return deployment(Settings(**args))[0]


def serve_on_ray(settings: Settings) -> int:
    from nomic_moe_inference.corpus.ray_engine import _init_ray

    Engine(settings).stop()  # the cheap checks (folder, files, dtype) before Ray starts; each replica loads on its own
    # blocked before Ray starts its threads (they inherit the mask), then waited for: Ray's own
    # handlers never see SIGTERM, and the replicas are drained by serve.shutdown()
    signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    ray, started = _init_ray()
    try:
        res = ray.cluster_resources()
        app, replicas = deployment(settings, int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1))))
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name="nomic-moe", route_prefix="/", blocking=False)
        log(f"Ray Serve: {replicas} replica(s) ready on http://{settings.host}:{settings.port} "
            f"({'cluster ' + os.environ['RAY_ADDRESS'] if os.environ.get('RAY_ADDRESS') else 'local Ray'})")
        signal.sigwait(signals)
        log("stopping: Ray Serve drains the replicas")
        serve.shutdown()
    finally:
        if started:
            ray.shutdown()
    print("stopped", file=sys.stderr)
    return 0
