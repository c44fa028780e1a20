"""The few-row product kernel (small_gemm.c) for CPU inference: build, load, pack, call.

    kernel = small_gemm.load()          # None where it cannot run here; why_unavailable() says why
    packed = kernel.pack(w)             # w [out, in], fp32 or bf16, once per weight
    y = kernel.linear(x, packed, bias)  # == F.linear(x, w, bias) (tests/test_small_gemm.py)
    q = kernel.pack_int8(wq, scale)     # s8 [out, in] + per-channel scale (AVX512_VNNI)
    y = kernel.linear_int8(x, q, bias)  # == int8_matmul_per_token: the same s32 sums
    y = kernel.linear_grouped(xs, bounds, [packed_e, ...])  # an MoE layer's experts in one call:
                                        # rows bounds[e]:bounds[e+1] through expert e, as linear()

A short query gives each expert about 8 rows; oneDNN's GEMM reads the weight at 55-65% of the
memory's speed there, this kernel at 85-95% (RESULTS.md, "CPU: a few-row kernel of our own").
The C file is compiled once per CPU and compiler, with -march=native, into a cache folder
(NOMIC_MOE_KERNEL_CACHE, else ~/.cache/nomic_moe/kernels), atomically; it needs a C compiler
(CC, else cc). Where there is none, or NOMIC_MOE_SMALL_GEMM=0, the model keeps oneDNN's packed
weights: same results, slower short queries. It runs in torch's own OpenMP thread pool
(torch.get_num_threads()), since it links the libgomp that torch has already loaded.

Packed weights are cut from an Arena of 2 MiB-aligned blocks advised into transparent huge pages
(NOMIC_MOE_HUGE_PAGES=0: ordinary memory): a short query streams each expert matrix once, and with
4 KiB pages that is a TLB miss every 4 KiB.

The model takes it through ``model.set_cpu_kernel(kernel)`` (modeling_nomic_moe.py); ``install``
does that when the kernel is available.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from .encoder_layers import LayerRunner

SOURCES = [Path(__file__).with_name(name) for name in ("small_gemm.c", "short_attention.c", "encoder_layers.c")]  # one library
HEADERS = [Path(__file__).with_name("vec_math.h")]  # included by both: part of the build's key

# Rows per call up to which the kernel is used. Measured on the AVX-512 VMs (one MoE layer's
# experts, cold weights; RESULTS.md "CPU: a few-row kernel of our own"): fp32 1.35x oneDNN's packed
# product at 8 rows, 1.17x at 16, equal from 24 to 128 (beyond, the stored weights' GEMM is the
# fastest); bf16 1.5x at 8 rows, equal at 32; int8 1.67x FBGEMM at 8 rows, equal at 32. The int8
# kernel runs per-token activations, whose other path is torch._int_mm: ours is 1.2-1.4x faster at
# 64 rows and as fast at 128 (AMD EPYC, 2026-12-07), and a 128-token query 1.11x faster with the
# kernel up to 128 rows than up to 32 (FBGEMM's per-batch path is 10-20% faster at 128 rows on Intel).
MAX_ROWS = {torch.float32: 128, torch.bfloat16: 128, torch.int8: 128}

# What a build of these files computes on each ISA of the CPU table (cpu_nomic_moe.CPU_TABLE), as the
# C files' #if's decide it: the -march that stands for the ISA and the products' dtypes. Every ISA of
# the table has AVX2 + FMA at least, so every build has the attention call and the one call for every
# layer (fp32; bf16 and int8 where it computes them). `doctor --cpu ISA` shows another CPU's kernel
# from this; the tests hold it to the builds (their exported calls, and on this CPU their answers).
# int8 and bf16 stay with the libraries elsewhere (FBGEMM; oneDNN's emulated bf16). The avx512 row
# stands for Skylake-SP; an AVX-512 CPU with VNNI but no BF16 (Cascade Lake, Ice Lake) builds int8 too
# (its build, -march=cascadelake, runs the int8 one call in the tests: conftest.vnni_kernel).
BUILDS = {
    "avx2": ("haswell", ("float32",)),
    "avx512": ("skylake-avx512", ("float32",)),
    "avx512_bf16": ("cooperlake", ("float32", "bfloat16", "int8")),
    "amx": ("sapphirerapids", ("float32", "bfloat16", "int8")),
}


class KernelUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class Packed:
    """A weight [n, k] in the kernel's panels (see small_gemm.c)."""
    panels: torch.Tensor
    n: int
    k: int


