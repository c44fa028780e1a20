"""The queue and the batcher: requests from every client packed into forward passes by real tokens.

Two lanes. A short interactive request (a query) goes in the `query` lane, everything else in
`bulk`. A request larger than the budget is served in chunks of whole inputs, one chunk per batch,
so no request holds the model for longer than one batch. Bulk work is never starved: after
`starve_after` batches without any bulk token, the next batch starts with bulk work.

Two ways to keep queries ahead of ingestion, by what the model worker can do:
  mixed   (a backend that runs a batch whole, e.g. an ONNX graph) at every batch boundary the
          batcher takes queries first and tops the batch up with a little bulk work, so a query
          waits at most for the one batch already running;
  preempt (a backend that runs a batch in steps: half a layer each) each batch holds one lane only.
          Between two steps of a bulk batch the worker asks `take_queries` and runs the queries'
          batches whole, so a query waits for one step of bulk work, not one batch. Bulk batches
          can then be long, where a CPU runs them fastest. Once queries may run, every query waiting
          at that moment runs (a turn: `more_queries` gives its next batches), so that none waits a
          second turn behind bulk work. When queries come back to back, `bulk_share` of the model's
          time stays with bulk work: a turn runs only after bulk has run for
          bulk_share / (1 - bulk_share) times the last turn's time. A query batch holds at
          most `query_batch_tokens` (where given): the most a backend runs in its fastest path for
          short batches (a CPU kernel's one call for every layer), where a longer batch runs slower
          per token.

Work whose client went away, or whose deadline passed, is dropped here, before it costs model time.

Pure Python and thread-safe: the event loop submits, the model thread takes batches. It knows
nothing of HTTP or of the model; a Job tells its owner the outcome through `notify`.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

LANES = ("query", "bulk")


class Overloaded(Exception):
    def __init__(self, retry_after: float, queued_tokens: int, limit: int):
        super().__init__(f"the queue holds {queued_tokens} tokens of a {limit}-token budget")
        self.retry_after = retry_after


class Dropped(Exception):
    """A job taken out of the queue before it ran: its deadline passed, or its client left."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why  # "deadline" | "disconnected" | "shutdown"


@dataclass(eq=False)
class Job:
    ids: List[List[int]]  # token ids of each input, prompt and special tokens included
    lane: str
    deadline: float  # time.monotonic() after which the job is not worth running
    notify: Callable[[Optional[BaseException]], None]  # called once from the model thread: None = done
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = 0  # order of admission (set by Batcher.submit)
    cancelled: Optional[str] = None  # set by the owner: "disconnected" or "deadline" (it has answered already)
    next: int = 0  # first input not yet scheduled
    finished: int = 0  # inputs whose vectors are in `vectors`
    vectors: Optional[np.ndarray] = None  # [n, H] float32, filled as batches complete
    first_batch: Optional[float] = None  # when the first chunk started running
    infer_seconds: float = 0.0  # model time of the batches this job was part of

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.ids)

    def remaining_tokens(self) -> int:
        return sum(len(x) for x in self.ids[self.next:])


@dataclass
class Batch:
    parts: List[Tuple[Job, int, int]]  # (job, first input, end) of each job's chunk in this batch

    def inputs(self) -> List[List[int]]:
        return [ids for job, lo, hi in self.parts for ids in job.ids[lo:hi]]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.inputs())

    @property
    def requests(self) -> int:
        return len(self.parts)

    @property
    def lane(self) -> str:
        """"query" or "bulk"; "mixed" for a mixed-mode batch that holds both."""
        lanes = {job.lane for job, _, _ in self.parts}
        return lanes.pop() if len(lanes) == 1 else "mixed"


