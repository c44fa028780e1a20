"""Short batches on CUDA through captured CUDA graphs: the query's path.

A 32-token query on an H200 costs about 1.3 ms of GPU work and 14 ms of wall time: the forward pass
launches about 400 kernels, and the CPU time to launch them is the latency (benchmarks/RESULTS.md).
A CUDA graph launches them all at once. It needs fixed shapes and no host sync, which the model's
`embed_static` gives (every position kept, padded attention, every expert on every row); this
module captures it once per batch shape, rounded up to a bucket, and replays it.

Buckets: rows up to a power of two, length up to a power of two from 16, rows x length at most
`max_tokens` (every expert runs on every row, so longer batches take the sparse eager path). The
first batch of each bucket pays the capture (two warm-up runs and the capture, tens of ms); all
graphs share one memory pool. Off CUDA the same buckets run eagerly, which is how the CPU tests
check the padding and slicing that the graphs use.

Each new graph's first replay is checked against the model's ordinary forward pass on the same
batch. A capture that fails, or a replay that disagrees, turns the graphs off for the process with
one warning, and `embed` returns None from then on: the caller runs its eager path, slower, never wrong.
"""

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .batching import pad_batch

MIN_LEN = 16
AGREE = {torch.float32: 0.99999, torch.float16: 0.995, torch.bfloat16: 0.995}  # min cosine of a first replay to forward


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (n - 1)).bit_length())


@dataclass
class _Graph:
    ids: torch.Tensor  # [B, S] static input buffers: each replay reads them
    mask: torch.Tensor
    pooled: torch.Tensor  # [B, H] float32 static output buffers: each replay writes them
    counts: torch.Tensor  # [moe layers, E]
    graph: Optional["torch.cuda.CUDAGraph"]  # None off CUDA: the bucket runs eagerly


class GraphedEmbedder:
    """model.embed_static behind CUDA graphs, one per (rows, length) bucket."""

    def __init__(self, model, pad_id: int, max_tokens: int = 4096, max_rows: int = 64):
        self.model = model
        self.pad_id = pad_id
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda"
        self.pool = None  # one memory pool for all the graphs, made at the first capture
        self.graphs: Dict[Tuple[int, int], _Graph] = {}
        self.broken: Optional[str] = None  # why the graphs were turned off, once they were

    @staticmethod
    def available(model) -> bool:
        """Whether the model's code has embed_static (older model files do not) and runs in float."""
        experts = [layer.mlp.experts for layer in model.encoder.layers if layer.is_moe]
        return hasattr(model, "embed_static") and all(e.int8 is None for e in experts)

    @classmethod
    def for_model(cls, model) -> Optional["GraphedEmbedder"]:
        """The graphs for a model on CUDA, or None (off CUDA, older model files, int8): what Encoder,
        the server and bench use."""
        if next(model.parameters()).device.type != "cuda" or not cls.available(model):
            return None
        pad = model.config.pad_token_id
        return cls(model, pad if pad is not None else 1)

    def bucket(self, rows: int, length: int) -> Optional[Tuple[int, int]]:
        """(B, S) for a batch of ``rows`` texts of at most ``length`` tokens, or None where it takes the eager path."""
        B, S = _pow2(rows), _pow2(length, MIN_LEN)
        if self.broken or rows < 1 or B > self.max_rows or B * S > self.max_tokens or S > self.model.config.max_position_embeddings:
            return None
        return B, S

    def embed(self, inputs: List[List[int]]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """Token-id lists -> ([n, H] float32 means over real tokens, [moe layers, E] expert counts),
        or None where the batch fits no bucket or the graphs are off: then the caller runs eagerly."""
        key = self.bucket(len(inputs), max(len(t) for t in inputs)) if inputs else None
        if key is None:
            return None
        ids, mask = pad_batch(inputs, list(range(len(inputs))), self.pad_id, shape=key)
        new = key not in self.graphs
        try:
            g = self.graphs.get(key) or self._build(key)
            with torch.inference_mode():
                g.ids.copy_(torch.from_numpy(ids))
                g.mask.copy_(torch.from_numpy(mask))
                if g.graph is not None:
                    g.graph.replay()
                    pooled, counts = g.pooled, g.counts
                else:
                    pooled, counts = self.model.embed_static(g.ids, g.mask)
                pooled, counts = pooled[:len(inputs)].cpu().numpy(), counts.cpu().numpy()
            if new:  # off CUDA too, where the tests exercise it
                self._check(ids[:len(inputs)], mask[:len(inputs)], pooled)
        except torch.cuda.OutOfMemoryError:
            raise  # not a property of the graphs: the eager path needs the memory too
        except Exception as e:  # noqa: BLE001 - a capture the driver refused, or a replay that disagrees
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.graphs.clear()
            warnings.warn(f"CUDA graphs turned off ({self.broken}); short batches run eagerly", RuntimeWarning, stacklevel=2)
            return None
        return pooled, counts

    def _check(self, ids: np.ndarray, mask: np.ndarray, pooled: np.ndarray) -> None:
        """The first replay of a new graph against the model's own forward pass on the same texts."""
        L = int(mask.sum(1).max())
        with torch.inference_mode():
            t, m = (torch.from_numpy(a[:, :L]).to(self.device) for a in (ids, mask))
            want = self.model(input_ids=t, attention_mask=m, return_sentence_embedding=True).sentence_embedding.float().cpu()
        got = torch.from_numpy(pooled)  # the mean, not normalised: the cosine does not mind
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()
        need = AGREE.get(next(self.model.parameters()).dtype, 0.995)
        if not cos >= need:  # NaN fails too
            raise RuntimeError(f"a replayed graph of {ids.shape[0]} x {ids.shape[1]} tokens disagrees with forward "
                               f"(min cosine {cos:.5f} < {need})")

    def _build(self, key: Tuple[int, int]) -> _Graph:
        B, S = key
        with torch.inference_mode():
            ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.ones((B, S), dtype=torch.long, device=self.device)
            if not self.capture:
                g = _Graph(ids, mask, None, None, None)
            else:
                with torch.cuda.device(self.device):  # the model's card, not whichever is current (cuda:1 ...)
                    # warm-up on a side stream first, as torch.cuda.graphs asks: kernel choice and lazy init stay out of the graph
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        for _ in range(2):
                            self.model.embed_static(ids, mask)
                    torch.cuda.current_stream().wait_stream(side)
                    graph = torch.cuda.CUDAGraph()
                    if self.pool is None:
                        self.pool = torch.cuda.graph_pool_handle()
                    # thread_local: a server's other threads may touch CUDA while its model thread captures
                    with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                        pooled, counts = self.model.embed_static(ids, mask)
                g = _Graph(ids, mask, pooled, counts, graph)
        self.graphs[key] = g
        return g
