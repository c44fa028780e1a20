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
