"""int8 on the CPU: int8 weights per output channel, int8 activations quantized per call.

`NomicMoEModel.quantize_int8()` swaps, in place, the matrices of the chosen groups for int8 ones:

  experts    each expert's two matrices (w1[e] [I, H]; w2[e] packed transposed, [H, I])
  attention  Wqkv and out_proj of every layer
  mlp        fc1 and fc2 of the dense layers

The router, the LayerNorms, the embeddings and pooling stay in float (fp32), and so does every
activation between the matrices. Each int8 matrix is one `torch.ops.quantized.linear_dynamic`
call: the activations are quantized to u8 per call (per tensor, full range: reduce_range=False),
multiplied with s8 weights (symmetric, one scale per output channel) into s32, and dequantized
to fp32 with the bias added.

The kernel comes from torch's quantized engines, chosen by the CPU's row of the ISA table
(cpu_nomic_moe.CPU_TABLE): oneDNN on AMX, FBGEMM on AVX-512 and AVX2. torch marks the quantized
tensor API used here (torch.quantize_per_channel, the torch.ao.quantization flow) as deprecated in
favour of torchao; the kernels themselves are the maintained FBGEMM and oneDNN ones. Weights are
quantized and packed once, in the engine's own layout, when quantize_int8() runs.
"""

import contextlib
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = ("experts", "attention", "mlp")


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


class Int8Linear(nn.Module):
    """y = x @ W.T + b, with W int8 per output channel and x quantized per call. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], engine: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.engine = engine
        b = None if bias is None else bias.detach().float().contiguous()
        with quantized_engine(engine):
            self._packed = torch.ops.quantized.linear_prepack(quantize_weight(weight), b)

    @classmethod
    def from_linear(cls, linear: nn.Linear, engine: str) -> "Int8Linear":
        return cls(linear.weight, linear.bias, engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != torch.float32:
            flat = flat.float()
        y = torch.ops.quantized.linear_dynamic(flat, self._packed, False)  # reduce_range=False: full u8 range
        return y.view(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.out_features * self.in_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 ({self.engine})"


class Int8Experts(nn.Module):
    """One MoE layer's experts in int8: ups[e] = w1[e] ([I, H]), downs[e] = w2[e].T ([H, I])."""

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, engine: str):
        super().__init__()
        self.ups = nn.ModuleList(Int8Linear(w1[e], None, engine) for e in range(w1.shape[0]))
        self.downs = nn.ModuleList(Int8Linear(w2[e].T, None, engine) for e in range(w2.shape[0]))

    def forward(self, x: torch.Tensor, routing, dispatch) -> torch.Tensor:
        """Same dispatch as experts_sorted (``dispatch`` is experts_nomic_moe.dispatch_sorted)."""
        return dispatch(x, routing, len(self.ups), lambda e, rows: self.downs[e](F.gelu(self.ups[e](rows))))
