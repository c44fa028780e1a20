"""Prometheus metrics of one server (own registry, so several servers in one process stay apart)."""

import gc

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
TOKENS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, engine=None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nomic_moe_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.queue_seconds = Histogram("nomic_moe_queue_seconds", "time from admission to the first batch", ["lane"],
                                       buckets=SECONDS, registry=r)
        self.inference_seconds = Histogram("nomic_moe_inference_seconds", "model time of the batches a request was in", ["lane"],
                                           buckets=SECONDS, registry=r)
        self.request_seconds = Histogram("nomic_moe_request_seconds", "total time of a request, tokenising included", ["route"],
                                         buckets=SECONDS, registry=r)
        self.tokenize_seconds = Histogram("nomic_moe_tokenize_seconds", "time spent tokenising a request", buckets=SECONDS, registry=r)
        self.batch_tokens = Histogram("nomic_moe_batch_tokens", "real tokens per forward pass", buckets=TOKENS, registry=r)
        self.batch_requests = Histogram("nomic_moe_batch_requests", "requests packed into one forward pass", buckets=COUNTS, registry=r)
        self.batch_inputs = Histogram("nomic_moe_batch_inputs", "inputs packed into one forward pass", buckets=COUNTS, registry=r)
        self.tokens = Counter("nomic_moe_tokens", "real tokens embedded (rate() gives tokens per second)", registry=r)
        self.tokens_per_second = Gauge("nomic_moe_tokens_per_second", "real tokens per second of the last forward pass", registry=r)
        self.preemptions = Counter("nomic_moe_preemptions", "times queries ran between two steps of a bulk batch (each time, every query then waiting)", registry=r)
        self.dropped = Counter("nomic_moe_dropped", "queued requests dropped before running", ["reason"], registry=r)
        self.rejected = Counter("nomic_moe_rejected", "requests refused at admission", ["reason"], registry=r)
        if engine is not None:
            r.register(_EngineCollector(engine))

    def observe_batch(self, tokens: int, requests: int, inputs: int, seconds: float) -> None:
        self.batch_tokens.observe(tokens)
        self.batch_requests.observe(requests)
        self.batch_inputs.observe(inputs)
        self.tokens.inc(tokens)
        self.tokens_per_second.set(tokens / max(seconds, 1e-9))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Read at scrape time: queue depth per lane, the objects frozen out of the garbage collector's
    full passes, and each expert's share of its layer's tokens."""

    def __init__(self, engine):
        self.engine = engine

    def describe(self):
        return []

    def collect(self):
        depth_r = GaugeMetricFamily("nomic_moe_queue_requests", "requests waiting, per lane", labels=["lane"])
        depth_t = GaugeMetricFamily("nomic_moe_queue_tokens", "tokens waiting, per lane", labels=["lane"])
        for lane, (n, tokens) in self.engine.queue_depth().items():
            depth_r.add_metric([lane], n)
            depth_t.add_metric([lane], tokens)
        yield depth_r
        yield depth_t
        yield GaugeMetricFamily("nomic_moe_gc_frozen_objects",
                                "objects set aside from Python's garbage collector after warm-up (gc.freeze)", gc.get_freeze_count())
        share = GaugeMetricFamily("nomic_moe_expert_token_share",
                                  "share of a MoE layer's routed (token, slot) pairs that each expert received, since start",
                                  labels=["layer", "expert"])
        pairs = GaugeMetricFamily("nomic_moe_expert_tokens", "routed (token, slot) pairs per expert, since start",
                                  labels=["layer", "expert"])
        for layer, counts in self.engine.expert_counts():
            total = max(int(sum(counts)), 1)
            for e, c in enumerate(counts):
                share.add_metric([str(layer), str(e)], int(c) / total)
                pairs.add_metric([str(layer), str(e)], int(c))
        yield share
        yield pairs
