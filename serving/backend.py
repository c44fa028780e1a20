"""The model behind the server: token ids in, mean-pooled vectors out. One instance, one thread.

A backend takes a batch of inputs as token-id lists (prompt and special tokens already there) and
returns the mean over each input's real tokens [n, H] float32, not yet normalised: the route
decides Matryoshka truncation and normalisation (TEI's `normalize: false` wants the raw mean).
Padding costs nothing in the PyTorch model (it packs real tokens), so batch partners of any
length change no vector.

PyTorch backends also count, per MoE layer, how many (token, slot) pairs each expert received:
the server publishes the share as a metric.
"""

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_inference.batching import pad_batch



def halves(layer):
    """An encoder layer's steps, [N, H] -> [N, H] each: its attention and MLP blocks, or the whole layer
    where the folder's model code is older than them. Half a layer is the most a query waits for behind
    a bulk batch: the longest, a MoE block, is four fifths of its layer's FLOPs at the real size."""
    if hasattr(layer, "mlp_block"):
        return layer.attention_block, lambda x, packing: layer.mlp_block(x, packing)[0]
    return (lambda x, packing: layer(x, packing)[0],)


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[B, S, H], [B, S] -> [B, H]: mean over real tokens (denominator clamped, as the model's pooling)."""
    m = mask[..., None].astype(np.float32)
    return (hidden.astype(np.float32) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


class TorchBackend:
    kind = "pytorch"

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32", threads: Optional[int] = None,
                 graphs: bool = True):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.dtype_name = dtype
        checks.model_folder(model_dir)
        from nomic_moe_inference.loading import load_model

        model, self.cpu_kernel = load_model(model_dir, device, dtype)
        self.model = model
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 1
        self.vocab_size = model.config.vocab_size
        self.hidden_size = model.config.hidden_size
        self.moe_layers = [i for i, layer in enumerate(model.encoder.layers) if layer.is_moe]
        self.expert_pairs = np.zeros((len(self.moe_layers), model.config.num_experts), dtype=np.int64)
        self._pending = []  # routing counts of the running forward pass (device tensors)
        from nomic_moe_inference.cuda_graphs import GraphedEmbedder

        self.graphs = GraphedEmbedder.for_model(model) if graphs else None  # short batches on CUDA (launch-bound otherwise)
        for layer in model.encoder.layers:
            if layer.is_moe:
                layer.mlp.register_forward_hook(self._record_routing)

    def _record_routing(self, module, inputs, output):
        routing = output[1]
        if getattr(routing, "counts", None) is not None:
            self._pending.append(routing.counts)

    @property
    def can_step(self) -> bool:
        """Whether the folder's model code exposes embed_packed (model files older than it run whole)."""
        return hasattr(self.model, "embed_packed")

    def embed(self, inputs: List[List[int]]) -> np.ndarray:
        out = self._embed_graphed(inputs)
        return out if out is not None else self.embed_eager(inputs)

    def embed_eager(self, inputs: List[List[int]]) -> np.ndarray:
        """The packed forward pass, whatever the batch (warm-up runs it once beside the graphs)."""
        if not self.can_step:
            return self._embed_whole(inputs)
        steps = self.embed_steps(inputs, graphs=False)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def _embed_whole(self, inputs: List[List[int]]) -> np.ndarray:
        torch = self.torch
        ids, mask = pad_batch(inputs, list(range(len(inputs))), self.pad_id)
        self._pending = pending = []
        with torch.inference_mode():
            t, m = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            return self._pool(self.model(input_ids=t, attention_mask=m).last_hidden_state, m, pending)

    def _embed_graphed(self, inputs: List[List[int]]) -> Optional[np.ndarray]:
        """Through the CUDA graphs, or None where the batch fits none (or they were turned off)."""
        if self.graphs is None:
            return None
        running, self._pending = self._pending, []  # a new graph's check runs forward: not the preempted batch's counts
        try:
            out = self.graphs.embed(inputs)
        finally:
            self._pending = running
        if out is None:
            return None
        pooled, counts = out
        if counts.shape[0] == len(self.moe_layers):
            self.expert_pairs += counts
        return pooled

    def _pool(self, hidden, m, pending) -> np.ndarray:
        """[B, S, H] (zero at padding) -> [B, H] float32 mean over real tokens; the batch's routing counts land."""
        torch = self.torch
        mf = m.to(hidden.dtype).unsqueeze(-1)
        pooled = ((hidden * mf).sum(1).float() / mf.sum(1).float().clamp(min=1e-9)).cpu().numpy()
        if len(pending) == len(self.moe_layers):
            self.expert_pairs += torch.stack(pending).cpu().numpy()
        return pooled

    def embed_steps(self, inputs: List[List[int]], graphs: bool = True):
        """The model's forward pass half a layer at a time (attention, then the MLP or MoE block): a
        generator that yields after each half and returns the pooled [n, H] float32. Between two yields
        the caller may run other batches (the query lane preempting bulk work); the model's own
        embed_packed and layer halves, as its forward, so the same vectors."""
        torch, model = self.torch, self.model
        out = self._embed_graphed(inputs) if graphs else None
        if out is not None:
            return out  # a few milliseconds: nothing to preempt
        ids, mask = pad_batch(inputs, list(range(len(inputs))), self.pad_id)
        pending = []  # this batch's routing counts: a preempting batch in between keeps its own
        self._pending = pending
        with torch.inference_mode():
            t, m = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)
            packing, x = model.embed_packed(t, model._check_inputs(t, m, None))  # [N, H]
            done = self._run_layers(x, packing)
        if done is not None:  # a short batch: every layer in one kernel call, a few milliseconds each
            x, counts = done
            with torch.inference_mode():
                return self._pool(packing.unpack(x), m, list(counts))
        for layer in model.encoder.layers:
            for half in halves(layer):
                with torch.inference_mode():
                    self._pending = pending
                    x = half(x, packing)
                yield
        with torch.inference_mode():
            return self._pool(packing.unpack(x), m, pending)

    @property
    def short_batch_tokens(self) -> Optional[int]:
        """The most tokens a batch may hold to take the CPU kernel's one call for every layer (its
        fastest path per token for short batches), or None where this model has no such call."""
        kernel = getattr(self.model, "cpu_kernel", None)
        if kernel is None or getattr(kernel, "layers", None) is None or not hasattr(kernel, "max_rows"):
            return None
        return kernel.max_rows(self.model.embeddings.word_embeddings.weight.dtype) or None

    def _run_layers(self, x, packing):
        """The CPU kernel's one call for every layer (nomic_moe_kernels.encoder_layers), where it takes
        this batch: (x, the routing counts of each MoE layer), else None. Our routing hooks need not
        see it: the call returns the counts they would have taken."""
        run = getattr(getattr(self.model, "cpu_kernel", None), "run_layers", None)
        return run(self.model, x, packing, hooks=False) if run is not None else None

    def backends(self) -> Dict[str, Optional[str]]:
        layers = self.model.encoder.layers
        moe = next((layer.mlp.experts for layer in layers if layer.is_moe), None)
        out = {"attention": layers[0].attn.last_used, "experts": getattr(moe, "last_used", None) or getattr(moe, "implementation", None)}
        if self.graphs is not None:
            out["short batches"] = (f"eager: CUDA graphs turned off ({self.graphs.broken})" if self.graphs.broken else
                                    f"CUDA graphs (padded attention, dense experts) up to {self.graphs.max_tokens} padded tokens")
        elif self.cpu_kernel:
            out["short batches"] = self.cpu_kernel
        return out


