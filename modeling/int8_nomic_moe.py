"""int8 on the CPU: int8 weights per output channel, int8 activations quantized per call.

`NomicMoEModel.quantize_int8()` swaps, in place, the matrices of the chosen groups for int8 ones:

  experts    each expert's two matrices (w1[e] [I, H]; w2[e] packed transposed, [H, I])
  attention  Wqkv and out_proj of every layer
  mlp        fc1 and fc2 of the dense layers

The router, the LayerNorms, the embeddings and pooling stay in float (fp32), and so does every
activation between the matrices. Weights are s8, symmetric, one scale per output channel. The
activations are quantized on the fly, two ways (`activations=`):

  per_batch  (default) one `torch.ops.quantized.linear_dynamic` call: one u8 scale over all the
             call's tokens (full range: reduce_range=False), on the quantized engine the CPU's row
             of the ISA table names (cpu_nomic_moe.CPU_TABLE: oneDNN on AMX, FBGEMM on AVX-512 and
             AVX2). The fastest; batch partners move a vector by int8 rounding;
  per_token  each token's row gets its own scale (symmetric s8), the product is `torch._int_mm`
             (oneDNN's s8 x s8 -> s32 GEMM) and the epilogue multiplies by the row's and the
             channel's scales. A row's int8 product depends on that row alone, so batch partners
             reach a vector only through the float parts (router, attention, LayerNorms), whose
             last-bit differences an int8 rounding step can amplify: about 4x less drift than
             per_batch, not fp32's exact invariance. 10-20% slower for one query with VNNI/AMX,
             and as slow as fp32 with oneDNN capped at AVX2 (benchmarks/int8_gate.py, RESULTS.md).

torch marks the quantized tensor API used for per_batch and for quantizing the weights
(torch.quantize_per_channel, the torch.ao.quantization flow) as deprecated in favour of torchao;
the kernels themselves are the maintained FBGEMM and oneDNN ones. Weights are quantized (and for
per_batch packed in the engine's layout) once, when quantize_int8() runs.
"""

import contextlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .experts_nomic_moe import PackCache, as_groups

GROUPS = ("experts", "attention", "mlp")
ACTIVATIONS = ("per_batch", "per_token")


@contextlib.contextmanager
def quantized_engine(name: str):
    """torch's quantized engine set to ``name`` for the block (prepacking happens in its layout)."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] float -> qint8, symmetric, one scale per output channel."""
    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(1) / 127.0).clamp(min=1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # the quantized-tensor API's deprecation notice (see the module docstring)
        warnings.simplefilter("ignore")
        return torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)


def check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")


def quantize_rows(x: torch.Tensor):
    """[M, K] float -> (s8 [M, K], scale [M, 1]): symmetric, one scale per row (per token)."""
    scale = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
    return (x / scale).round_().to(torch.int8), scale