@dataclass(frozen=True)
class PackedInt8:
    """An s8 weight [n, k] in quads of k per column, its column sums and scales (see small_gemm.c)."""
    panels: torch.Tensor  # [n/NB, k/4, NB, 4] int8
    colsum: torch.Tensor  # [n padded] int32
    scale: torch.Tensor  # [n padded] fp32
    n: int
    k: int


_PTR = ctypes.c_void_p
_I64 = ctypes.c_int64
_ARGS = [_PTR, _I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, ctypes.c_int]


class Group:
    """An MoE layer's packed matrices (one shape, one kind) with the C arrays of their addresses,
    made once (``SmallGemm.group``): rebuilding the arrays on every grouped call cost tens of
    microseconds a layer. It indexes and iterates like the list it was made from."""

    def __init__(self, packs, fields):
        self.packs = tuple(packs)
        if not self.packs or any(type(p) is not type(self.packs[0]) or (p.n, p.k) != (self.packs[0].n, self.packs[0].k)
                                 for p in self.packs):
            raise ValueError("a grouped call needs one or more packed weights of one shape")
        self.n, self.k = self.packs[0].n, self.packs[0].k
        self.dtype = self.packs[0].panels.dtype
        self.arrays = tuple((_PTR * len(self.packs))(*(getattr(p, f).data_ptr() for p in self.packs)) for f in fields)

    def __len__(self):
        return len(self.packs)

    def __getitem__(self, e):
        return self.packs[e]

    def __iter__(self):
        return iter(self.packs)


