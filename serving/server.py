"""`nomic-moe serve`: the app under uvicorn, with a lifecycle a load balancer can trust.

Listening starts at once; the model loads and warms up on its own thread while /health says 503.
SIGTERM (or Ctrl-C): /health turns 503 and new requests get 503, the requests in flight finish,
then the process exits.
"""

import contextlib
import signal
import sys

from .app import create_app
from .engine import Engine, log
from .settings import Settings


def serve(settings: Settings) -> int:
    import uvicorn

    if settings.engine == "ray":
        from .ray_serve import serve_on_ray

        return serve_on_ray(settings)
    engine = Engine(settings)  # cheap checks: a wrong folder fails here, before any port opens
    app = create_app(engine)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal after its graceful shutdown, which kills the process before
            # the model thread is stopped; a drained server exits 0 instead
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            log("stopping: draining the requests in flight")
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=settings.request_timeout + 5, lifespan="off")
    server = Server(config)
    failed = []

    def on_failure(error):
        failed.append(error)
        server.should_exit = True

    log(f"listening on http://{settings.host}:{settings.port} (OpenAI: /v1/embeddings, TEI: /embed, docs: /docs); "
        f"loading {engine.model_dir} as {engine.name!r} ...")
    engine.start(on_failure)
    try:
        server.run()
    finally:
        engine.stop()
    if failed:
        print(f"error: {failed[0]}", file=sys.stderr)
        return 2
    log("stopped")
    return 0
