"""The model worker and its life: load, warm up, size the batch budget, run batches, drain, stop.

Pieces, each with one job (as TEI's router):
  admission   the routes (app.py) check the request and tokenise it on a thread pool, never on the
              model's thread;
  queue       Batcher (batcher.py): two lanes, token budgets, chunking, dropping stale work;
  worker      one thread here: takes a batch, runs the backend, hands each job its rows.
The event loop only waits on futures, so /health and /metrics answer at once under full load.
"""

import asyncio
import gc
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source
from nomic_moe_inference.batching import MAX_SEQ_LENGTH

from .backend import load_backend, warm_up
from .batcher import Batcher, Dropped, Job
from .metrics import Metrics
from .prompts import Prompts
from .settings import Settings

MIN_BATCH_TOKENS, MAX_BATCH_TOKENS = MAX_SEQ_LENGTH, 16384
WHOLE_BATCH_SECONDS = 1.0  # default batch length where a query waits for the whole batch ahead of it
PREEMPT_BATCH_SECONDS = 4.0  # where it waits for one step of it (half a layer: 1/24 on average)


def log(msg: str) -> None:
    print(f"nomic-moe serve: {msg}", file=sys.stderr, flush=True)


def resolve_dtype(name: str, device: str) -> str:
    """The dtype to load, by name: explicit names as given, "auto"/"fastest" from the CPU/GPU table (inference/cpu.py)."""
    from nomic_moe_inference import cpu

    chosen = cpu.resolve_dtype(name, device)  # raises a UserError for a name or a dtype this machine cannot run
    return chosen if isinstance(chosen, str) else str(chosen).replace("torch.", "")


