"""Nomic Embed v2 MoE: a post-LayerNorm BERT-style encoder with RoPE and sparse MoE layers.

The forward pass, in the paper's words:

    tokens -> embeddings -> LayerNorm -> 12 x [ attention -> add & norm -> (MLP | MoE) -> add & norm ]

Every odd layer is a Mixture-of-Experts: a router scores the experts for each token, the top-k
are kept (without renormalising their probabilities), each chosen expert is a GELU MLP, and the
outputs are combined with the router weights plus one shared bias.

Padding costs nothing here: the real tokens are packed into one [N, H] matrix before the
position-wise work (embeddings, projections, MLPs, router, experts, LayerNorms). Only the softmax
attention itself sees the texts: a variable-length kernel on CUDA, one SDPA call per text on the
CPU, else SDPA on a layout right-padded to the longest real text. So a token's output does not
depend on how much padding, or which batch partners, came with it.

Under a graph exporter (ONNX, torch.export) no size may be read back from the data, so the
packing stays (NonZero + Gather in the graph) but attention uses the input's own [B, S] layout,
and the experts run unrolled (experts_graph), still sparse.

Module and parameter names are the published checkpoint's (emb_ln, encoder.layers.{i}.attn.Wqkv,
norm1, norm2, mlp.router.layer, mlp.experts.mlp.w1 as [E*I, H], ...): one weights file, byte for
byte, serves this code, TEI, vLLM and llama.cpp.
"""

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_nomic_moe import NomicBertConfig, NomicMoEConfig
from .cpu_nomic_moe import int8_engine, warn_if_emulated_bf16, why_no_int8
from .experts_nomic_moe import (
    BACKENDS,
    CpuKernels,
    PackCache,
    Target,
    auto_choice,
    can_run_packed,
    dispatch_by_kernel,
    dispatch_sorted,
    experts_dense,
    experts_graph,
    experts_packed,
    experts_sorted,
    gelu_,
    is_exporting,
    pack_experts_for,
    pack_w2,
    run_auto,
    run_first,
    why_unavailable,
)
from .int8_nomic_moe import GROUPS as INT8_GROUPS
from .int8_nomic_moe import Int8Experts, Int8Linear
from .int8_nomic_moe import check_activations as check_int8_activations

logger = logging.get_logger(__name__)


@dataclass
class NomicMoEModelOutput(ModelOutput):
    """``last_hidden_state`` [B, S, H] is zero at padding positions.

    ``router_logits`` (on request) holds one [N, E] fp32 tensor per MoE layer, N = real tokens of
    the batch in row-major order; ``aux_loss`` is the load-balancing loss (SPEC §5), unweighted.
    ``sentence_embedding`` (on request) [B, H]: mean over real tokens, L2-normalised, as the
    sentence-transformers files describe; exported graphs carry it as a second output.
    """

    last_hidden_state: torch.FloatTensor = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    router_logits: Optional[Tuple[torch.FloatTensor, ...]] = None
    aux_loss: Optional[torch.FloatTensor] = None
    sentence_embedding: Optional[torch.FloatTensor] = None


# --------------------------------------------------------------------------------------------
# Packing: real tokens in, real tokens out
# --------------------------------------------------------------------------------------------


