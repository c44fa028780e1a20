"""The batcher alone (no model, no HTTP): lanes, token budget, chunking, dropping, admission."""

import numpy as np
import pytest

from nomic_moe_serving.batcher import Batcher, Dropped, Job, Overloaded
from nomic_moe_serving.prompts import Prompts


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def job(lengths, lane="bulk", deadline=1e9, log=None, name=None):
    j = Job([[7] * n for n in lengths], lane, deadline, lambda err: (log.append((name, err)) if log is not None else None))
    return j


def run(batcher, batch):
    vectors = np.arange(len(batch.inputs()) * 2, dtype=np.float32).reshape(-1, 2)
    batcher.complete(batch, vectors, 0.01)


def test_queries_go_first_and_bulk_fills_the_rest():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, clock=Clock())
    log = []
    b.submit(job([10, 10, 40, 40], "bulk", log=log, name="docs"))
    b.submit(job([10], "query", log=log, name="q"))
    batch = b.next_batch(0)
    # queries first; bulk tops the batch up to a quarter of the budget only
    assert [(p[0].lane, p[1], p[2]) for p in batch.parts] == [("query", 0, 1), ("bulk", 0, 1)]
    assert batch.tokens == 20
    run(b, batch)
    assert log == [("q", None)]  # the query is done after one batch, the documents are not
    batch = b.next_batch(0)
    assert batch.tokens == 90  # no query waiting: the whole budget
    run(b, batch)
    assert log[-1] == ("docs", None)


def test_a_request_larger_than_the_budget_is_chunked_and_reassembled_in_order():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, clock=Clock())
    big = job([60] * 5)
    b.submit(big)
    sizes = []
    while any(b.lanes.values()):
        batch = b.next_batch(0)
        sizes.append(batch.tokens)
        run(b, batch)
    assert sizes == [60] * 5 and big.finished == 5
    np.testing.assert_array_equal(big.vectors[:, 0], [0, 0, 0, 0, 0])  # each chunk's first row in its place


def test_a_query_waits_at_most_one_batch_behind_bulk():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, clock=Clock())
    b.submit(job([50] * 20))
    run(b, b.next_batch(0))  # bulk batch 1 runs; a query arrives meanwhile
    log = []
    b.submit(job([12], "query", log=log, name="q"))
    batch = b.next_batch(0)
    assert batch.parts[0][0].lane == "query"
    run(b, batch)
    assert log == [("q", None)]


def test_bulk_is_not_starved_by_a_stream_of_queries():
    b = Batcher(max_batch_tokens=20, max_queue_tokens=10_000, starve_after=2, clock=Clock())
    b.submit(job([15]))
    took_bulk = []
    for _ in range(4):
        b.submit(job([20], "query"))
        batch = b.next_batch(0)
        took_bulk.append(any(p[0].lane == "bulk" for p in batch.parts))
        run(b, batch)
    assert took_bulk[:2] == [False, False] and True in took_bulk[2:]


def test_stale_work_is_dropped_before_it_runs():
    clock = Clock()
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, clock=clock)
    log = []
    b.submit(job([10], deadline=5, log=log, name="late"))
    gone = job([10], log=log, name="gone")
    b.submit(gone)
    keep = job([10], log=log, name="keep")
    b.submit(keep)
    gone.cancelled = "disconnected"
    clock.t = 6
    batch = b.next_batch(0)
    assert [p[0] for p in batch.parts] == [keep]
    assert {name: type(err) for name, err in log} == {"late": Dropped, "gone": Dropped}
    assert b.dropped == {"deadline": 1, "disconnected": 1, "shutdown": 0}
    assert sum(b.queued_tokens.values()) == 0


def test_admission_refuses_past_the_queue_budget_but_never_an_empty_queue():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=150, clock=Clock())
    b.submit(job([100, 100, 100]))  # larger than the queue budget, but the queue is empty: accepted, chunked
    with pytest.raises(Overloaded) as e:
        b.submit(job([10]))
    assert e.value.retry_after >= 1
    b.submit(job([10], "query"))  # the query lane has a budget of its own
    b.close()
    with pytest.raises(Dropped):
        b.submit(job([10]))


def test_prompts_never_add_a_second_prefix():
    p = Prompts({"query": "search_query: ", "document": "search_document: ", "passage": "search_document: "}, "document")
    c = p.apply(["search_query: hi", "plain"], None)
    assert c.texts == ["search_query: hi", "search_document: plain"] and c.already_prefixed == 1 and c.name == "document"
    assert p.apply(["search_document: x"], "query").texts == ["search_document: x"]
    assert p.resolve("search_query") == "query" and p.resolve("Query") == "query"
    with pytest.raises(KeyError):
        p.resolve("nope")