def int8_matmul_per_token(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """[M, K] float @ (s8 [N, K] with scale [N]).T (+ bias) -> [M, N] fp32, activations quantized per row."""
    q, x_scale = quantize_rows(x)
    y = torch._int_mm(q, wq.t()).float().mul_(x_scale * w_scale)  # s32 -> fp32, exact up to the scales
    return y.add_(bias) if bias is not None else y


class Int8Linear(nn.Module):
    """y = x @ W.T + b, with W int8 per output channel and x quantized per call. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], engine: str, activations: str = "per_batch"):
        super().__init__()
        check_activations(activations)
        self.out_features, self.in_features = weight.shape
        self.engine = engine
        self.activations = activations
        # per_token only: a CPU kernel of the caller's (NomicMoEModel.set_cpu_kernel) with the same s32 sums for the
        # calls it accepts (accepts(rows, torch.int8), pack_int8(wq, scale), linear_int8(x, packed, bias))
        self.cpu_kernel, self._kernel_pack = None, PackCache()
        b = None if bias is None else bias.detach().float().contiguous()
        q = quantize_weight(weight)
        if activations == "per_token":
            self._wq = q.int_repr().contiguous()  # [N, K] s8: _int_mm reads its transpose without a copy
            self._w_scale = q.q_per_channel_scales().float()  # [N]
            self._bias = b
        else:
            with quantized_engine(engine):
                self._packed = torch.ops.quantized.linear_prepack(q, b)

    def set_cpu_kernel(self, kernel):
        self.cpu_kernel = kernel
        self._kernel_pack.clear()

    def kernel_pack(self):
        """This matrix in the CPU kernel's int8 layout (per_token only), made on first use. The s8
        weight is made once, in __init__, and never changes, so the copy needs no key check (a few
        microseconds a call, 132 calls a forward pass); set_cpu_kernel drops it."""
        packed = self._kernel_pack.value
        if packed is None:
            packed = self._kernel_pack.get(self.cpu_kernel.pack_int8, self._wq, self._w_scale)
        return packed

    @classmethod
    def from_linear(cls, linear: nn.Linear, engine: str, activations: str = "per_batch") -> "Int8Linear":
        return cls(linear.weight, linear.bias, engine, activations)

    def forward(self, x: torch.Tensor, gelu_in: bool = False) -> torch.Tensor:
        """gelu_in: of F.gelu(x) (an MLP's down product), the GELU taken inside the kernel's call where
        it can (``fuses_gelu_int8``: as each row is quantized, within 1.5e-6 of F.gelu), else first."""
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        kernel = self.cpu_kernel
        on_kernel = self.activations == "per_token" and kernel is not None and kernel.accepts(flat.shape[0], torch.int8)
        fused = gelu_in and on_kernel and getattr(kernel, "fuses_gelu_int8", False)
        if gelu_in and not fused:
            flat = F.gelu(flat)
        if fused:
            y = kernel.linear_int8(flat, self.kernel_pack(), self._bias, gelu=True)
        elif on_kernel:
            y = kernel.linear_int8(flat, self.kernel_pack(), self._bias)
        elif self.activations == "per_token":
            y = int8_matmul_per_token(flat, self._wq, self._w_scale, self._bias)
        else:
            y = torch.ops.quantized.linear_dynamic(flat, self._packed, False)  # reduce_range=False: full u8 range
        return y.view(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        kernel = "torch._int_mm, per-token activations" if self.activations == "per_token" else f"{self.engine}, per-batch activations"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({kernel})"


class Int8Experts(nn.Module):
    """One MoE layer's experts in int8: ups[e] = w1[e] ([I, H]), downs[e] = w2[e].T ([H, I])."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, engine: str, activations: str = "per_batch"):
        super().__init__()
        self.ups = nn.ModuleList(Int8Linear(w1[e], None, engine, activations) for e in range(w1.shape[0]))
        self.downs = nn.ModuleList(Int8Linear(w2[e].T, None, engine, activations) for e in range(w2.shape[0]))
        self._groups = PackCache()  # (kernel, ups, downs) for the grouped calls, made once per kernel

    def forward(self, x: torch.Tensor, routing, dispatch) -> torch.Tensor:
        """Same dispatch as experts_sorted (``dispatch`` is experts_nomic_moe.dispatch_sorted)."""
        return dispatch(x, routing, len(self.ups), lambda e, rows: self.downs[e](self.ups[e](rows), gelu_in=True), self.grouped)

    def grouped_kernel(self, rows: int):
        """The CPU kernel whose grouped int8 calls take every segment of up to ``rows`` rows, or None."""
        kernel = self.ups[0].cpu_kernel
        if kernel is None or not hasattr(kernel, "linear_int8_grouped") or not kernel.accepts(rows, torch.int8) \
                or any(m.cpu_kernel is not kernel or m.activations != "per_token" for m in (*self.ups, *self.downs)):
            return None
        return kernel

    def grouped(self, xs: torch.Tensor, bounds) -> Optional[torch.Tensor]:
        """Every expert at once on a CPU kernel with grouped int8 calls, where it takes each segment:
        the sums of the per-expert calls, in two calls (all the ups, one GELU, all the downs); else None."""
        kernel = self.grouped_kernel(max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])))
        if kernel is None:
            return None
        xs = xs if xs.dtype == torch.float32 else xs.float()
        ups, downs = self.kernel_groups(kernel)
        h = kernel.linear_int8_grouped(xs, bounds, ups)
        if getattr(kernel, "fuses_gelu_int8", False):  # the GELU taken as the down products quantize h
            return kernel.linear_int8_grouped(h, bounds, downs, gelu=True)
        return kernel.linear_int8_grouped(F.gelu(h), bounds, downs)

    def set_cpu_kernel(self, kernel):
        """Drops the grouped copies (each matrix's own copy is dropped by its Int8Linear.set_cpu_kernel)."""
        self._groups.clear()

    def kernel_groups(self, kernel):
        """Every expert's up and down matrices in ``kernel``'s layout, as the kernel's groups where it
        makes them (``group``: their addresses gathered once), else as lists; made once per kernel."""
        made = self._groups.value
        if made is None or made[0] is not kernel:
            ups, downs = as_groups(kernel, [m.kernel_pack() for m in self.ups], [m.kernel_pack() for m in self.downs])
            self._groups.value = made = (kernel, ups, downs)
        return made[1], made[2]