@dataclass
class Packing:
    """Where the N real tokens of a [B, S] batch live.

    token_index: [N] flat index of each real token in the [B*S] input layout.
    positions:   [N] RoPE position of each token inside its own text (0, 1, ...), so left and
                 right padding give the same positions.
    attn_index:  [N] flat index of each token in the right-padded [B*L] attention layout.
    key_mask:    [B, L] bool, True for real keys; L = longest real length in the batch.
    cu_seqlens:  [B+1] int32 offsets of each text in the packed tokens (variable-length kernels).
    """

    batch: int
    seq_len: int
    token_index: torch.Tensor
    positions: torch.Tensor
    attn_index: torch.Tensor
    key_mask: torch.Tensor
    cu_seqlens: torch.Tensor
    graph: bool = False  # built for a graph exporter: attention in the input's [B, S] layout
    dense: bool = False  # every position kept and every expert run (Packing.static): nothing read back
    _bounds: Optional[List[int]] = field(default=None, repr=False)
    _rope: dict = field(default_factory=dict, repr=False)

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    def text_bounds(self) -> List[int]:
        """cu_seqlens on the host, read once per forward pass (the CPU attention loop needs it)."""
        if self._bounds is None:
            self._bounds = self.cu_seqlens.tolist()
        return self._bounds

    def rope(self, head_dim: int, base: float, dtype: torch.dtype):
        """RoPE (cos, sin) for the packed positions, computed once per forward and shared by all layers."""
        key = (head_dim, base, dtype)
        if key not in self._rope:
            self._rope[key] = rope_cos_sin(self.positions, head_dim, base, dtype)
        return self._rope[key]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, graph: bool = False) -> "Packing":
        B, S = mask.shape
        keys = mask.bool()
        positions = keys.long().cumsum(1) - 1  # [B, S]
        token_index = keys.flatten().nonzero().squeeze(1)  # [N]
        lengths = keys.sum(1)  # [B]
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        positions = positions.flatten()[token_index]
        if graph:
            # no size read back from the data: attention runs over the input's own layout
            attn_index, key_mask = token_index, keys
        else:
            L = max(int(lengths.max()), 1) if B else 1  # the one host sync of a forward pass
            attn_index = (token_index // S) * L + positions
            key_mask = torch.arange(L, device=mask.device)[None, :] < lengths[:, None]
        # a text with no real token has no key to attend to; give it one so softmax stays finite
        empty = ~keys.any(1, keepdim=True)  # [B, 1]
        key_mask = key_mask | (empty & (torch.arange(key_mask.shape[1], device=mask.device) == 0)[None, :])
        return cls(B, S, token_index, positions, attn_index, key_mask, cu_seqlens, graph)

    @classmethod
    def static(cls, mask: torch.Tensor) -> "Packing":
        """Every position kept, padding included, for a CUDA graph: no host sync and no shape taken
        from the data. Padding rows are computed and ignored (never a key, never pooled)."""
        B, S = mask.shape
        keys = mask.bool()
        token_index = torch.arange(B * S, device=mask.device)  # [B*S]: pack and unpack are reshapes
        positions = (keys.long().cumsum(1) - 1).clamp(min=0).flatten()  # real tokens: as from_mask
        cu_seqlens = F.pad(keys.sum(1).cumsum(0), (1, 0)).to(torch.int32)
        empty = ~keys.any(1, keepdim=True)  # [B, 1]: a padding row of the graph's batch
        key_mask = keys | (empty & (torch.arange(S, device=mask.device) == 0)[None, :])
        return cls(B, S, token_index, positions, token_index, key_mask, cu_seqlens, graph=True, dense=True)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, ...] -> [N, ...]"""
        return x.flatten(0, 1)[self.token_index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, S, ...], zeros at padding"""
        out = x.new_zeros((self.batch * self.seq_len,) + x.shape[1:])
        out[self.token_index] = x
        return out.view((self.batch, self.seq_len) + x.shape[1:])

    def to_attention_layout(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, L, ...], right-padded to the longest real text"""
        B, L = self.key_mask.shape
        out = x.new_zeros((B * L,) + x.shape[1:])
        out[self.attn_index] = x
        return out.view((B, L) + x.shape[1:])

    def from_attention_layout(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [N, ...]"""
        return x.flatten(0, 1)[self.attn_index]


class NomicMoELinear(CpuKernels, nn.Linear):
    """nn.Linear (same parameters, same state dict) whose CPU inference in fp32 (and in bf16 where the
    CPU has it natively) uses its weight packed once for a CPU kernel: oneDNN's layout (use_packed: fp32
    up to PACKED_MAX_ROWS rows, or always where torch's fp32 GEMM is slow; bf16 always), or first a kernel
    of the caller's (``cpu_kernel``, see CpuKernels; the package's few-row kernel nomic_moe_kernels.small_gemm
    is one). F.linear re-lays the weight out in every call, which at a short query's few rows costs about
    as much as the product; at fp32 batch sizes on Intel the stored layout is as fast or faster
    (RESULTS.md, "CPU: packed or not, by rows"), on AMD half as fast (MKL's slow path)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_cpu_kernels()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pack_cpu and x.dim() == 2 and self.weight.dtype == x.dtype and can_run_packed(x):
            for kernel, packs in self.cpu_kernels():
                if kernel.accepts(x.shape[0], x.dtype):
                    return kernel.linear(x, packs.get(kernel.pack, self.weight), self.bias)
        return super().forward(x)

    def kernel_pack(self):
        """The weight in the caller's kernel's layout (``cpu_kernel``), made on first use and again
        after the weight changes: the copy forward() uses."""
        return self._kernel_pack.get(self.cpu_kernel.pack, self.weight)

    def _apply(self, fn, *args, **kwargs):
        self.clear_packs()  # moved or recast: the packed copies no longer match
        return super()._apply(fn, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# Embeddings and attention
# --------------------------------------------------------------------------------------------


class NomicMoEEmbeddings(nn.Module):
    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # [N] -> [N, H]; no absolute positions: RoPE carries them
        return self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype):
    """GPT-NeoX ("rotate half") RoPE over the full head, frequencies in fp32.

    Computed per call instead of kept in a buffer: it costs microseconds, and a non-persistent
    buffer made in __init__ comes back as garbage when transformers 5 builds on the meta device.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]  # [N, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [N, D]
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]  # [N, 1, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., D]; cos, sin broadcast against it ([N, 1, D] for x [N, heads, D])
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# Attention kernels: each takes packed q, k, v [N, heads, D] and returns the context [N, heads, D].