def test_preempt_mode_keeps_one_lane_per_batch_and_queries_first():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, clock=Clock())
    b.submit(job([10, 10, 40, 40], "bulk"))
    b.submit(job([10], "query"))
    first = b.next_batch(0)
    assert first.lane == "query" and first.tokens == 10  # no bulk top-up: a query batch stays short
    run(b, first)
    second = b.next_batch(0)
    assert second.lane == "bulk" and second.tokens == 100  # the whole budget, queries or not
    assert Batcher(max_batch_tokens=100, max_queue_tokens=10_000, clock=Clock()).preempt is False


def test_query_batches_hold_at_most_the_short_batch_budget():
    """Preempt mode with query_batch_tokens (the backend's one-call size): queries go in batches of at
    most that many tokens (a longer single input still goes, alone), bulk batches keep the whole budget."""
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, query_batch_tokens=25, clock=Clock())
    b.submit(job([10, 10, 10, 40, 5], "query"))
    b.submit(job([50, 50], "bulk"))
    sizes = []
    for _ in range(3):
        batch = b.next_batch(0)
        assert batch.lane == "query"
        sizes.append(batch.tokens)
        run(b, batch)
    assert sizes == [20, 10, 40]  # 10+10, then 10 (40 does not fit beside it), then 40 alone
    batch = b.next_batch(0)
    assert batch.lane == "query" and batch.tokens == 5
    run(b, batch)
    assert b.next_batch(0).tokens == 100
    # mixed mode (a backend that runs batches whole) keeps its own rule: the cap does not apply
    assert Batcher(max_batch_tokens=100, max_queue_tokens=10_000, query_batch_tokens=25, clock=Clock()).query_batch_tokens is None


def test_take_queries_between_layers_keeps_bulk_its_share():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, bulk_share=0.75, clock=Clock())
    b.submit(job([50, 50, 50], "bulk"))
    bulk = b.next_batch(0)
    assert bulk.lane == "bulk"
    assert b.take_queries(bulk_seconds=0.1) is None  # no query waiting
    log = []
    b.submit(job([12], "query", log=log, name="q1"))
    q1 = b.take_queries(bulk_seconds=0.1)  # no query batch ran yet: the query goes at once
    assert q1 is not None and q1.lane == "query"
    b.complete(q1, np.zeros((1, 2), np.float32), 1.0)  # that query batch took 1 s
    assert log == [("q1", None)]
    b.submit(job([12], "query", log=log, name="q2"))
    # bulk keeps 75% of the time: 3 s of bulk work (0.75 / 0.25 x 1 s) before the next query batch
    assert b.take_queries(bulk_seconds=2.9) is None
    q2 = b.take_queries(bulk_seconds=3.0)
    assert q2 is not None and q2.parts[0][0].ids == [[7] * 12]
    # a query batch inside a bulk batch does not count as a batch that left bulk waiting
    assert b._batches_without_bulk == 0
    greedy = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, bulk_share=0.0, clock=Clock())
    greedy.last_query_seconds = 5.0
    greedy.submit(job([12], "query"))
    assert greedy.take_queries(bulk_seconds=0.0) is not None  # share 0: queries always first
    with pytest.raises(ValueError, match="bulk_share"):
        Batcher(max_batch_tokens=100, max_queue_tokens=10_000, bulk_share=1.0)


def test_take_queries_drops_stale_queries_first():
    clock = Clock()
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, clock=clock)
    log = []
    b.submit(job([12], "query", deadline=1, log=log, name="late"))
    clock.t = 2
    assert b.take_queries(bulk_seconds=10) is None
    assert [(name, type(err)) for name, err in log] == [("late", Dropped)]


class SteppingBackend:
    """A fake model that runs a batch in `layers` steps and logs what it runs, in order."""

    can_step = True

    def __init__(self, layers=3, on_step=None):
        self.layers, self.on_step, self.events = layers, on_step, []

    def embed(self, inputs):
        self.events.append(("whole", len(inputs)))
        return np.zeros((len(inputs), 2), np.float32)

    def embed_steps(self, inputs):
        for layer in range(self.layers):
            self.events.append(("layer", layer, len(inputs)))
            if self.on_step:
                self.on_step(layer)
            yield
        return np.ones((len(inputs), 2), np.float32)


