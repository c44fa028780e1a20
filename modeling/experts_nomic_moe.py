"""Expert compute for the MoE layers: one math, several speeds.

Every backend takes the token activations x [N, H], a routing (who goes where, see Routing in
modeling_nomic_moe.py) and the expert weights w1, w2 [E, I, H], and returns

    out[t] = sum over the k chosen experts e of weight[t, e] * gelu(x[t] @ w1[e].T) @ w2[e]     [N, H]

without the shared bias (the caller adds it once). ``eager`` is the plain reference that the
tests hold the others to.

  eager       per expert: find its tokens, two matmuls, accumulate. Obvious, host syncs.
  sorted      gather x once in expert order, per-expert GEMMs on contiguous segments, unsort.
              The CPU path (fp32 and bf16; oneDNN uses AVX512-BF16/AMX where present).
  grouped_mm  the same segments through torch's grouped GEMM: two kernel launches per layer, no
              host sync. Fast on Hopper in bf16; torch runs a correct fallback elsewhere.
  triton      ScatterMoE-style kernel pair (gather + GEMM + GELU, GEMM + weight + scatter), fp16 /
              bf16 on CUDA, no padding of segments, no host sync (below, beside experts_sorted).
"""

import functools
import os
import warnings
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .cpu_nomic_moe import bf16_native, library_fp32_gemm_slow


def experts_eager(x, routing, w1, w2):
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tokens, slots = torch.where(routing.experts == e)
        if tokens.numel() == 0:
            continue
        y = F.gelu(x[tokens] @ w1[e].T) @ w2[e]  # [n, H]; w2 is [I, H] per expert, not transposed
        out.index_add_(0, tokens, y * routing.weights[tokens, slots, None])
    return out


def experts_graph(x, routing, w1, w2):
    """The exportable form (ONNX, torch.export): no host sync, no sort, shapes from the graph.

    Unrolled over experts; each gathers only the tokens routed to it (NonZero + Gather), so
    unchosen experts cost nothing.
    """
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        hit = routing.experts == e  # [N, k]
        weight = (routing.weights * hit.to(routing.weights.dtype)).sum(-1)  # [N]
        idx = torch.nonzero(hit.any(-1)).squeeze(1)  # [n_e]
        y = F.gelu(x[idx] @ w1[e].T) @ w2[e]
        out = out.index_add(0, idx, y * weight[idx].unsqueeze(-1))
    return out


def experts_dense(x, routing, w1, w2):
    """Every expert on every token, each output weighted by the router (zero where not chosen):
    fixed shapes, no host sync, for a CUDA graph of a short input. E/k times the FLOPs of the sparse
    paths but the same weight reads, since a query's few tokens reach every expert anyway.
    x [N, H], w1 and w2 [E, I, H] -> [N, H].
    """
    E = w1.shape[0]
    gate = torch.zeros(x.shape[0], E, dtype=routing.weights.dtype, device=x.device)
    gate = gate.scatter(1, routing.experts, routing.weights)  # [N, E]
    h = F.gelu(torch.matmul(x, w1.transpose(1, 2)))  # [E, N, I]
    y = torch.bmm(h, w2)  # [E, N, H]
    return (y * gate.T.unsqueeze(-1)).sum(0)  # [N, H]


def combine(y_sorted, routing, n_tokens):
    """[N*k, H] rows in expert order -> weighted sum over each token's k slots, [N, H].

    The rows are gathered back slot by slot, [k, N, H], so that the sum over slots adds whole
    contiguous [N, H] blocks: scattering into (token, slot) order and summing over a middle dim of
    size k ran 4x (bf16) to 14x (fp32) slower at 4096 tokens on the CPU (a whole batch: 1.00-1.03x
    faster in bf16, 0.98-1.06x in fp32, Zen 5, RESULTS.md). Deterministic (no atomics):
    the same products, the slots added in the same order (for top-2, the same bits as that scatter).
    """
    k = routing.top_k
    pos = torch.empty_like(routing.order)
    pos[routing.order] = torch.arange(routing.order.numel(), device=pos.device)  # [N*k] sorted row of each (token, slot)
    y = y_sorted.index_select(0, pos.view(n_tokens, k).T.flatten()).view(k, n_tokens, y_sorted.shape[-1])  # [k, N, H]
    w = routing.weights.T.unsqueeze(-1)  # [k, N, 1]
    # in place where autograd needs no copy and no type promotes (under autocast: bf16 GEMM rows x fp32
    # weights -> fp32): a second [k, N, H] of a long batch costs as much in page faults as the sum
    in_place = not torch.is_grad_enabled() and torch.promote_types(y.dtype, w.dtype) == y.dtype
    y = y.mul_(w) if in_place else y * w
    return y[0] + y[1] if k == 2 else y.sum(0)  # top-2 (the model's): one add, 3.5x faster than sum()'s reduction in bf16