def lower_priority(nice: int, log_fn: Callable[[str], None]) -> int:
    """Make the calling thread (the model's) ``nice`` steps nicer, before it starts the thread pools that
    compute with it, which take its priority (a new Linux thread inherits its creator's nice value);
    returns how much nicer it runs. On a CPU the model's threads take every core; the event loop, the
    tokenisers and the clients on the same cores need a little of them for each request, and at equal
    priority they queue behind the model, so requests reach the next batch late (RESULTS.md: the
    mixed load 1.12x faster in int8)."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return 0
    tid = threading.get_native_id()  # Linux keeps a nice value per thread; PRIO_PROCESS with a thread id sets it
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, before + nice))
        return os.getpriority(os.PRIO_PROCESS, tid) - before
    except OSError as e:
        log_fn(f"could not lower the model thread's priority ({e}); it runs at the process's")
        return 0


class Engine:
    def __init__(self, settings: Settings, log_fn: Callable[[str], None] = log):
        self.settings = s = settings
        self.log = log_fn
        self.state = "loading"  # loading -> ready -> draining -> stopped; or failed
        self.error: Optional[str] = None
        # the cheap checks first, so a wrong folder is an error before any port is opened
        self.model_dir = resolve_source(s.model)
        if s.onnx:
            checks.model_folder(self.model_dir, need_weights=False)
        else:
            checks.model_folder(self.model_dir)
        self.config = checks.model_config(self.model_dir)
        if not 0 <= s.model_nice <= 19:
            raise UserError(f"--model-nice {s.model_nice} is outside 0..19", "give 0 (the model at the process's priority) up to 19")
        if not 0 <= s.bulk_share < 1:
            raise UserError(f"--bulk-share {s.bulk_share} is outside [0, 1)", "give the share of model time bulk work keeps, e.g. 0.75")
        st = checks.read_json(self.model_dir / "config_sentence_transformers.json", "sentence-transformers config") \
            if (self.model_dir / "config_sentence_transformers.json").exists() else {}
        self.prompts = Prompts(st.get("prompts", {}), st.get("default_prompt_name") or "document")
        self.dtype = "float32" if s.onnx else resolve_dtype(s.dtype, s.device)
        self.name = s.served_model_name or (s.model if not Path(s.model).expanduser().exists() else self.model_dir.name)
        from nomic_moe_inference.corpus.job import model_revision

        self.revision = model_revision(self.model_dir)
        self.hidden_size = self.config.get("hidden_size", self.config.get("n_embd"))
        self.backend = None
        self.tokenizer = None
        self.batcher: Optional[Batcher] = None
        self.rate: Optional[float] = None  # tokens/s measured at warm-up
        self.preempt = False  # set at load: whether queries run between two steps of a bulk batch
        self.nice = 0  # how much nicer the model's threads run than the process (set on the model thread)
        self.metrics = Metrics(self)
        self._tokenize_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tokenize")
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self, on_failure: Optional[Callable[[str], None]] = None) -> None:
        """Loads and warms up on the model thread, then serves batches there until stop()."""
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._main, name="nomic-moe-model", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        self._ready.wait(timeout)
        return self.state == "ready"

    def drain(self) -> None:
        """Stop admitting; the work already queued still runs."""
        if self.state == "ready":
            self.state = "draining"

    def stop(self, timeout: float = 600) -> None:
        self.drain()
        if self.batcher is not None:
            self.batcher.close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._tokenize_pool.shutdown(wait=False)
        if self.state != "failed":
            self.state = "stopped"

    def _main(self) -> None:
        s = self.settings
        on_cpu = (s.provider if s.onnx else s.device).startswith("cpu")  # on a GPU the model's thread launches kernels: no lower
        self.nice = lower_priority(s.model_nice if on_cpu else 0, self.log)
        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - reported on /health and by the CLI
            self.error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.state = "failed"
            self._ready.set()
            self.log(f"could not load the model: {self.error}")
            if self._on_failure:
                self._on_failure(self.error)
            return
        self._ready.set()
        self._serve_batches()

    def _load(self) -> None:
        from transformers import AutoTokenizer

        s = self.settings
        t0 = time.time()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), trust_remote_code=True)
        self.backend = load_backend(self.model_dir, self.dtype, s.device, s.onnx, s.provider, s.threads, s.cuda_graphs)
        self.rate = warm_up(self.backend)
        # What is loaded now lives as long as the process (torch, transformers, the model: ~380k objects
        # at the real size). A full collection walks all of them with the GIL held, 180-320 ms measured,
        # during which no thread runs Python: /health, tokenising and the model's steps all wait.
        # Frozen, a full collection walks only what came after.
        gc.collect()
        gc.freeze()
        # a backend that runs in steps (half a layer) lets queries in between two steps of a bulk batch, so
        # bulk batches can be long (a CPU runs long batches fastest); one that runs a batch whole
        # keeps batches short, because a query waits for the whole batch ahead of it
        self.preempt = getattr(self.backend, "can_step", False)
        self.batch_seconds = s.batch_seconds or (PREEMPT_BATCH_SECONDS if self.preempt else WHOLE_BATCH_SECONDS)
        budget = s.max_batch_tokens or int(min(MAX_BATCH_TOKENS, max(MIN_BATCH_TOKENS, self.rate * self.batch_seconds)))
        if budget < MAX_SEQ_LENGTH:
            raise UserError(f"--max-batch-tokens {budget} is below one text's limit ({MAX_SEQ_LENGTH} tokens)",
                            f"use at least {MAX_SEQ_LENGTH}")
        # query batches no longer than the backend's fastest short-batch path (the CPU kernel's one call
        # for every layer: up to 128 tokens), where 400 tokens of queries in one batch ran 1.18-1.27x slower
        query_batch_tokens = s.query_batch_tokens if s.query_batch_tokens is not None else \
            getattr(self.backend, "short_batch_tokens", None)
        self.batcher = Batcher(budget, s.max_queue_tokens or 32 * budget, preempt=self.preempt, bulk_share=s.bulk_share,
                               query_batch_tokens=query_batch_tokens)
        # a query-prompt request goes in the query lane while it is about a second of work: its batch is never preempted
        self.query_request_tokens = min(budget, max(MIN_BATCH_TOKENS, int(self.rate * WHOLE_BATCH_SECONDS)))
        self.batcher.tokens_per_second = self.rate
        if self.state == "loading":
            self.state = "ready"
        b = self.backend.backends()
        self.log(f"ready in {time.time() - t0:.1f}s: model {self.name} (revision {self.revision}), "
                 f"{self.backend.kind} {self.backend.dtype_name if s.onnx else self.dtype} on {s.provider if s.onnx else s.device}, "
                 f"attention {b['attention']}, experts {b['experts']}"
                 + (f", short batches {b['short batches']}" if b.get("short batches") else "") + f"; warm-up {self.rate:,.0f} tokens/s, "
                 f"batch budget {budget} tokens ({'set' if s.max_batch_tokens else f'{self.batch_seconds:g} s of work'}), "
                 f"queue budget {self.batcher.max_queue_tokens} tokens, "
                 + (f"queries between steps of bulk batches (bulk keeps {s.bulk_share:.0%} of the time)" if self.preempt
                    else "queries first at every batch boundary")
                 + (f", query batches up to {self.batcher.query_batch_tokens} tokens" if self.batcher.query_batch_tokens else "")
                 + (f"; model threads nice +{self.nice}" if self.nice else ""))

    def _serve_batches(self) -> None:
        while True:
            batch = self.batcher.next_batch()
            if batch is None:
                return
            if self.preempt and batch.lane == "bulk":
                self._run_bulk(batch)
            else:
                self._run(batch)

    def _run(self, batch) -> None:
        """One batch, whole."""
        inputs = batch.inputs()
        t0 = time.perf_counter()
        try:
            vectors = self.backend.embed(inputs)
        except Exception as e:  # noqa: BLE001 - our bug, not the client's: those jobs get a 500, the server goes on
            self._failed(batch, e)
            return
        self._done(batch, vectors, time.perf_counter() - t0)

    def _run_bulk(self, batch) -> None:
        """A bulk batch step by step (half a layer each); between two steps, the queries waiting run first (Batcher.take_queries)."""
        steps = self.backend.embed_steps(batch.inputs())
        model_seconds = since_queries = 0.0
        while True:
            t0 = time.perf_counter()
            try:
                next(steps)
            except StopIteration as done:
                model_seconds += time.perf_counter() - t0
                self._done(batch, done.value, model_seconds)
                return
            except Exception as e:  # noqa: BLE001 - as in _run
                self._failed(batch, e)
                return
            step = time.perf_counter() - t0
            model_seconds += step
            since_queries += step
            queries = self.batcher.take_queries(since_queries)
            if queries is not None:
                self.metrics.preemptions.inc()
                since_queries = 0.0
            while queries is not None:  # every query that was waiting, so that none waits another turn
                self._run(queries)
                queries = self.batcher.more_queries()

    def _failed(self, batch, error: Exception) -> None:
        self.log(f"a batch of {len(batch.inputs())} inputs failed: {type(error).__name__}: {error}")
        self.batcher.fail(batch, error)

    def _done(self, batch, vectors, model_seconds: float) -> None:
        """model_seconds: this batch's own model time, without the query batches that ran inside it."""
        tokens = batch.tokens
        self.batcher.complete(batch, vectors, model_seconds)
        self.metrics.observe_batch(tokens, batch.requests, len(batch.inputs()), model_seconds)
        for job, _, _ in batch.parts:
            if job.first_batch is not None and job.next == len(job.ids) and job.finished == len(job.ids):
                self.metrics.queue_seconds.labels(job.lane).observe(job.first_batch - job.enqueued)
                self.metrics.inference_seconds.labels(job.lane).observe(job.infer_seconds)
        # smoothed, for Retry-After
        self.batcher.tokens_per_second = 0.8 * self.batcher.tokens_per_second + 0.2 * tokens / max(model_seconds, 1e-9)

    # ---- what the routes use ------------------------------------------------------------------

    def queue_depth(self):
        return self.batcher.depth() if self.batcher else {"query": (0, 0), "bulk": (0, 0)}

    def expert_counts(self) -> List[Tuple[int, np.ndarray]]:
        if self.backend is None:
            return []
        return list(zip(self.backend.moe_layers, self.backend.expert_pairs.copy()))

    async def tokenize(self, texts: List[str]):
        """(ids, truncated count, untruncated lengths) off the event loop and off the model thread."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()

        def work():
            full = self.tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            lengths = [len(x) for x in full]
            cut = [x[: MAX_SEQ_LENGTH - 1] + x[-1:] if len(x) > MAX_SEQ_LENGTH else x for x in full]
            return cut, lengths

        ids, lengths = await loop.run_in_executor(self._tokenize_pool, work)
        self.metrics.tokenize_seconds.observe(time.perf_counter() - t0)
        return ids, lengths

    def lane_for(self, ids: List[List[int]], prompt: Optional[str]) -> str:
        tokens = sum(len(x) for x in ids)
        if tokens <= self.settings.query_tokens:
            return "query"
        if prompt == "query" and tokens <= self.query_request_tokens:
            return "query"
        return "bulk"

    async def embed(self, ids: List[List[int]], lane: str, deadline: float, disconnected) -> Job:
        """Queues the inputs and waits for their vectors. Raises Overloaded, Dropped or the model's error."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(error):
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(None)

        job = Job(ids, lane, deadline, lambda error: loop.call_soon_threadsafe(settle, error))
        self.batcher.submit(job)
        try:
            while not fut.done():
                await asyncio.wait({fut}, timeout=0.1)
                if fut.done():
                    break
                if time.monotonic() > deadline:
                    job.cancelled = "deadline"
                    raise Dropped("deadline")
                if disconnected is not None and await disconnected():
                    job.cancelled = "disconnected"
                    raise Dropped("disconnected")
        except asyncio.CancelledError:
            job.cancelled = "disconnected"
            raise
        fut.result()
        return job