def test_the_worker_runs_a_query_between_two_layers_of_a_bulk_batch():
    from nomic_moe_serving.engine import Engine
    from nomic_moe_serving.metrics import Metrics

    b = Batcher(max_batch_tokens=1000, max_queue_tokens=10_000, preempt=True, bulk_share=0.0)
    log = []
    query = job([5], "query", log=log, name="q")
    backend = SteppingBackend(on_step=lambda layer: b.submit(query) if layer == 0 else None)
    engine = Engine.__new__(Engine)  # the worker alone: no model folder, no HTTP
    engine.backend, engine.batcher, engine.metrics, engine.preempt, engine.log = backend, b, Metrics(), True, lambda m: None
    b.tokens_per_second = 100.0  # set from the warm-up in a real server
    docs = job([50, 50], "bulk", log=log, name="docs")
    b.submit(docs)
    engine._run_bulk(b.next_batch(0))
    # the query arrived during layer 0 and ran, whole, before layer 1 of the documents' batch
    assert backend.events == [("layer", 0, 2), ("whole", 1), ("layer", 1, 2), ("layer", 2, 2)]
    assert log == [("q", None), ("docs", None)]
    assert query.vectors.shape == (1, 2) and docs.vectors[0, 0] == 1.0
    assert engine.metrics.preemptions._value.get() == 1


def test_a_turn_of_queries_runs_every_query_then_waiting_and_bulk_its_share_of_the_turn():
    b = Batcher(max_batch_tokens=100, max_queue_tokens=10_000, preempt=True, bulk_share=0.75, query_batch_tokens=20,
                clock=Clock())
    b.submit(job([50, 50, 50], "bulk"))
    assert b.next_batch(0).lane == "bulk"
    log = []
    for name in ("q1", "q2", "q3"):  # 36 tokens: two batches of at most 20
        b.submit(job([12], "query", log=log, name=name))
    first = b.take_queries(bulk_seconds=0.1)
    assert [p[0].seq for p in first.parts] == [1]  # 12 tokens; 24 would pass the cap
    b.complete(first, np.zeros((1, 2), np.float32), 1.0)
    b.submit(job([12], "query", log=log, name="late"))  # answered clients send again while the turn runs
    second = b.more_queries()
    assert [name for name, _ in log] == ["q1"] and second.tokens == 12
    b.complete(second, np.zeros((1, 2), np.float32), 1.0)
    third = b.more_queries()
    b.complete(third, np.zeros((1, 2), np.float32), 0.5)
    assert [name for name, _ in log] == ["q1", "q2", "q3"]
    assert b.more_queries() is None  # "late" came after the turn began: it waits for bulk's share
    assert b.depth()["query"] == (1, 12)
    # the turn took 2.5 s of model time: bulk runs 3 x 2.5 s before the next
    assert b.take_queries(bulk_seconds=7.4) is None
    late = b.take_queries(bulk_seconds=7.5)
    assert late is not None and late.tokens == 12
    b.complete(late, np.zeros((1, 2), np.float32), 0.2)
    assert b.more_queries() is None and b.last_query_seconds == 0.2  # a new turn: its own time only


def test_the_worker_runs_every_waiting_query_between_the_same_two_layers():
    from nomic_moe_serving.engine import Engine
    from nomic_moe_serving.metrics import Metrics

    b = Batcher(max_batch_tokens=1000, max_queue_tokens=10_000, preempt=True, bulk_share=0.0, query_batch_tokens=5)
    log = []
    queries = [job([5], "query", log=log, name=f"q{i}") for i in range(3)]  # one batch each (the cap is 5 tokens)
    backend = SteppingBackend(on_step=lambda layer: [b.submit(q) for q in queries] if layer == 0 else None)
    engine = Engine.__new__(Engine)
    engine.backend, engine.batcher, engine.metrics, engine.preempt, engine.log = backend, b, Metrics(), True, lambda m: None
    b.tokens_per_second = 100.0
    b.submit(job([50, 50], "bulk", log=log, name="docs"))
    engine._run_bulk(b.next_batch(0))
    assert backend.events == [("layer", 0, 2), ("whole", 1), ("whole", 1), ("whole", 1), ("layer", 1, 2), ("layer", 2, 2)]
    assert [name for name, _ in log] == ["q0", "q1", "q2", "docs"]
    assert engine.metrics.preemptions._value.get() == 1  # one turn