def dispatch_sorted(x, routing, n_experts, ffn, grouped=None):
    """Gather x once in expert order, run ``ffn(e, rows)`` on each non-empty segment, combine.

    The CPU paths share it (float, prepacked, int8); only the per-expert product differs.
    ``grouped(xs, bounds)``, where given, may run every segment at once (a CPU kernel's grouped call)
    and return all the rows, or None to leave them to ``ffn``.
    """
    xs = x[routing.sorted_tokens()]  # [N*k, H], grouped by expert
    bounds = routing.offsets.tolist()  # the one host sync of this path
    y = grouped(xs, bounds) if grouped is not None else None
    if y is not None:
        return combine(y, routing, x.shape[0])
    segments = [ffn(e, xs[bounds[e]:bounds[e + 1]]) for e in range(n_experts) if bounds[e + 1] > bounds[e]]
    y = torch.cat(segments) if segments else xs.new_zeros(0, x.shape[1])
    return combine(y, routing, x.shape[0])


def dispatch_by_kernel(x, routing, kernel, products, bias):
    """dispatch_sorted + combine + bias, the ordering, gather and weighted sum done by a CPU kernel
    (``moe_route``, ``moe_combine``; nomic_moe_kernels.small_gemm has them) on a routing the router did
    not sort: the same rows and sums as the operators above, in two calls instead of about fifteen
    small ones, which after the expert products have streamed their weights through the caches cost
    15-40 us each. ``products(xs, bounds)`` runs every expert's rows (a kernel's grouped calls).
    Fills routing.order, counts and offsets, as the router's sort would have."""
    xs, routing.order, routing.counts, routing.offsets = kernel.moe_route(x, routing.experts, routing.logits.shape[1])
    ys = products(xs, routing.offsets.tolist())
    return kernel.moe_combine(ys, routing.order, routing.weights, bias)


def experts_sorted(x, routing, w1, w2, w2_t=None):
    """``w2_t``: optional [E, H, I] contiguous copy of w2 transposed (pack_w2), so that both products
    take their weight as [out, in] rows, the layout oneDNN's bf16 GEMM wants: with w2 as stored, a bf16
    product on a CPU without native bf16 was 17x slower (RESULTS.md, "CPU: per-call weight layout")."""
    return dispatch_sorted(x, routing, w1.shape[0], lambda e, rows: expert_ffn(rows, w1, w2, e, w2_t))


def is_exporting() -> bool:
    """True while a graph exporter (TorchScript tracing, torch.onnx, torch.export) runs the model."""
    compiler_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or (compiler_exporting and compiler_exporting()))


def records_graph() -> bool:
    """An exporter or a compiler runs the model: it must see plain operators on the stored weights
    (no in-place tricks, no opaque packed tensors)."""
    return is_exporting() or bool(getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)())


def gelu_(h: torch.Tensor) -> torch.Tensor:
    """F.gelu of a product's fresh output, in place where nothing records the graph (inference, eager):
    the same bits without a second [rows, I] tensor, whose page faults cost a long batch more than the
    GELU itself (bf16 at 8192 rows: 15.5 ms, in place 4.1 ms; RESULTS.md)."""
    return F.gelu(h) if torch.is_grad_enabled() or records_graph() else torch.ops.aten.gelu_(h)


def expert_ffn(rows, w1, w2, e, w2_t=None):
    """Expert e on its rows with the stored weights (w2_t: w2 packed by pack_w2)."""
    h = gelu_(F.linear(rows, w1[e]))
    return F.linear(h, w2_t[e]) if w2_t is not None else h @ w2[e]