def attend_flash_varlen(q, k, v, packing):
    try:  # optional; inside try so that transformers' check of remote-code imports lets it be absent
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError("flash-attn is not installed") from e

    L = packing.max_len
    return flash_attn_varlen_func(q, k, v, packing.cu_seqlens, packing.cu_seqlens, L, L)


def attend_torch_varlen(q, k, v, packing):
    try:  # torch's own FlashAttention, torch >= 2.9
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.attention.varlen") from e

    L = packing.max_len
    return varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, L, L)


def attend_per_text(q, k, v, packing):
    """CPU: one SDPA call per text costs microseconds and computes no padded scores at all."""
    bounds = packing.text_bounds()
    ctx = torch.empty_like(q)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            qi, ki, vi = (t[lo:hi].transpose(0, 1)[None] for t in (q, k, v))  # [1, h, n, D]
            ctx[lo:hi] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
    return ctx


def attend_padded(q, k, v, packing, eager: bool = False):
    """The floor: SDPA (or the explicit softmax) on the texts right-padded to the longest: [B, h, L, D]."""
    head_dim = q.shape[-1]
    q, k, v = (packing.to_attention_layout(t).transpose(1, 2) for t in (q, k, v))
    mask = packing.key_mask[:, None, None, :]  # [B, 1, 1, L]
    if eager:
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        ctx = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return packing.from_attention_layout(ctx.transpose(1, 2))  # [N, h, D]


ATTENTION_KERNELS = {
    "flash_attn_varlen": attend_flash_varlen,
    "torch_varlen": attend_torch_varlen,
    "sdpa_per_text": attend_per_text,
    "sdpa_padded": attend_padded,
    "eager_padded": lambda q, k, v, packing: attend_padded(q, k, v, packing, eager=True),
}


@functools.lru_cache(maxsize=None)
def attention_packages() -> dict:
    """Which optional attention kernels this environment has (checked once)."""
    have = {}
    for name, module in (("flash_attn", "flash_attn"), ("torch_varlen", "torch.nn.attention.varlen")):
        try:
            have[name] = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            have[name] = False
    return have


def attention_candidates(target: Target, head_dim: int, implementation=None, graph: bool = False, packages=None):
    """[(kernel, why)] for this target, fastest first; the last one runs everywhere it is offered.

    "sdpa" (transformers' default) and None mean "choose"; "eager" and "flash_attention_2" are
    explicit requests: one kernel, refused with the reason where it cannot run.
    """
    have = attention_packages() if packages is None else packages
    cap = target.capability or (0, 0)
    flash_ok = target.device == "cuda" and target.dtype in (torch.float16, torch.bfloat16) and cap >= (8, 0) and head_dim <= 256
    if graph:
        return [("sdpa_padded", "graph export: attention over the input's own [B, S] layout, nothing sized from the data")]
    if implementation == "eager":
        return [("eager_padded", "attn_implementation='eager' was asked for")]
    if implementation == "flash_attention_2":
        if not have["flash_attn"]:
            raise ValueError("attn_implementation='flash_attention_2' needs the flash-attn package (pip install flash-attn)")
        if not flash_ok:
            raise ValueError(f"attn_implementation='flash_attention_2' needs CUDA sm_80+ in fp16/bf16 and head size <= 256, not {target}")
        return [("flash_attn_varlen", "attn_implementation='flash_attention_2' was asked for")]
    if target.device != "cuda":
        return [("sdpa_per_text", f"{target.device}: one SDPA call per text, no padded scores")]
    plan = []
    if flash_ok and have["flash_attn"]:
        plan.append(("flash_attn_varlen", f"packed tokens, no padding (flash-attn; {target})"))
    if flash_ok and have["torch_varlen"]:
        plan.append(("torch_varlen", f"packed tokens, no padding (torch's FlashAttention; {target})"))
    if flash_ok:
        why = "padded SDPA: no variable-length kernel is installed"
    elif target.dtype not in (torch.float16, torch.bfloat16):
        why = f"padded SDPA: FlashAttention takes fp16/bf16, not {str(target.dtype).replace('torch.', '')}"
    else:
        why = f"padded SDPA (memory-efficient or math kernel): FlashAttention needs sm_80+, this is sm_{cap[0]}{cap[1]}"
    plan.append(("sdpa_padded", why))
    return plan