class Arena:
    """Where the packed weights live: blocks of 2 MiB-aligned memory advised into 2 MiB pages
    (nm_alloc_huge), cut into consecutive pieces. Pieces share blocks so that a 4.7 MB matrix does
    not round up to 6 MB of huge pages; an untouched tail costs no memory. A block is freed when the
    arena has moved on and every tensor cut from it is gone (each piece's buffer holds its block)."""

    BLOCK = 64 << 20
    ALIGN = 4096  # each piece starts on a page of its own

    def __init__(self, lib):
        self._alloc, self._free = lib.nm_alloc_huge, lib.nm_free
        self._alloc.argtypes, self._alloc.restype = [_I64, ctypes.POINTER(ctypes.c_int)], _PTR
        self._free.argtypes, self._free.restype = [_PTR], None
        self._lock = threading.Lock()
        self._block = None  # (block, next free offset)
        self.huge = None  # whether the OS took the advice (None: nothing allocated yet)
        self.enabled = os.environ.get("NOMIC_MOE_HUGE_PAGES", "1") != "0"  # 0: ordinary torch memory

    def _new_block(self, size):
        huge = ctypes.c_int(0)
        ptr = self._alloc(size, ctypes.byref(huge))
        if not ptr:
            return None
        self.huge = bool(huge.value)
        block = _Block(ptr, size, self._free)
        return block

    def empty(self, shape, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in the arena (ordinary memory if none can be had)."""
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        if nbytes == 0 or not self.enabled:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            if self._block is None or self._block[1] + nbytes > self._block[0].size:
                block = self._new_block(max(self.BLOCK, -(-nbytes // self.ALIGN) * self.ALIGN))
                if block is None:
                    return torch.empty(shape, dtype=dtype)
                self._block = (block, 0)
            block, offset = self._block
            self._block = (block, offset + -(-nbytes // self.ALIGN) * self.ALIGN)
        piece = (ctypes.c_char * nbytes).from_address(block.ptr + offset)
        weakref.finalize(piece, _keep, block)  # the block outlives every tensor on its memory
        return torch.frombuffer(piece, dtype=dtype, count=nbytes // dtype.itemsize).view(shape)


def _keep(block):
    pass


def _vector(v: Optional[torch.Tensor], dtype: torch.dtype, n: int) -> Optional[torch.Tensor]:
    """A bias as the kernel reads it: n contiguous values in ``dtype`` (the tensor itself when it is
    one already: no copy, and no autograd view, per call), or None."""
    if v is None:
        return None
    if v.dtype != dtype or not v.is_contiguous():
        v = v.detach().to(dtype).contiguous()
    if v.shape != (n,):
        raise ValueError(f"bias {tuple(v.shape)} does not fit {n} output columns")
    return v


class _Block:
    def __init__(self, ptr, size, free):
        self.ptr, self.size, self._free = ptr, size, free

    def __del__(self):
        self._free(self.ptr)


class SmallGemm:
    """The loaded kernel: the CPU-kernel interface of modeling_nomic_moe (name, accepts, pack, linear)."""

    name = "small-rows kernel"

    def __init__(self, path: Path):
        self.path = Path(path)
        lib = ctypes.CDLL(str(self.path))
        self.width = lib.nm_panel_width()
        self.arena = Arena(lib)  # the packed weights' memory
        self.bf16 = bool(lib.nm_has_bf16())
        self._f32 = lib.nm_linear_f32
        self._f32.argtypes, self._f32.restype = _ARGS, None
        self._bf16 = None
        if self.bf16:
            self._bf16 = lib.nm_linear_bf16
            self._bf16.argtypes, self._bf16.restype = _ARGS, None
        self.int8 = bool(lib.nm_has_int8())  # AVX512_VNNI: u8 x s8 dot products
        if self.int8:
            self._s8 = lib.nm_linear_s8
            self._s8.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, ctypes.c_int, ctypes.c_int]
            self._s8.restype = ctypes.c_int
            self._grouped_s8 = lib.nm_grouped_s8
            self._grouped_s8.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _I64, ctypes.c_int,
                                         ctypes.c_int]
            self._grouped_s8.restype = ctypes.c_int
        # the int8 calls take gelu=True: F.gelu of x on the way in, an MLP's down product without a
        # GELU pass between the two (within 1.5e-6 of F.gelu before quantizing; see quantize_row)
        self.fuses_gelu_int8 = self.int8
        if self.int8:
            self._gelu = lib.nm_gelu_f32
            self._gelu.argtypes, self._gelu.restype = [_PTR, _I64, _PTR], None
        self.attention_ok = bool(lib.nm_has_attention())  # AVX-512 or AVX2: RoPE + softmax attention in one call
        self.fuses_gelu_float = bool(lib.nm_fuses_gelu())  # the float products take gelu=True too
        self._attention = lib.nm_attention
        self._attention.argtypes = [_PTR, _I64, ctypes.c_int, _I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_float, _PTR,
                                    ctypes.c_int]
        self._attention.restype = ctypes.c_int
        self._dispatch, self._combine = lib.nm_moe_dispatch, lib.nm_moe_combine
        self._dispatch.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR]
        self._combine.argtypes = [_PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int, _PTR, _PTR]
        self._dispatch.restype = self._combine.restype = ctypes.c_int
        self._grouped = {torch.float32: lib.nm_grouped_f32}
        if self.bf16:
            self._grouped[torch.bfloat16] = lib.nm_grouped_bf16
        for fn in self._grouped.values():
            fn.argtypes, fn.restype = [_PTR, _I64, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64, ctypes.c_int, ctypes.c_int], None
        self._max_rows = {dtype: MAX_ROWS[dtype] for dtype in self.dtypes()}  # accepts(), asked before every product
        self.layers = LayerRunner(lib, self) if lib.nm_has_layers() else None  # AVX-512 or AVX2: a model's layers in one call

    def dtypes(self):
        """What it computes: fp32, bf16 (AVX512_BF16) and int8 (per-token activations, AVX512_VNNI)."""
        return (torch.float32,) + ((torch.bfloat16,) if self.bf16 else ()) + ((torch.int8,) if self.int8 else ())

    def accepts(self, rows: int, dtype: torch.dtype) -> bool:
        return rows <= self._max_rows.get(dtype, -1)

    def max_rows(self, dtype: torch.dtype) -> int:
        """The most rows a product (and the encoder-layers call: tokens) in ``dtype`` takes; 0: none."""
        return self._max_rows.get(dtype, 0)

    def pack(self, w: torch.Tensor) -> Packed:
        """w [n, k] -> panels [n/NB, k, NB] (fp32) or [n/NB, k/2, NB, 2] (bf16 pairs), n padded with zeros."""
        if w.dtype not in self.dtypes() or w.dim() != 2 or w.device.type != "cpu":
            raise ValueError(f"the small-rows kernel packs 2-d CPU weights in {self.dtypes()}, not {w.dtype} {tuple(w.shape)}")
        n, k = w.shape
        if w.dtype == torch.bfloat16 and k % 2:
            raise ValueError(f"bf16 weights need an even input width, not {k}")
        nb = self.width
        padded = w.new_zeros(-(-n // nb) * nb, k)
        padded[:n] = w.detach()
        if w.dtype == torch.float32:
            panels = padded.view(-1, nb, k).transpose(1, 2)  # [P, k, NB]
        else:
            panels = padded.view(-1, nb, k // 2, 2).transpose(1, 2)  # [P, k/2, NB, 2]
        return Packed(self.arena.empty(panels.shape, panels.dtype).copy_(panels), n, k)

    @staticmethod
    def _rows(x: torch.Tensor, packed, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """x checked against the packed weight, with unit column stride, and the output [M, n] to fill."""
        if x.dim() != 2 or x.shape[1] != packed.k or x.dtype != dtype:
            raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not fit a packed [{packed.n}, {packed.k}] weight "
                             f"(it takes {dtype} rows)")
        if x.stride(1) != 1:
            x = x.contiguous()
        return x, x.new_empty(x.shape[0], packed.n)

    def linear(self, x: torch.Tensor, packed: Packed, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [M, k] -> [M, n] = x @ w.T + bias, in x's dtype (the packed weight's)."""
        x, y = self._rows(x, packed, packed.panels.dtype)
        if x.shape[0] == 0:
            return y
        bias = _vector(bias, x.dtype, packed.n)
        call = self._f32 if x.dtype == torch.float32 else self._bf16
        call(x.data_ptr(), x.stride(0), x.shape[0], packed.k, packed.panels.data_ptr(), packed.n,
             None if bias is None else bias.data_ptr(), y.data_ptr(), packed.n, torch.get_num_threads())
        return y

    def group(self, packs) -> Group:
        """An MoE layer's packed matrices (all Packed, or all PackedInt8, of one shape) for the grouped
        calls, their addresses gathered once; linear_grouped and linear_int8_grouped also take a list."""
        packs = list(packs)
        return Group(packs, ("panels", "colsum", "scale") if packs and isinstance(packs[0], PackedInt8) else ("panels",))

    def _groups(self, xs: torch.Tensor, bounds, packs, kind, dtype: torch.dtype):
        """Checks a grouped call: xs [M, k] in ``dtype``, bounds [E+1] from 0 to M, E packs of one shape
        and ``kind``. Returns xs with unit column stride, the output [M, n], the bounds as a C array and
        the packs as a Group."""
        group = packs if isinstance(packs, Group) else self.group(packs)
        if not isinstance(group.packs[0], kind):
            raise ValueError(f"this grouped call takes {kind.__name__} weights, not {type(group.packs[0]).__name__}")
        if len(bounds) != len(group) + 1 or bounds[0] != 0 or bounds[-1] != xs.shape[0] \
                or any(hi < lo for lo, hi in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"bounds {list(bounds)} do not split {xs.shape[0]} rows among {len(group)} experts")
        xs, y = SmallGemm._rows(xs, group, dtype)
        return xs, y, (_I64 * len(bounds))(*bounds), group

    def linear_grouped(self, xs: torch.Tensor, bounds, packs, gelu: bool = False) -> torch.Tensor:
        """Rows grouped by expert: y[bounds[e]:bounds[e+1]] = linear(xs[bounds[e]:bounds[e+1]], packs[e]),
        the same sums, in one call (one parallel region for all the experts, no bias). ``packs``: a
        list of Packed, or their Group (``group``). gelu=True (``fuses_gelu_float``, AVX-512 or AVX2): F.gelu of
        each output as it is written (gelu_ps: within 1.5e-6 of F.gelu; in bf16 of the fp32 sum, then
        rounded once): an MLP's up product, as the encoder-layers call runs it."""
        if gelu and not self.fuses_gelu_float:
            raise ValueError("the float products take the GELU only where the kernel is built for AVX-512 or AVX2")
        dtype = packs.dtype if isinstance(packs, Group) else packs[0].panels.dtype if packs else torch.float32
        xs, y, c_bounds, group = self._groups(xs, bounds, packs, Packed, dtype)
        if xs.shape[0]:
            self._grouped[xs.dtype](xs.data_ptr(), xs.stride(0), group.k, len(group), c_bounds, *group.arrays, group.n,
                                    None, y.data_ptr(), group.n, bool(gelu), torch.get_num_threads())
        return y

    def linear_int8_grouped(self, xs: torch.Tensor, bounds, packs, gelu: bool = False) -> torch.Tensor:
        """As linear_grouped, with PackedInt8 weights (or their Group): linear_int8 of each expert's rows
        (of F.gelu(xs) with gelu=True, see linear_int8), in one call."""
        xs, y, c_bounds, group = self._groups(xs, bounds, packs, PackedInt8, torch.float32)
        if xs.shape[0]:
            status = self._grouped_s8(xs.data_ptr(), xs.stride(0), group.k, len(group), c_bounds, *group.arrays, group.n,
                                      None, y.data_ptr(), group.n, bool(gelu), torch.get_num_threads())
            if status != 0:
                raise MemoryError(f"the int8 kernel could not allocate {xs.shape[0] * packs[0].k} bytes for its activations")
        return y

    def moe_route(self, x: torch.Tensor, experts: torch.Tensor, num_experts: int):
        """dispatch_sorted's ordering and gather (experts_nomic_moe.py) in one call. x [N, H] (fp32 or
        bf16), each token's experts [N, k] -> (xs [N*k, H]: x's rows grouped by expert, order [N*k]:
        the (token, slot) pair of each row, stable, counts [E], bounds [E+1]: each expert's first row)."""
        N, k = experts.shape
        if x.dim() != 2 or x.shape[0] != N or x.dtype not in (torch.float32, torch.bfloat16) or x.stride(1) != 1:
            raise ValueError(f"moe_route takes x [N, H] fp32 or bf16 with unit column stride and experts [N, k], not "
                             f"{tuple(x.shape)} {x.dtype} and {tuple(experts.shape)}")
        experts = experts.to(torch.int64).contiguous()
        xs = x.new_empty(N * k, x.shape[1])
        order = torch.empty(N * k, dtype=torch.int64)
        counts = torch.empty(num_experts, dtype=torch.int64)
        bounds = torch.empty(num_experts + 1, dtype=torch.int64)
        status = self._dispatch(experts.data_ptr(), N, k, num_experts, x.data_ptr(), x.stride(0), x.shape[1],
                                x.element_size(), order.data_ptr(), counts.data_ptr(), bounds.data_ptr(), xs.data_ptr())
        if status == -1:
            raise ValueError(f"an expert index outside 0..{num_experts - 1}: {experts.min().item()}..{experts.max().item()}")
        if status != 0:
            raise MemoryError("moe_route could not allocate its scratch")
        return xs, order, counts, bounds

    def moe_combine(self, ys: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, bias: Optional[torch.Tensor] = None):
        """combine (experts_nomic_moe.py) + bias, in one call, with torch's roundings: ys [N*k, H] in
        expert order (moe_route's order), weights [N, k] in ys' dtype -> [N, H]."""
        N, k = weights.shape
        if ys.dim() != 2 or ys.shape[0] != N * k or order.shape != (N * k,) or order.dtype != torch.int64 \
                or weights.dtype != ys.dtype \
                or ys.dtype not in (torch.float32, torch.bfloat16) or (bias is not None and bias.shape != (ys.shape[1],)):
            raise ValueError(f"moe_combine takes ys [N*k, H], order [N*k], weights [N, k] in ys' dtype and bias [H], not "
                             f"{tuple(ys.shape)} {ys.dtype}, {tuple(order.shape)}, {tuple(weights.shape)} {weights.dtype}")
        ys, weights = ys.contiguous(), weights.contiguous()
        if bias is not None:
            bias = bias.detach().to(ys.dtype).contiguous()
        y = ys.new_empty(N, ys.shape[1])
        status = self._combine(ys.data_ptr(), order.data_ptr(), weights.data_ptr(), N, k, ys.shape[1],
                               ys.dtype == torch.bfloat16, None if bias is None else bias.data_ptr(), y.data_ptr())
        if status != 0:
            raise MemoryError("moe_combine could not allocate its scratch")
        return y

    def accepts_attention(self, dtype: torch.dtype, head_dim: int) -> bool:
        return self.attention_ok and dtype in (torch.float32, torch.bfloat16)[:1 + self.bf16] \
            and head_dim % 16 == 0 and 16 <= head_dim <= 128

    def attention(self, qkv: torch.Tensor, bounds, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """qkv [N, 3, h, D] (fp32, or bf16 where the kernel has it), texts at token offsets ``bounds``
        [B+1]; cos, sin [N, D] fp32 -> ctx [N, h, D] in qkv's dtype: per text and head,
        softmax(rope(q) rope(k)^T / sqrt(D)) v, as apply_rope + attend_per_text (modeling_nomic_moe.py)."""
        N, three, h, D = qkv.shape
        if three != 3 or not self.accepts_attention(qkv.dtype, D):
            raise ValueError(f"the attention kernel takes [N, 3, h, D] fp32{' or bf16' if self.bf16 else ''} with D a "
                             f"multiple of 16 up to 128 (AVX-512 or AVX2: {'yes' if self.attention_ok else 'no'}), not "
                             f"{tuple(qkv.shape)} {qkv.dtype}")
        if qkv.stride()[1:] != (h * D, D, 1):
            qkv = qkv.contiguous()
        if len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != N or any(hi < lo for lo, hi in zip(bounds[:-1], bounds[1:])):
            raise ValueError(f"bounds {list(bounds)} do not split {N} tokens into texts")
        cos, sin = (t.reshape(N, D).float().contiguous() for t in (cos, sin))
        ctx = qkv.new_empty(N, h, D)
        if N:
            status = self._attention(qkv.data_ptr(), qkv.stride(0), qkv.dtype == torch.bfloat16, h, D, len(bounds) - 1,
                                     (_I64 * len(bounds))(*bounds), cos.data_ptr(), sin.data_ptr(), D**-0.5,
                                     ctx.data_ptr(), torch.get_num_threads())
            if status != 0:
                raise MemoryError("the attention kernel could not allocate its scratch")
        return ctx

    def pack_int8(self, wq: torch.Tensor, scale: torch.Tensor) -> PackedInt8:
        """s8 weight [n, k] (one scale per output channel, [n]) -> quads of k per column, n padded."""
        n, k = wq.shape
        if not self.int8 or wq.dtype != torch.int8 or k % 4:
            raise ValueError(f"the int8 kernel packs s8 weights with an input width divisible by 4 (AVX512_VNNI: "
                             f"{'yes' if self.int8 else 'no'}), not {wq.dtype} {tuple(wq.shape)}")
        nb = self.width
        padded = wq.new_zeros(-(-n // nb) * nb, k)
        padded[:n] = wq
        quads = padded.view(-1, nb, k // 4, 4).transpose(1, 2)  # [P, k/4, NB, 4]
        panels = self.arena.empty(quads.shape, quads.dtype).copy_(quads)
        scales = torch.zeros(padded.shape[0])
        scales[:n] = scale.float()
        return PackedInt8(panels, padded.sum(1, dtype=torch.int32), scales, n, k)

    def gelu(self, x: torch.Tensor) -> torch.Tensor:
        """The GELU the int8 calls take with gelu=True, alone (fp32; for the tests)."""
        if not self.int8 or x.dtype != torch.float32:
            raise ValueError(f"the kernel's GELU is part of its int8 calls (AVX512_VNNI: {'yes' if self.int8 else 'no'}) "
                             f"and takes fp32, not {x.dtype}")
        x = x.contiguous()
        y = torch.empty_like(x)
        self._gelu(x.data_ptr(), x.numel(), y.data_ptr())
        return y

    def linear_int8(self, x: torch.Tensor, packed: PackedInt8, bias: Optional[torch.Tensor] = None,
                    gelu: bool = False) -> torch.Tensor:
        """x [M, k] fp32 -> [M, n] fp32: int8_matmul_per_token's math (int8_nomic_moe.py), the same s32 sums.
        gelu=True: of F.gelu(x), the GELU taken as each row is quantized (gelu_ps in vec_math.h, within
        1.5e-6 of F.gelu: the same s8 numbers except where a value lay that close to a half step)."""
        x, y = self._rows(x, packed, torch.float32)
        if x.shape[0] == 0:
            return y
        bias = _vector(bias, torch.float32, packed.n)
        status = self._s8(x.data_ptr(), x.stride(0), x.shape[0], packed.k, packed.panels.data_ptr(), packed.colsum.data_ptr(),
                          packed.scale.data_ptr(), packed.n, None if bias is None else bias.data_ptr(), y.data_ptr(),
                          packed.n, bool(gelu), torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"the int8 kernel could not allocate {x.shape[0] * packed.k} bytes for its activations")
        return y

    def run_layers(self, model, x: torch.Tensor, packing, hooks: bool = True):
        """Every layer of ``model`` (a NomicMoEModel whose modules hold this kernel) in one call:
        (x after the last layer, expert counts [MoE layers, E]), or None where the call does not take
        them (encoder_layers.py says when); NomicMoEModel.forward asks this before its own loop."""
        return self.layers.run(model, x, packing, hooks) if self.layers is not None else None

    # a model holding the kernel is deep-copied (sentence-transformers) and pickled (Ray): the
    # copy shares the loaded library, and another process loads its own
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_load_or_raise, ())

    def __repr__(self):
        return (f"SmallGemm({self.path.name}, panel width {self.width}, bf16 {'yes' if self.bf16 else 'no'}, "
                f"int8 {'yes' if self.int8 else 'no'})")


def huge_page_mode() -> str:
    """Linux's transparent huge page setting (the arena asks for them with madvise): always, madvise,
    never, or unknown (another OS)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    chosen = [w.strip("[]") for w in text.split() if w.startswith("[")]
    return chosen[0] if chosen else "unknown"


def enabled() -> bool:
    return os.environ.get("NOMIC_MOE_SMALL_GEMM", "1") != "0"


def cache_dir() -> Path:
    if os.environ.get("NOMIC_MOE_KERNEL_CACHE"):
        return Path(os.environ["NOMIC_MOE_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nomic_moe" / "kernels"


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _flag_sets(march: str):
    return (["-O3", f"-march={march}", "-fopenmp"], ["-O3", f"-march={march}"])  # without OpenMP: one thread


def _key(cc: str, flags) -> str:
    """The library is valid for this source, compiler, flags and CPU (-march=native)."""
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    from nomic_moe_modeling.cpu_nomic_moe import cpu_flags

    h = hashlib.sha256()
    for part in (*(f.read_bytes() for f in SOURCES + HEADERS), version.encode(), " ".join(flags).encode(), " ".join(sorted(cpu_flags())).encode()):
        h.update(part)
    return h.hexdigest()[:16]


def build(march: str = "native") -> Path:
    """The compiled library for this CPU (made once; later calls find it). Raises KernelUnavailable.
    ``march`` another target (the tests build "haswell", AVX2 only, to run that path on any x86)."""
    cc = compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler (set CC, or install gcc or clang)")
    errors = []
    for flags in _flag_sets(march):
        out = cache_dir() / f"small_gemm-{_key(cc, flags)}.so"
        if out.exists():
            return out
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
        except OSError as e:
            raise KernelUnavailable(f"cannot write the kernel cache {out.parent}: {e}") from e
        try:
            r = subprocess.run([cc, *flags, "-shared", "-fPIC", *map(str, SOURCES), "-o", tmp, "-lm"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, out)  # atomic: concurrent builders each write their own temp file
                return out
            errors.append(f"{cc} {' '.join(flags)}: {r.stderr.strip()[-300:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{cc}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise KernelUnavailable("compiling the kernels (small_gemm.c, short_attention.c, encoder_layers.c) failed: " + " | ".join(errors))


@functools.lru_cache(maxsize=None)
def _load():
    if not enabled():
        return None, "turned off (NOMIC_MOE_SMALL_GEMM=0)"
    try:
        return SmallGemm(build()), None
    except (KernelUnavailable, OSError, AttributeError) as e:
        return None, str(e)


def load() -> Optional[SmallGemm]:
    """The kernel, built on first use; None where it cannot run (why_unavailable() says why)."""
    return _load()[0]


def why_unavailable() -> Optional[str]:
    return _load()[1]


def _load_or_raise() -> SmallGemm:
    kernel = load()
    if kernel is None:
        raise KernelUnavailable(why_unavailable())
    return kernel


def install(model) -> Optional[SmallGemm]:
    """Give ``model`` the kernel for its short inputs: a NomicMoEModel on the CPU, or a module that holds
    one (a SentenceTransformer: its Transformer module's auto_model). Returns the kernel, or None where
    it cannot run here or ``model`` holds no such model (then the oneDNN packed weights serve)."""
    kernel = load()
    if kernel is None:
        return None
    if hasattr(model, "set_cpu_kernel"):
        targets = [model]
    else:  # the encoder models inside (a NomicMoELinear also takes a kernel, but holds no layers)
        targets = [m for m in model.modules() if hasattr(m, "set_cpu_kernel") and hasattr(m, "encoder")] \
            if hasattr(model, "modules") else []
    for m in targets:
        m.set_cpu_kernel(kernel)
    return kernel if targets else None
