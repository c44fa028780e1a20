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
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

MIN_LEN = 16


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
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.graphs: Dict[Tuple[int, int], _Graph] = {}

    @staticmethod
    def available(model) -> bool:
        """Whether the model's code has embed_static (older model files do not) and runs in float."""
        experts = [layer.mlp.experts for layer in model.encoder.layers if layer.is_moe]
        return hasattr(model, "embed_static") and all(e.int8 is None for e in experts)

    def bucket(self, rows: int, length: int) -> Optional[Tuple[int, int]]:
        """(B, S) for a batch of ``rows`` texts of at most ``length`` tokens, or None where it takes the eager path."""
        B, S = _pow2(rows), _pow2(length, MIN_LEN)
        if rows < 1 or B > self.max_rows or B * S > self.max_tokens or S > self.model.config.max_position_embeddings:
            return None
        return B, S

    def fits(self, inputs: List[List[int]]) -> bool:
        return bool(inputs) and self.bucket(len(inputs), max(len(t) for t in inputs)) is not None

    def embed(self, inputs: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """Token-id lists -> ([n, H] float32 means over real tokens, [moe layers, E] expert counts)."""
        key = self.bucket(len(inputs), max(len(t) for t in inputs))
        if key is None:
            raise ValueError(f"{len(inputs)} texts of up to {max(len(t) for t in inputs)} tokens exceed the graphs' buckets")
        B, S = key
        ids = np.full((B, S), self.pad_id, dtype=np.int64)
        mask = np.zeros((B, S), dtype=np.int64)
        for i, t in enumerate(inputs):
            ids[i, :len(t)] = t
            mask[i, :len(t)] = 1
        g = self.graphs.get(key) or self._build(key)
        with torch.inference_mode():
            g.ids.copy_(torch.from_numpy(ids))
            g.mask.copy_(torch.from_numpy(mask))
            if g.graph is not None:
                g.graph.replay()
                pooled, counts = g.pooled, g.counts
            else:
                pooled, counts = self.model.embed_static(g.ids, g.mask)
            return pooled[:len(inputs)].cpu().numpy(), counts.cpu().numpy()

    def _build(self, key: Tuple[int, int]) -> _Graph:
        B, S = key
        with torch.inference_mode():
            ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.ones((B, S), dtype=torch.long, device=self.device)
            if not self.capture:
                g = _Graph(ids, mask, None, None, None)
            else:
                # warm-up on a side stream first, as torch.cuda.graphs asks: kernel choice and lazy init stay out of the graph
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self.model.embed_static(ids, mask)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: a server's other threads may touch CUDA while its model thread captures
                with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                    pooled, counts = self.model.embed_static(ids, mask)
                g = _Graph(ids, mask, pooled, counts, graph)
        self.graphs[key] = g
        return g