class Batcher:
    def __init__(self, max_batch_tokens: int, max_queue_tokens: int, starve_after: int = 4, mixed_fraction: float = 0.25,
                 preempt: bool = False, bulk_share: float = 0.75, query_batch_tokens: Optional[int] = None,
                 clock=time.monotonic):
        if not 0 <= bulk_share < 1:
            raise ValueError(f"bulk_share must be in [0, 1), got {bulk_share}")
        self.max_batch_tokens = max_batch_tokens
        self.query_batch_tokens = query_batch_tokens if preempt else None  # preempt mode: query batches up to this
        self.mixed_fraction = mixed_fraction  # mixed mode: share of the budget a batch with queries in it may fill in all
        self.preempt = preempt
        self.bulk_share = bulk_share
        self.last_query_seconds = 0.0  # model time of the last turn of query batches: what bulk must run before the next
        self._turn_end: Optional[int] = None  # while a turn runs: the admission number it stops at (the queries queued before it began)
        self._admitted = 0  # jobs admitted so far: the next one's seq
        self.max_queue_tokens = max_queue_tokens
        self.starve_after = starve_after
        self.clock = clock
        self.lanes: Dict[str, Deque[Job]] = {lane: deque() for lane in LANES}
        self.queued_tokens = {lane: 0 for lane in LANES}  # tokens not yet scheduled, per lane
        self.tokens_per_second = None  # set by the worker as it measures: sizes Retry-After
        self.dropped = {"deadline": 0, "disconnected": 0, "shutdown": 0}
        self._batches_without_bulk = 0
        self._closed = False
        self._cv = threading.Condition()

    # ---- the event loop's side ----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job, or raise Overloaded when the queue's token budget cannot take it."""
        n = job.tokens
        with self._cv:
            if self._closed:
                raise Dropped("shutdown")
            # each lane has the budget: bulk ingestion filling the queue never refuses a query.
            # An empty lane takes any request: a lone large one is chunked, never refused.
            queued = self.queued_tokens[job.lane]
            if queued and queued + n > self.max_queue_tokens:
                rate = self.tokens_per_second or 1000.0
                raise Overloaded(max(1.0, queued / rate), queued, self.max_queue_tokens)
            job.seq, self._admitted = self._admitted, self._admitted + 1
            self.lanes[job.lane].append(job)
            self.queued_tokens[job.lane] += n
            self._cv.notify()

    def depth(self) -> Dict[str, Tuple[int, int]]:
        """(requests, tokens) waiting in each lane."""
        with self._cv:
            return {lane: (len(q), self.queued_tokens[lane]) for lane, q in self.lanes.items()}

    def close(self) -> None:
        """Refuse new work and wake the model thread, which stops once the queue is empty."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # ---- the model thread's side --------------------------------------------------------------

    def next_batch(self, timeout: Optional[float] = None) -> Optional[Batch]:
        """Blocks until there is work (None on timeout, or when closed and empty)."""
        deadline = None if timeout is None else self.clock() + timeout
        with self._cv:
            while True:
                self._drop_stale()
                if any(self.lanes.values()):
                    batch = self._fill()
                    took_bulk = any(job.lane == "bulk" for job, _, _ in batch.parts)
                    self._batches_without_bulk = 0 if (took_bulk or not self.lanes["bulk"]) else self._batches_without_bulk + 1
                    return batch
                if self._closed:
                    return None
                wait = None if deadline is None else deadline - self.clock()
                if wait is not None and wait <= 0:
                    return None
                self._cv.wait(wait)

    def take_queries(self, bulk_seconds: float) -> Optional[Batch]:
        """Preempt mode, between two steps of a bulk batch that has run `bulk_seconds` since the last
        query batch: the first batch of a turn of the queued queries to run now, or None (none waiting, or
        bulk's share not yet run). The worker then runs `more_queries` until it gives None."""
        with self._cv:
            self._drop_stale()
            if not self.lanes["query"]:
                return None
            if bulk_seconds < self.bulk_share / (1 - self.bulk_share) * self.last_query_seconds:
                return None
            self._turn_end, self.last_query_seconds = self._admitted, 0.0
            return self._turn_batch()

    def more_queries(self) -> Optional[Batch]:
        """The next batch of the running turn: queries that were queued when it began, or None (the turn is over).
        Queries that came later wait for bulk's share: a turn is bounded by what was waiting."""
        with self._cv:
            self._drop_stale()
            return self._turn_batch()

    def _turn_batch(self) -> Optional[Batch]:
        if self._turn_end is None:
            return None
        q = self.lanes["query"]
        if not q or q[0].seq >= self._turn_end:
            self._turn_end = None
            return None
        return self._fill(("query",), before=self._turn_end)  # a bulk batch is running: not counted as one that left bulk waiting

    def complete(self, batch: Batch, vectors: np.ndarray, seconds: float) -> None:
        """Hands each job its rows of the batch's output; jobs with every input done are notified."""
        if batch.lane == "query":  # a turn's batches add up: bulk's share is weighed against the whole turn
            self.last_query_seconds = (self.last_query_seconds if self._turn_end is not None else 0.0) + seconds
        row = 0
        for job, lo, hi in batch.parts:
            if job.finished < 0:  # dropped or failed while this chunk ran: its owner has its answer
                row += hi - lo
                continue
            if job.vectors is None:
                job.vectors = np.empty((len(job.ids), vectors.shape[1]), dtype=np.float32)
            job.vectors[lo:hi] = vectors[row : row + hi - lo]
            row += hi - lo
            job.finished += hi - lo
            job.infer_seconds += seconds
            if job.finished == len(job.ids):
                job.notify(None)

    def fail(self, batch: Batch, error: BaseException) -> None:
        """The model raised on this batch: its jobs fail (once each), the queue goes on."""
        with self._cv:
            for job, _, _ in batch.parts:
                if job.finished >= 0:
                    job.finished = -1  # never notified twice, even if later chunks were queued
                    self._remove(job)
                    job.notify(error)

    # ---- inside the lock ------------------------------------------------------------------------

    def _remove(self, job: Job) -> None:
        q = self.lanes[job.lane]
        if job in q:
            q.remove(job)
            self.queued_tokens[job.lane] -= job.remaining_tokens()

    def _drop_stale(self) -> None:
        now = self.clock()
        for lane, q in self.lanes.items():
            for job in [j for j in q if j.cancelled or now > j.deadline]:
                why = job.cancelled or "deadline"
                self._remove(job)
                job.finished = -1
                self.dropped[why] += 1
                job.notify(Dropped(why))

    def _fill(self, lanes: Tuple[str, ...] = LANES, before: Optional[int] = None) -> Batch:
        """The next batch from `lanes` (in order, each lane first come, first served); `before`: only
        jobs admitted before that number (Job.seq)."""
        budget = self.max_batch_tokens
        parts: List[Tuple[Job, int, int]] = []
        order = list(lanes)
        if self.lanes["bulk"] and self._batches_without_bulk >= self.starve_after:
            order.reverse()  # bulk has waited long enough: it goes first this once
        if self.preempt:  # one lane per batch: the first in order that has work
            order = [next(lane for lane in order if self.lanes[lane])]
            if order[0] == "query" and self.query_batch_tokens:
                budget = min(budget, self.query_batch_tokens)
        took_query = False
        for lane in order:
            q = self.lanes[lane]
            if lane == "bulk" and took_query:
                # a batch that carries queries takes only a little bulk work: the queries' own batch stays short
                budget = min(budget, max(0, int(self.max_batch_tokens * self.mixed_fraction) - (self.max_batch_tokens - budget)))
            while q and budget > 0:
                job = q[0]
                if before is not None and job.seq >= before:
                    break
                lo = hi = job.next
                while hi < len(job.ids) and (len(job.ids[hi]) <= budget or (hi == lo and not parts)):
                    budget -= len(job.ids[hi])
                    hi += 1
                if hi == lo:
                    break  # the next input does not fit: it starts the next batch
                job.next = hi
                self.queued_tokens[lane] -= sum(len(x) for x in job.ids[lo:hi])
                if job.first_batch is None:
                    job.first_batch = self.clock()
                parts.append((job, lo, hi))
                took_query |= lane == "query"
                if job.next == len(job.ids):
                    q.popleft()
                else:
                    break  # chunked: the rest waits for the next batch
        return Batch(parts)