@functools.lru_cache(maxsize=None)
def packed_available() -> bool:
    """oneDNN's prepacked linear is in this torch build (x86 and aarch64 wheels have it)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


PACK_HINT = 64  # rows the packed layout is tuned for; measured: the same layout serves 1..512 rows


def pack_experts(w1, w2, pack=None):
    """Each expert's two matrices as packed [out, in] weights, made once (fp32 or native bf16, CPU):
    oneDNN's layout, or ``pack``'s (a CPU kernel's).

    F.linear hands an unpacked weight to the GEMM library, which re-lays it out in every call; at the
    few rows per expert of a short query that re-layout costs as much as the product (1.6-1.8x at
    8 rows, RESULTS.md "CPU: prepacked expert weights"). The packed product is the same sum.
    """
    pack = pack or pack_linear
    return [pack(w1[e]) for e in range(w1.shape[0])], [pack(w2[e].T) for e in range(w2.shape[0])]


def as_groups(kernel, ups, downs):
    """An MoE layer's packed up and down matrices as ``kernel``'s groups where it makes them (``group``:
    the matrices' addresses gathered once for its grouped calls, not on every call), else as they are."""
    group = getattr(kernel, "group", None)
    return (group(ups), group(downs)) if group is not None else (ups, downs)


def pack_experts_for(kernel, w1, w2):
    """pack_experts in ``kernel``'s layout, as its groups (as_groups)."""
    return as_groups(kernel, *pack_experts(w1, w2, pack=kernel.pack))


def pack_linear(w):
    """One [out, in] weight in oneDNN's packed layout (fp32 or native bf16, CPU): the attention and dense-MLP matrices."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_HINT)


def packed_linear(x, w_packed, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, w_packed, bias, "none", [], "")


def cpu_pack_enabled() -> bool:
    """NOMIC_MOE_CPU_PACK=0 keeps only the stored weights (no packed second copy)."""
    return os.environ.get("NOMIC_MOE_CPU_PACK", "1") != "0"


def can_run_packed(x) -> bool:
    """fp32, or bf16 where the CPU computes it natively, inference on the CPU, eager: the packed
    copies hold no autograd history, and a compiler or exporter must see the stored weights, not an
    opaque oneDNN tensor. The device is asked of Target.of, as everywhere, so that a simulated GPU
    (doctor, tests) is honoured."""
    packs_dtype = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and bf16_native())
    return (packs_dtype and not torch.is_grad_enabled() and not records_graph()
            and Target.of(x.device, x.dtype).device == "cpu" and packed_available())


def use_packed(rows: int, dtype: torch.dtype) -> bool:
    """Whether a product of ``rows`` rows takes the packed weights: fp32 up to PACKED_MAX_ROWS, or at any
    size where torch's own fp32 GEMM is the slow one (MKL on a non-Intel CPU); bf16 at any size
    (measured on AVX512_BF16: packed is 1.6-2.3x faster at 8 rows and no slower at 2048)."""
    return dtype == torch.bfloat16 or rows <= PACKED_MAX_ROWS or library_fp32_gemm_slow()


class PackCache:
    """A derived copy of some weights (a packed layout), rebuilt when a weight is replaced, recast or
    updated in place. Copies of the module (deepcopy, pickle: sentence-transformers' process pool,
    Ray) start empty: a oneDNN-packed tensor has no storage to copy, and rebuilding is cheap."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, build, *weights):
        # an inference tensor (made under torch.inference_mode) has no version counter, and cannot change
        key = tuple((w.data_ptr(), w.dtype, w.device, 0 if w.is_inference() else w._version) for w in weights)
        if self.key != key:
            self.key, self.value = None, None  # drop the old copy before building the new one
            self.value, self.key = build(*weights), key
        return self.value

    def clear(self):
        self.key, self.value = None, None

    def __deepcopy__(self, memo):
        return PackCache()

    def __reduce__(self):
        return (PackCache, ())


# Rows up to which the packed layout is used in fp32 (on Intel CPUs; see use_packed). Measured there
# (RESULTS.md, "CPU: packed or not, by rows"): packed is 1.1-1.7x faster at 8-64 rows, even at
# 128-256, and 3-18% slower from 512 rows on.
PACKED_MAX_ROWS = 128


class OneDnnPacked:
    """oneDNN's prepacked linear as a CPU kernel: what every module falls back to. A kernel has
    ``accepts(rows, dtype)``, ``pack(weight [out, in])`` and ``linear(x, packed, bias)``; a caller's
    own (NomicMoEModel.set_cpu_kernel, e.g. nomic_moe_kernels.small_gemm) is tried before this one."""

    name = "oneDNN packed"

    def accepts(self, rows: int, dtype: torch.dtype) -> bool:
        return use_packed(rows, dtype)

    def pack(self, w):
        return pack_linear(w)

    def linear(self, x, packed, bias=None):
        return packed_linear(x, packed, bias)


ONEDNN = OneDnnPacked()


class CpuKernels:
    """The CPU kernels a module tries in turn, each with its packed copy of the module's weights: the
    caller's kernel (``cpu_kernel``, None by default), then oneDNN's. Mixed into NomicMoELinear and
    NomicMoEExperts; ``_apply`` (a move or recast) drops the copies."""

    def init_cpu_kernels(self):
        self.pack_cpu = cpu_pack_enabled()
        self.cpu_kernel = None
        self._kernel_pack, self._pack = PackCache(), PackCache()

    def set_cpu_kernel(self, kernel):
        self.cpu_kernel = kernel
        self._kernel_pack.clear()  # another kernel, another layout

    def cpu_kernels(self):
        """[(kernel, its PackCache)], in the order they are tried."""
        own = [(self.cpu_kernel, self._kernel_pack)] if self.cpu_kernel is not None else []
        return own + [(ONEDNN, self._pack)]

    def clear_packs(self):
        self._pack.clear()
        self._kernel_pack.clear()


def experts_packed(x, routing, w1, w2, kernels):
    """experts_sorted with each segment's product on the first of ``kernels`` that accepts its rows:
    pairs (kernel, packs), ``packs()`` giving that kernel's (ups, downs) (pack_experts, made on first
    need). Same dispatch, same math; a segment none accepts (a long fp32 one) takes the stored weights.
    A kernel with ``linear_grouped`` that accepts every segment runs the layer's experts in two calls
    (all the ups, one GELU, all the downs): the same sums, without a call per expert."""
    def ffn(e, rows):
        for kernel, packs in kernels:
            if kernel.accepts(rows.shape[0], rows.dtype):
                ups, downs = packs()
                return kernel.linear(gelu_(kernel.linear(rows, ups[e])), downs[e])
        return expert_ffn(rows, w1, w2, e)

    def grouped(xs, bounds):
        kernel, packs = kernels[0]
        if not hasattr(kernel, "linear_grouped") or \
                not all(kernel.accepts(hi - lo, xs.dtype) for lo, hi in zip(bounds[:-1], bounds[1:])):
            return None
        ups, downs = packs()
        return kernel.linear_grouped(gelu_(kernel.linear_grouped(xs, bounds, ups)), bounds, downs)
    return dispatch_sorted(x, routing, w1.shape[0], ffn, grouped)


def pack_w2(w2):
    """[E, I, H] -> [E, H, I] contiguous: each expert's down matrix as [out, in] rows, made once."""
    return w2.transpose(1, 2).contiguous()


def _grouped_mm():
    fn = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
    return fn


def experts_grouped_mm(x, routing, w1, w2):
    gmm = _grouped_mm()
    if gmm is None:  # torch too old: same math, per-expert GEMMs
        return experts_sorted(x, routing, w1, w2)
    xs = x[routing.sorted_tokens()]  # [N*k, H]
    ends = routing.offsets[1:].to(torch.int32)  # [E] cumulative segment ends, stays on the device
    h = gelu_(gmm(xs, w1.transpose(1, 2), offs=ends))  # [N*k, I]
    y = gmm(h, w2, offs=ends)  # [N*k, H]
    return combine(y, routing, x.shape[0])


# --------------------------------------------------------------------------------------------
# Triton kernel pair, ScatterMoE-style: the fast version of experts_sorted for fp16/bf16 on CUDA.
#
# The (token, slot) pairs arrive sorted by expert (Routing.order, Routing.offsets). Two kernels:
#   up:    h[p]    = gelu(x[token(p)] @ w1[e].T)     gathers token rows while loading      [N*k, I]
#   down:  y[q(p)] = weight[p] * (h[p] @ w2[e])      scatters to (token, slot) order       [N*k, H]
# then out = y.view(N, k, H).sum(1). Each program owns BLOCK_M rows of one expert's segment; the
# block schedule (which program serves which expert) is computed on the device, and the grid is an
# upper bound known from the shapes alone, so nothing waits for the host.
# --------------------------------------------------------------------------------------------

try:  # optional at run time: the kernels are defined only where triton is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:

    @triton.jit
    def _segment(pid_m, block_ends_ptr, offsets_ptr, E: tl.constexpr, BLOCK_M: tl.constexpr):
        """Which expert program pid_m serves, and its rows [row0, seg_end)."""
        e = 0
        for j in tl.static_range(E):
            e += (tl.load(block_ends_ptr + j) <= pid_m).to(tl.int32)
        e = tl.minimum(e, E - 1)
        first_block = tl.load(block_ends_ptr + e) - (
            (tl.load(offsets_ptr + e + 1) - tl.load(offsets_ptr + e) + BLOCK_M - 1) // BLOCK_M
        )
        row0 = tl.load(offsets_ptr + e) + (pid_m - first_block) * BLOCK_M
        seg_end = tl.load(offsets_ptr + e + 1)
        return e, row0, seg_end

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:  # fp32 in, exact fp32 products (no TF32)
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _up_kernel(
        x_ptr, w1_ptr, h_ptr, order_ptr, block_ends_ptr, offsets_ptr,
        H, I,
        E: tl.constexpr, TOP_K: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e, row0, seg_end = _segment(pid_m, block_ends_ptr, offsets_ptr, E, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < seg_end  # programs past the last block get row0 >= seg_end: all masked
        tok = (tl.load(order_ptr + rows, mask=rmask, other=0) // TOP_K).to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < I
        w1 = w1_ptr + e.to(tl.int64) * I * H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < H
            a = tl.load(x_ptr + tok[:, None] * H + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w1 + cols[None, :].to(tl.int64) * H + kk[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += _dot(a, b, IEEE)
        h = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))  # exact GELU
        dst = h_ptr + rows[:, None].to(tl.int64) * I + cols[None, :]
        tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _down_kernel(
        h_ptr, w2_ptr, y_ptr, order_ptr, weights_ptr, block_ends_ptr, offsets_ptr,
        H, I,
        E: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        e, row0, seg_end = _segment(pid_m, block_ends_ptr, offsets_ptr, E, BLOCK_M)
        rows = row0 + tl.arange(0, BLOCK_M)
        rmask = rows < seg_end  # programs past the last block get row0 >= seg_end: all masked
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < H
        w2 = w2_ptr + e.to(tl.int64) * I * H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < I
            a = tl.load(h_ptr + rows[:, None].to(tl.int64) * I + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(w2 + kk[:, None].to(tl.int64) * H + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc += _dot(a, b, IEEE)
        wt = tl.load(weights_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        acc = acc * wt[:, None]
        dest = tl.load(order_ptr + rows, mask=rmask, other=0).to(tl.int64)  # (token, slot) position
        tl.store(y_ptr + dest[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _tiles(capability=None):
    """Tile sizes and launch options of the kernel pair, per architecture (`nomic-moe doctor --compile` shows each)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32), {}  # small tiles: the interpreter is slow
    if capability is not None and tuple(capability) < (8, 0):
        # no mma before sm_80 in Triton: the dot runs on FMA units, and 64x128 tiles spill (8.7 KB of stack)
        return dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), dict(num_warps=4, num_stages=2)
    if capability is not None and tuple(capability) == (9, 0):
        # 4 warps, measured on an H200 (gpu_check.sh's sweep, 16384 tokens x top-2, bf16): 331 TFLOP/s against
        # 310 with 8, although ptxas spills 216 B of the up kernel's registers there
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), dict(num_warps=4, num_stages=3)
    # 8 warps: with 4, ptxas spills 936 B (sm_80..89) of the up kernel's registers to the stack; not timed on these cards
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), dict(num_warps=8, num_stages=3)


def triton_experts(x, routing, w1, w2):
    """Same result as experts_sorted; x [N, H] fp16/bf16 (fp32 exact with IEEE dots)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    N, H = x.shape
    E, I, _ = w1.shape
    k = routing.top_k
    M = N * k
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    tiles, launch = _tiles(cuda_capability(x.device.index) if x.is_cuda else None)
    BM = tiles["BLOCK_M"]
    # block schedule on the device: expert e owns ceil(count_e / BM) consecutive programs
    block_ends = ((routing.counts + BM - 1) // BM).cumsum(0).to(torch.int32)
    offsets = routing.offsets.to(torch.int32)
    order = routing.order.to(torch.int32)
    weights = routing.sorted_weights().contiguous()
    grid_m = triton.cdiv(M, BM) + E  # upper bound: each expert wastes at most one partial block
    # fp32: exact products. bf16 under the interpreter too: its numpy dot has no bf16 and returns garbage
    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")

    h = torch.empty(M, I, device=x.device, dtype=x.dtype)
    _up_kernel[(grid_m, triton.cdiv(I, tiles["BLOCK_N"]))](
        x, w1, h, order, block_ends, offsets, H, I, E=E, TOP_K=k, IEEE=ieee, **tiles, **launch
    )
    y = torch.empty(M, H, device=x.device, dtype=x.dtype)
    _down_kernel[(grid_m, triton.cdiv(H, tiles["BLOCK_N"]))](
        h, w2, y, order, weights, block_ends, offsets, H, I, E=E, IEEE=ieee, **tiles, **launch
    )
    return y.view(N, k, H).sum(1)


BACKENDS = {
    "eager": experts_eager,
    "sorted": experts_sorted,
    "grouped_mm": experts_grouped_mm,
    "triton": triton_experts,
}


# --------------------------------------------------------------------------------------------
# Which backend runs where.
#
# Each fast path states what it needs (why_unavailable: device, compute capability, dtype,
# packages, training). `auto` takes the first of auto_candidates() whose needs are met; "sorted"
# (plain torch GEMMs) is the floor and runs everywhere. A fast path that fails at first use (an
# import, a compile, no C compiler for Triton's launcher, a launch out of resources, an
# architecture it does not support) is marked broken for that device and dtype, warned about
# once, and the next candidate computes the same result. An explicit choice is never swapped.
# --------------------------------------------------------------------------------------------

FLOOR = "sorted"
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Target:
    """Where a forward pass runs: device type, CUDA compute capability (None elsewhere), dtype."""

    device: str
    capability: Optional[Tuple[int, int]]
    dtype: torch.dtype

    @classmethod
    def of(cls, device, dtype: torch.dtype) -> "Target":
        return _target_of(torch.device(device), dtype)  # cached: every layer of every forward pass asks

    def __str__(self) -> str:
        cap = f" sm_{self.capability[0]}{self.capability[1]}" if self.capability else ""
        return f"{self.device}{cap} {str(self.dtype).replace('torch.', '')}"


@functools.lru_cache(maxsize=None)
def cuda_capability(index=None) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _target_of(device: torch.device, dtype: torch.dtype) -> Target:
    return Target(device.type, cuda_capability(device.index) if device.type == "cuda" else None, dtype)


def triton_available() -> bool:
    return triton is not None


def why_unavailable(name: str, target: Target, training: bool, triton_present: Optional[bool] = None) -> Optional[str]:
    """None if backend ``name`` can run on ``target``, else the reason in words."""
    triton_present = triton_available() if triton_present is None else triton_present
    if name not in BACKENDS:
        return f"unknown MoE implementation {name!r}; choose one of {', '.join(['auto', *BACKENDS])}"
    if name == "grouped_mm":
        if _grouped_mm() is None:
            return f"this torch ({torch.__version__}) has no grouped_mm; upgrade torch or use 'sorted'"
        if target.device == "cuda" and (target.dtype != torch.bfloat16 or (target.capability or (0, 0)) < (8, 0)):
            return f"torch's grouped_mm takes bf16 on CUDA sm_80 or newer, not {target}"
    if name == "triton":
        if not triton_present:
            return "triton is not installed (pip install triton)"
        if target.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"the triton kernels run on CUDA (or under TRITON_INTERPRET=1), not on {target.device}"
        if target.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"the triton kernels take fp16/bf16/fp32 activations, not {target.dtype}"
        if training:
            return "the triton kernels have no backward pass; use 'grouped_mm' or 'sorted' for training"
    return None


def auto_candidates(target: Target, training: bool, triton_present: Optional[bool] = None) -> List[Tuple[str, str]]:
    """`auto`'s choices for ``target``, fastest first, each with why; the last one, "sorted", runs everywhere."""
    plan = []
    cap = target.capability or (0, 0)
    if target.device == "cuda" and target.dtype in HALF:
        if why_unavailable("triton", target, training, triton_present) is None:
            if cap >= (8, 0):
                plan.append(("triton", f"fused gather+GEMM+GELU and GEMM+weight+scatter on tensor cores, no host sync ({target})"))
        if why_unavailable("grouped_mm", target, training) is None and cap >= (9, 0):
            plan.append(("grouped_mm", f"two grouped GEMMs per layer, no host sync (CUTLASS on sm_90+; {target})"))
    if target.device == "cuda" and cap < (8, 0):
        why = f"per-expert cuBLAS GEMMs on tensor cores: Triton emits no tensor-core (mma) instructions for sm_{cap[0]}{cap[1]}"
        if target.dtype == torch.bfloat16:
            why += "; bf16 has no tensor cores before sm_80 (emulated, slow): use float16"
    elif target.device == "cuda" and training:
        why = "training: a differentiable path (one host sync per layer to slice the segments)"
    elif target.device == "cuda":
        why = "the floor: per-expert cuBLAS GEMMs on contiguous segments"
    else:
        why = f"{target.device}: GEMM-bound, measured within a few percent of the other backends (benchmarks/RESULTS.md)"
    plan.append((FLOOR, why))
    return plan


def why_not_auto(name: str, target: Target, training: bool) -> str:
    """Why `auto` does not offer backend ``name`` on ``target`` (for the doctor)."""
    hard = why_unavailable(name, target, training)
    if hard:
        return hard
    cap = target.capability or (0, 0)
    if name == "eager":
        return "the reference loop: one host sync per expert, never chosen by auto"
    if target.device != "cuda":
        return f"on {target.device} the backends are within a few percent (GEMM-bound); sorted has the fewest steps"
    if target.dtype not in HALF:
        return f"auto uses the fused kernels in fp16/bf16 only; {str(target.dtype).replace('torch.', '')} runs cuBLAS"
    if name == "triton" and cap < (8, 0):
        return (f"compiles for sm_{cap[0]}{cap[1]}, but without tensor-core instructions: its dot runs on FMA units, "
                "a fraction of the tensor-core rate that cuBLAS reaches")
    if name == "grouped_mm" and cap < (9, 0):
        return "torch's grouped GEMM is fused (CUTLASS) on sm_90+ only; below that it loops over groups"
    return "not preferred here"


_BROKEN = {}  # (backend, Target) -> why it failed at first use


def is_broken(name: str, target: Target) -> bool:
    return (name, target) in _BROKEN


def mark_broken(name: str, target: Target, error: BaseException, instead: str, what: str = "expert kernel") -> None:
    """Remember a fast path (an expert or attention kernel) that failed on this device and dtype, and say so once."""
    if (name, target) in _BROKEN:
        return
    _BROKEN[(name, target)] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}"
    warnings.warn(
        f"NomicMoE: the {name!r} {what} failed at first use on {target} ({_BROKEN[(name, target)]}); "
        f"using {instead!r} from now on. The embeddings are unaffected; speed may be lower. "
        "`nomic-moe doctor` shows what runs here and why.",
        RuntimeWarning,
        stacklevel=3,
    )


def auto_choice(target: Target, training: bool) -> str:
    """The backend `auto` uses now on ``target``: the first candidate not marked broken."""
    for name, _ in auto_candidates(target, training):
        if not is_broken(name, target):
            return name
    return FLOOR


def run_first(names: List[str], target: Target, call, what: str):
    """(call(name), name) for the first of ``names`` that works on ``target``, fastest first.

    Shared by the expert backends and the attention kernels. A candidate that raises is marked
    broken (warned once) and the next one runs; the last one, the floor, runs unguarded: its
    errors are real errors.
    """
    names = [n for n in names if not is_broken(n, target)] or names[-1:]
    for i, name in enumerate(names):
        if i == len(names) - 1:
            return call(name), name
        try:
            return call(name), name
        except torch.cuda.OutOfMemoryError:
            raise  # not a property of the path: every path needs the memory
        except Exception as e:  # noqa: BLE001 - compile, launcher, resources, architecture: fall back
            mark_broken(name, target, e, names[i + 1], what)
    raise AssertionError("unreachable")


def run_auto(x, routing, w1, w2, training: bool):
    """(output, backend used): `auto`'s first candidate that works; failures fall through to the floor."""
    target = Target.of(x.device, x.dtype)
    names = [n for n, _ in auto_candidates(target, training)]
    return run_first(names, target, lambda name: BACKENDS[name](x, routing, w1, w2), "expert kernel")