class NomicMoEAttention(nn.Module):
    is_causal = False

    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        self.Wqkv = NomicMoELinear(config.hidden_size, 3 * config.hidden_size)  # rows [q | k | v], head-major
        self.out_proj = NomicMoELinear(config.hidden_size, config.hidden_size)
        self.config = config  # read at call time: transformers may switch the implementation after init
        self.last_used = None
        self.cpu_kernel = None  # set_cpu_kernel: a kernel with attention() does RoPE + attention in one call

    def forward(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        N, H = x.shape
        qkv = self.Wqkv(x).view(N, 3, self.num_heads, self.head_dim)
        kernel = self.cpu_kernel
        if kernel is not None and not packing.graph and getattr(kernel, "accepts_attention", None) \
                and kernel.accepts_attention(x.dtype, self.head_dim) and self.config._attn_implementation in (None, "sdpa") \
                and can_run_packed(x):
            # the same math as below (apply_rope, then attend_per_text) in one call: ~15 fewer operators a layer
            cos, sin = packing.rope(self.head_dim, self.rope_theta, torch.float32)  # [N, 1, D]
            self.last_used = "cpu kernel (RoPE + attention)"
            return self.out_proj(kernel.attention(qkv, packing.text_bounds(), cos, sin).reshape(N, H))
        cos, sin = packing.rope(self.head_dim, self.rope_theta, x.dtype)  # [N, 1, D]
        q, k = apply_rope(qkv[:, :2], cos[:, None], sin[:, None]).unbind(1)  # q and k in one pass: 2 x [N, h, D]
        v = qkv[:, 2]

        ctx = self.attend(q, k, v, packing)
        return self.out_proj(ctx.reshape(N, H))

    def attend(self, q, k, v, packing: Packing) -> torch.Tensor:
        """Softmax attention, the one step that needs the texts; a kernel that fails at first use falls back."""
        target = Target.of(q.device, q.dtype)
        plan = attention_candidates(target, self.head_dim, self.config._attn_implementation, packing.graph)
        ctx, self.last_used = run_first([name for name, _ in plan], target,
                                        lambda name: ATTENTION_KERNELS[name](q, k, v, packing), "attention kernel")
        return ctx


# --------------------------------------------------------------------------------------------
# MLP and Mixture-of-Experts
# --------------------------------------------------------------------------------------------


class NomicMoEMLP(nn.Module):
    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.fc1 = NomicMoELinear(config.hidden_size, config.intermediate_size)
        self.fc2 = NomicMoELinear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, packing: Packing):
        if isinstance(self.fc2, Int8Linear):  # int8: the GELU inside the down product's call where the kernel can
            return self.fc2(self.fc1(x), gelu_in=True), None
        return self.fc2(gelu_(self.fc1(x))), None


@dataclass
class Routing:
    """Who goes where, as contiguous per-expert segments of the N*k (token, slot) pairs.

    logits:       [N, E] fp32 router logits.
    weights:      [N, k] routing weight of each (token, slot), in the activation dtype.
    experts:      [N, k] expert of each (token, slot).
    order:        [N*k] (token, slot) pairs sorted by expert; pair p is token p // k, slot p % k.
    counts:       [E] pairs per expert; offsets [E+1] segment bounds (expert e owns
                  order[offsets[e]:offsets[e+1]]). All on the device: no host sync.
    """

    logits: torch.Tensor
    weights: torch.Tensor
    experts: torch.Tensor
    order: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]

    def sorted_tokens(self) -> torch.Tensor:
        return self.order // self.top_k  # [N*k] token of each sorted pair

    def sorted_weights(self) -> torch.Tensor:
        return self.weights.flatten()[self.order]  # [N*k]