class OnnxBackend:
    kind = "onnxruntime"

    def __init__(self, model_dir: Path, onnx_file: str, provider: str = "cpu", threads: Optional[int] = None):
        from nomic_moe_inference.onnx_encoder import session

        path = model_dir / (onnx_file if "/" in onnx_file else f"onnx/{onnx_file}")
        if not path.exists():
            raise UserError(f"{path} does not exist", f"run nomic-moe export-onnx {model_dir} first, or name a file in onnx/")
        cfg = checks.model_config(model_dir)
        self.session = session(path, provider, threads)
        self.dtype_name = f"onnx:{path.name}"
        self.file = path.name
        self.pad_id = cfg.get("pad_token_id", 1)
        self.vocab_size = cfg.get("vocab_size")
        self.hidden_size = cfg.get("hidden_size", cfg.get("n_embd"))
        self.moe_layers = []
        self.expert_pairs = np.zeros((0, 0), dtype=np.int64)  # the graph does not expose its routing

    def embed(self, inputs: List[List[int]]) -> np.ndarray:
        ids, mask = pad_batch(inputs, list(range(len(inputs))), self.pad_id)
        hidden = self.session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
        return mean_pool(hidden, mask)

    def backends(self) -> Dict[str, Optional[str]]:
        return {"attention": "onnx graph", "experts": f"onnx graph ({self.file}, {self.session.get_providers()[0]})"}


def load_backend(model_dir: Path, dtype: str = "float32", device: str = "cpu", onnx: Optional[str] = None,
                 provider: str = "cpu", threads: Optional[int] = None, cuda_graphs: bool = True):
    if onnx:
        return OnnxBackend(model_dir, onnx, provider, threads)
    return TorchBackend(model_dir, device, dtype, threads, graphs=cuda_graphs)


def warm_up(backend, tokens_per_text: int = 128, texts: int = 8, repeats: int = 2) -> float:
    """Runs a warm-up batch (first-call costs: kernel choice, allocations) and returns real tokens/s."""
    rng = np.random.default_rng(0)
    hi = min(backend.vocab_size or 1000, 250000)
    batch = [[0] + rng.integers(5, hi, tokens_per_text - 2).tolist() + [2] for _ in range(texts)]
    backend.embed(batch[:1])
    if getattr(backend, "graphs", None) is not None:
        backend.embed_eager(batch)  # the path of longer batches, which the warm-up batch does not take
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.embed(batch)
        best = min(best, time.perf_counter() - t0)
    backend.expert_pairs[:] = 0  # warm-up traffic is not users' traffic
    return tokens_per_text * texts / max(best, 1e-6)