class NomicMoERouter(nn.Module):
    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.normalize = config.norm_topk_prob
        self.layer = nn.Linear(config.hidden_size, config.num_experts, bias=False)

    def forward(self, x: torch.Tensor, sort: bool = True) -> Routing:
        # fp32 so that bf16 rounding cannot flip near-tied expert choices
        logits = F.linear(x.float(), self.layer.weight.float())  # [N, E]
        probs = logits.softmax(-1)
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.normalize:
            weights = weights / weights.sum(-1, keepdim=True)
        if not sort:  # the graph path (experts_graph) needs no sorted segments
            return Routing(logits, weights.to(x.dtype), experts, None, None, None)
        flat = experts.flatten()  # [N*k]
        order = flat.argsort(stable=True)
        # scatter-add, not bincount: CUDA's bincount reads the max back to the host to size its output
        counts = torch.zeros(self.layer.out_features, dtype=torch.long, device=x.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        offsets = F.pad(counts.cumsum(0), (1, 0))
        return Routing(logits, weights.to(x.dtype), experts, order, counts, offsets)


class NomicMoEExpertWeights(nn.Module):
    """The stacked expert matrices, stored as published: w1, w2 [E*I, H]; expert e owns rows e*I..(e+1)*I-1."""

    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        E, I, H = config.num_experts, config.intermediate_size, config.hidden_size
        self.shape = (E, I, H)
        self.w1 = nn.Parameter(torch.empty(E * I, H))
        self.w2 = nn.Parameter(torch.empty(E * I, H))

    def per_expert(self):
        """(w1, w2) viewed [E, I, H]: expert e computes gelu(x @ w1[e].T) @ w2[e] (w2 is not transposed)."""
        if self.w1 is None:
            raise RuntimeError("the expert weights were replaced by int8 ones (quantize_int8); reload the model for float weights")
        return self.w1.view(self.shape), self.w2.view(self.shape)


class NomicMoEExperts(CpuKernels, nn.Module):
    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.mlp = NomicMoEExpertWeights(config)
        self.bias = nn.Parameter(torch.empty(config.hidden_size))  # shared by all experts, added once
        self.implementation = config.moe_implementation  # "auto" or a name in BACKENDS
        self.last_used = None
        self.int8 = None  # Int8Experts after quantize_int8()
        # fp32 (and native bf16) inference on the CPU packs the expert matrices once in oneDNN's layout
        # (a second copy, 906 MB fp32 / 453 MB bf16 at the real size); NOMIC_MOE_CPU_PACK=0 keeps only the stored weights
        self.init_cpu_kernels()  # as NomicMoELinear's: a kernel takes the expert segments it accepts
        self._w2_t = PackCache()

    def forward(self, x: torch.Tensor, routing: Routing, kernel=None) -> torch.Tensor:
        if kernel is not None:  # = routing_kernel(x): the routing is unsorted, the kernel orders it
            return self.forward_routed(x, routing, kernel)
        if self.int8 is not None:
            self.last_used = "int8"
            return self.int8(x, routing, dispatch_sorted) + self.bias
        w1, w2 = self.mlp.per_expert()
        target = Target.of(x.device, x.dtype)
        if self.pack_cpu and can_run_packed(x) and w1.dtype == x.dtype \
                and self.implementation == "auto" and auto_choice(target, False) == "sorted":
            self.last_used = "sorted (packed)"  # the floor's math with the weights laid out once
            kernels = [(k, functools.partial(packs.get, functools.partial(pack_experts_for, k), w1, w2))
                       for k, packs in self.cpu_kernels()]
            return experts_packed(x, routing, w1, w2, kernels) + self.bias
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled() \
                and self.implementation in ("auto", "sorted"):
            self.last_used = "sorted"  # half precision on the CPU: w2 packed once as [out, in] rows
            return experts_sorted(x, routing, w1, w2, self._w2_t.get(pack_w2, w2)) + self.bias
        # the triton kernels have no backward: whenever autograd would record, a differentiable path runs
        training = torch.is_grad_enabled() and (x.requires_grad or self.mlp.w1.requires_grad)
        if self.implementation == "auto":
            out, self.last_used = run_auto(x, routing, w1, w2, training)
            return out + self.bias
        why = why_unavailable(self.implementation, Target.of(x.device, x.dtype), training)
        if why:
            raise RuntimeError(f"moe_implementation={self.implementation!r} cannot run here: {why}")
        self.last_used = self.implementation
        return BACKENDS[self.implementation](x, routing, w1, w2) + self.bias

    def routing_kernel(self, x: torch.Tensor):
        """The CPU kernel that orders, gathers and combines this layer's rows itself around its grouped
        products (dispatch_by_kernel), or None: then the router sorts and forward() dispatches. It needs
        every segment within the kernel's rows; a segment has at most N rows (a token picks an expert once)."""
        if self.int8 is not None:
            kernel = self.int8.grouped_kernel(x.shape[0]) if x.dtype == torch.float32 else None
        else:
            kernel = self.cpu_kernel
            if kernel is None or not hasattr(kernel, "linear_grouped") or not kernel.accepts(x.shape[0], x.dtype) \
                    or not (self.pack_cpu and can_run_packed(x) and self.mlp.w1.dtype == x.dtype and self.implementation == "auto"
                            and auto_choice(Target.of(x.device, x.dtype), False) == "sorted"):
                return None
        return kernel if kernel is not None and hasattr(kernel, "moe_route") else None

    def forward_routed(self, x: torch.Tensor, routing: Routing, kernel) -> torch.Tensor:
        """forward() on an unsorted routing, with ``kernel`` = routing_kernel(x): the same vectors."""
        if self.int8 is not None:
            self.last_used = "int8"
            return dispatch_by_kernel(x, routing, kernel, self.int8.grouped, self.bias)
        self.last_used = "sorted (packed)"
        ups, downs = self.kernel_groups(kernel)
        return dispatch_by_kernel(x, routing, kernel, lambda xs, bounds: kernel.linear_grouped(
            gelu_(kernel.linear_grouped(xs, bounds, ups)), bounds, downs), self.bias)

    def kernel_groups(self, kernel):
        """Every expert's up and down matrices in ``kernel``'s layout, as its groups (pack_experts_for),
        made on first use and again after the weights change."""
        return self._kernel_pack.get(functools.partial(pack_experts_for, kernel), *self.mlp.per_expert())

    def _apply(self, fn, *args, **kwargs):
        self.clear_packs()  # moved or recast: the packed copies no longer match
        self._w2_t.clear()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        E, I, H = self.mlp.shape
        used = f" (last used: {self.last_used})" if self.last_used else ""
        return f"experts={E}, hidden={H}, intermediate={I}, implementation={self.implementation}{used}"


class NomicMoESparseBlock(nn.Module):
    """route -> dispatch to experts -> combine"""

    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.router = NomicMoERouter(config)
        self.experts = NomicMoEExperts(config)

    def forward(self, x: torch.Tensor, packing: Packing):
        kernel = None if packing.graph else self.experts.routing_kernel(x)
        routing = self.router(x, sort=not packing.graph and kernel is None)
        if kernel is not None:  # a CPU kernel orders the pairs itself
            return self.experts(x, routing, kernel), routing
        if packing.graph:  # graph export or CUDA graph: no host sync, no sort
            experts = self.experts
            if experts.int8 is not None:
                raise RuntimeError("an int8 model (quantize_int8) runs neither exported nor in a CUDA graph; use the float "
                                   "model (nomic-moe export-onnx writes its own int8 graph)")
            run = experts_dense if packing.dense else experts_graph
            return run(x, routing, *experts.mlp.per_expert()) + experts.bias, routing
        return self.experts(x, routing), routing


class NomicMoELayer(nn.Module):
    def __init__(self, config: NomicMoEConfig, layer_idx: int):
        super().__init__()
        self.attn = NomicMoEAttention(config)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # after attention
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = NomicMoESparseBlock(config) if self.is_moe else NomicMoEMLP(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # after the MLP / MoE

    def forward(self, x: torch.Tensor, packing: Packing):
        return self.mlp_block(self.attention_block(x, packing), packing)

    # A layer's two halves, post-LayerNorm (normalised after each residual add), apart so that a
    # server can run other batches between them.
    def attention_block(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        return self.norm1(x + self.attn(x, packing))  # [N, H]

    def mlp_block(self, x: torch.Tensor, packing: Packing):
        """-> ([N, H], the routing: None in a dense layer)"""
        m, routing = self.mlp(x, packing)
        return self.norm2(x + m), routing


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, S, H] -> [B, H]: mean over real tokens (denominator clamped at 1e-9), then L2-normalised."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def load_balancing_loss(routings, num_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i, averaged over MoE layers (Switch / megablocks style)."""
    losses = []
    for r in routings:
        f = r.counts.float() / max(r.experts.numel(), 1)  # fraction of (token, slot) pairs per expert
        p = r.logits.softmax(-1).mean(0)  # mean router probability per expert
        losses.append(num_experts * (f * p).sum())
    return torch.stack(losses).mean()


class NomicMoEEncoder(nn.Module):
    def __init__(self, config: NomicMoEConfig):
        super().__init__()
        self.layers = nn.ModuleList(NomicMoELayer(config, i) for i in range(config.num_hidden_layers))


class NomicMoEPreTrainedModel(PreTrainedModel):
    config_class = NomicMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["NomicMoELayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, NomicMoEExpertWeights):
            module.w1.normal_(0.0, std)
            module.w2.normal_(0.0, std)
        elif isinstance(module, NomicMoEExperts):
            module.bias.zero_()


class NomicMoEModel(NomicMoEPreTrainedModel):
    def __init__(self, config: NomicMoEConfig):
        super().__init__(config)
        self.embeddings = NomicMoEEmbeddings(config)
        self.emb_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = NomicMoEEncoder(config)
        self.gradient_checkpointing = False
        self.post_init()

    def set_moe_implementation(self, name: str) -> None:
        """Switches the expert backend ("auto", "eager", "sorted", "grouped_mm", "triton").

        An explicit choice that cannot run on the model's device and dtype is refused here, saying why.
        """
        if name != "auto":
            p = self.embeddings.word_embeddings.weight
            why = why_unavailable(name, Target.of(p.device, p.dtype), training=False)
            if why:
                raise ValueError(f"moe_implementation={name!r} cannot run here: {why}")
        self.config.moe_implementation = name
        for layer in self.encoder.layers:
            if layer.is_moe:
                layer.mlp.experts.implementation = name
        p = self.embeddings.word_embeddings.weight
        chosen = auto_choice(Target.of(p.device, p.dtype), self.training) if name == "auto" else name
        logger.info(f"NomicMoE: MoE implementation {name!r} -> {chosen} on {p.device.type}/{str(p.dtype).replace('torch.', '')}")

    def set_cpu_kernel(self, kernel) -> None:
        """A CPU kernel for the linear and expert products it accepts (see NomicMoELinear), or None
        for oneDNN's packed weights only. With this package installed, the few-row kernel that makes
        a short query faster on the CPU is ``nomic_moe_kernels.small_gemm.install(model)``. A kernel
        with ``run_layers(model, x, packing)`` is first offered forward()'s layers: it returns (x after
        the last layer, the expert counts of each MoE layer), or None where it does not take them."""
        self.cpu_kernel = kernel  # quantize_int8 hands it to the int8 matrices it makes
        for m in self.modules():
            if isinstance(m, (CpuKernels, Int8Linear, Int8Experts)):
                m.set_cpu_kernel(kernel)
            elif isinstance(m, NomicMoEAttention):
                m.cpu_kernel = kernel

    @torch.no_grad()
    def quantize_int8(self, groups=INT8_GROUPS, engine: Optional[str] = None, activations: str = "per_batch") -> dict:
        """int8 weights (one scale per output channel) and int8 activations, in place, on the CPU.

        ``groups``: which matrices become int8, any of "experts" (every expert's two matrices),
        "attention" (Wqkv, out_proj) and "mlp" (the dense layers' fc1, fc2). The router, the
        LayerNorms, the embeddings and pooling stay fp32; the model is cast to fp32 first. The
        kernel is torch's dynamic quantized linear on the CPU's best engine (oneDNN on AMX, FBGEMM
        on AVX-512 and AVX2; ``engine`` overrides). Afterwards ``model(input_ids=..., attention_mask=...,
        return_sentence_embedding=True)`` works as before. ``activations``: "per_batch" (default: one
        scale per call, the engine's dynamic quantized linear, the fastest; batch partners move a
        vector by int8 rounding) or "per_token" (one scale per token, torch._int_mm, 10-20% slower;
        partners move a vector only through float rounding, about 4x less). Inference only: the float weights of
        those matrices are dropped, so reload the model to train, export or save it.
        Refused, saying why, on a GPU or a CPU without an x86 int8 kernel.
        """
        groups = tuple(groups)
        check_int8_activations(activations)  # before anything is cast or replaced
        unknown = sorted(set(groups) - set(INT8_GROUPS))
        if unknown:
            raise ValueError(f"unknown int8 group(s) {unknown}; choose from {', '.join(INT8_GROUPS)}")
        device = self.embeddings.word_embeddings.weight.device
        if device.type != "cpu":
            raise ValueError(f"int8 runs on the CPU's kernels (FBGEMM, oneDNN), not on {device}; on a GPU use bfloat16 or float16")
        if engine is None:
            why = why_no_int8()
            if why:
                raise RuntimeError(f"int8 cannot run here: {why}")
            engine = int8_engine()
        elif engine not in torch.backends.quantized.supported_engines:
            raise ValueError(f"quantized engine {engine!r} is not in this torch ({', '.join(torch.backends.quantized.supported_engines)})")
        self.float().eval().requires_grad_(False)
        done = set(getattr(self, "int8_groups", ()))
        for layer in self.encoder.layers:
            if "attention" in groups and "attention" not in done:
                layer.attn.Wqkv = Int8Linear.from_linear(layer.attn.Wqkv, engine, activations)
                layer.attn.out_proj = Int8Linear.from_linear(layer.attn.out_proj, engine, activations)
            if layer.is_moe and "experts" in groups and "experts" not in done:
                ex = layer.mlp.experts
                ex.int8 = Int8Experts(*ex.mlp.per_expert(), engine, activations)
                ex.mlp.w1 = ex.mlp.w2 = None  # the float copies go: int8 is also the memory option
            if not layer.is_moe and "mlp" in groups and "mlp" not in done:
                layer.mlp.fc1 = Int8Linear.from_linear(layer.mlp.fc1, engine, activations)
                layer.mlp.fc2 = Int8Linear.from_linear(layer.mlp.fc2, engine, activations)
        self.int8_groups = tuple(g for g in INT8_GROUPS if g in done or g in groups)
        if getattr(self, "cpu_kernel", None) is not None:
            self.set_cpu_kernel(self.cpu_kernel)
        self.int8_engine = engine
        self.int8_activations = activations
        int8_bytes = sum(m.weight_bytes() for m in self.modules() if isinstance(m, Int8Linear))
        float_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
        logger.info(f"NomicMoE: int8 {', '.join(self.int8_groups)} ({activations} activations"
                    f"{', torch._int_mm' if activations == 'per_token' else ' on ' + engine}): {int8_bytes / 2**20:.0f} MiB int8 + {float_bytes / 2**20:.0f} MiB float")
        return {"engine": engine, "activations": activations, "groups": list(self.int8_groups), "int8_mib": int8_bytes / 2**20, "float_mib": float_bytes / 2**20}

    def save_pretrained(self, *args, **kwargs):
        if getattr(self, "int8_groups", None):
            raise ValueError("this model holds int8 matrices made in memory by quantize_int8(); save the float model "
                             "and call quantize_int8() after loading it")
        return super().save_pretrained(*args, **kwargs)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_logits: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        return_sentence_embedding: bool = False,
        **kwargs,
    ):
        mask = self._check_inputs(input_ids, attention_mask, token_type_ids)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)

        exporting = is_exporting()
        packing, x = self.embed_packed(input_ids, mask, token_type_ids, graph=exporting)

        hidden_states = (packing.unpack(x),) if output_hidden_states else None
        routings = []
        layers = self.encoder.layers
        run_layers = getattr(getattr(self, "cpu_kernel", None), "run_layers", None)
        if run_layers is not None and not (output_hidden_states or output_router_logits or exporting or self.training):
            # a CPU kernel that runs every layer in one call where it takes these inputs (the same
            # steps as the loop below; see set_cpu_kernel), else None and the loop runs them
            done = run_layers(self, x, packing)
            if done is not None:
                x, layers = done[0], ()
        for layer in layers:
            if self.gradient_checkpointing and self.training:
                x, routing = torch.utils.checkpoint.checkpoint(layer, x, packing, use_reentrant=False)
            else:
                x, routing = layer(x, packing)
            if routing is not None:
                routings.append(routing)
            if output_hidden_states:
                hidden_states += (packing.unpack(x),)

        router_logits = aux_loss = None
        if output_router_logits and routings and not exporting:
            router_logits = tuple(r.logits for r in routings)
            aux_loss = load_balancing_loss(routings, self.config.num_experts)
        last = packing.unpack(x)
        sentence = mean_pool_normalize(last, mask) if return_sentence_embedding else None
        out = NomicMoEModelOutput(
            last_hidden_state=last,
            hidden_states=hidden_states,
            router_logits=router_logits,
            aux_loss=aux_loss,
            sentence_embedding=sentence,
        )
        return out if return_dict else out.to_tuple()

    def embed_packed(self, input_ids, mask, token_type_ids=None, graph: bool = False, static: bool = False):
        """[B, S] ids and bool mask -> (Packing, [N, H] embeddings of the real tokens): the forward
        pass before the first layer (a server that runs the layers one by one starts here).
        ``static``: every position, padding included (Packing.static, for embed_static)."""
        packing = Packing.static(mask) if static else Packing.from_mask(mask, graph=graph)
        ids = packing.pack(input_ids)  # [N]
        types = packing.pack(token_type_ids) if token_type_ids is not None else torch.zeros_like(ids)
        x = self.emb_ln(self.embeddings(ids, types))  # [N, H]
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            warn_if_emulated_bf16(x.dtype)  # once per process, on a CPU that emulates bf16
        return packing, x

    def embed_static(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """[B, S] ids and 0/1 mask -> ([B, H] float32 mean over real tokens, not normalised; [moe layers, E]
        (token, slot) pairs each expert received from the real tokens).

        The same embedding as forward (to fp32 rounding), computed with fixed shapes and no host sync,
        so that torch.cuda.graphs can capture it: every position is kept (padding computed, never
        attended to or pooled), attention runs padded, and every expert runs on every row, weighted
        by the router (zero where not chosen). For short inputs, where a query's few tokens read
        every expert's weights anyway; nomic_moe_inference.cuda_graphs captures it per batch shape.
        The inputs are not checked here (a check reads them back): the caller checks them.
        """
        packing, x = self.embed_packed(input_ids, mask, static=True)  # [B*S, H]: every position
        counts = []
        real = mask.flatten().to(torch.long)[:, None]  # [B*S, 1]: padding counts for no expert
        for layer in self.encoder.layers:
            x, routing = layer(x, packing)
            if routing is not None:
                hits = torch.zeros(x.shape[0], self.config.num_experts, dtype=torch.long, device=x.device)
                hits.scatter_add_(1, routing.experts, real.expand_as(routing.experts))  # [B*S, E]; one_hot reads back its max
                counts.append(hits.sum(0))
        m = mask.unsqueeze(-1).to(torch.float32)  # [B, S, 1]
        x = x.view(packing.batch, packing.seq_len, -1).float()
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return pooled, torch.stack(counts) if counts else x.new_zeros(0, self.config.num_experts, dtype=torch.long)

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """Refuse what would silently give wrong embeddings; return the [B, S] bool mask."""
        if input_ids is None:
            raise ValueError("input_ids is required (token ids from the tokenizer, shape [batch, seq_len])")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; truncate when tokenizing "
                "(truncation=True, max_length=512 is what the model was trained for)"
            )
        if not is_exporting() and input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); is the tokenizer the model's own?")
        if token_type_ids is not None and token_type_ids.shape != input_ids.shape:
            raise ValueError("token_type_ids must have the shape of input_ids")
        if attention_mask is None:
            return torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be a [batch, seq_len] 0/1 mask like input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}; pass the tokenizer's attention_mask, not an additive 4D mask"
            )
        if attention_mask.dtype.is_floating_point and not is_exporting() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real token), not additive -inf/0 values")
        return attention_mask.bool()


class NomicBertModel(NomicMoEModel):
    """The same model for a folder in the published layout (model_type "nomic_bert", NomicBertConfig).

    transformers' AutoModel only pairs a remote model class with the config class it names, hence
    this alias; the weights, names and forward pass are NomicMoEModel's.
    """

    config_class = NomicBertConfig
