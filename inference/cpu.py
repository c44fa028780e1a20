"""Which dtype runs where: one resolver for the encoders, the CLI, the benchmarks and the server.

    resolve_dtype("auto", "cpu")      -> torch.bfloat16 on AVX512_BF16 / AMX, else torch.float32
    resolve_dtype("int8", "cpu")      -> "int8" (then model.quantize_int8()), refused where no kernel exists
    resolve_dtype("bfloat16", "cpu")  -> torch.bfloat16, with one warning on a CPU that emulates bf16
    describe()                        -> {"isa": "amx", "dtype": "bfloat16", "int8_kernel": "onednn", ...}

"auto" and "fastest" mean the same: the fastest float dtype the device computes natively (never
int8, which changes the numbers and is asked for by name). The table itself lives beside the model
code (nomic_moe_modeling.cpu_nomic_moe.CPU_TABLE), because the model warns about emulated bf16
and picks its int8 kernel from it too.
"""

from typing import Optional, Union

import torch

from nomic_moe_files.errors import UserError
from nomic_moe_modeling.cpu_nomic_moe import (
    CPU_TABLE,
    EMULATED_BF16_COST,
    ISAS,
    cpu_capability,
    cpu_flags,
    cpu_isa,
    cpu_plan,
    cpu_vendor,
    int8_engine,
    library_fp32_gemm_slow,
    vnni,
    warn_if_emulated_bf16,
    why_no_int8,
)

NAMES = ("auto", "fastest", "float32", "bfloat16", "float16", "int8")
FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["CPU_TABLE", "EMULATED_BF16_COST", "ISAS", "NAMES", "describe", "dtype_name", "resolve_dtype", "runnable_dtypes",
           "use_cpu_kernels"]


def _device_type(device) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def check_isa(isa: Optional[str]) -> Optional[str]:
    if isa is not None and isa not in ISAS:
        raise UserError(f"--cpu {isa!r} is not a CPU ISA we know", f"use one of {', '.join(ISAS)}")
    return isa


def resolve_dtype(name: Union[str, torch.dtype, None], device="cpu", isa: Optional[str] = None, warn: bool = True):
    """A dtype name (or torch.dtype) -> the torch.dtype to load the model in, or "int8".

    ``isa`` simulates another CPU (a name in ISAS). Refuses (UserError) int8 where no kernel
    exists and on a GPU; warns once for bf16 on a CPU that emulates it.
    """
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    name = "float32" if name is None else str(name).lower()
    kind = _device_type(device)
    check_isa(isa)
    if name in ("auto", "fastest"):
        if kind == "cuda":
            return gpu_auto_dtype(torch.cuda.get_device_capability()[0])
        plan = cpu_plan(isa)
        return plan.float_dtype if plan else torch.float32
    if name == "int8":
        if kind != "cpu":
            raise UserError(f"int8 runs on the CPU's kernels (FBGEMM, oneDNN), not on {kind}", "on a GPU use --dtype bfloat16 or float16")
        why = why_no_int8(isa)
        if why:
            raise UserError(f"int8 cannot run here: {why}", "use --dtype float32 (exact) or auto")
        return "int8"
    if name not in FLOATS:
        raise UserError(f"unknown dtype {name!r}", f"use one of {', '.join(NAMES)}")
    dtype = FLOATS[name]
    if kind == "cpu" and warn:
        warn_if_emulated_bf16(dtype, isa)
    return dtype


def gpu_auto_dtype(major: int) -> torch.dtype:
    """"auto" on a GPU of compute capability ``major``.x: bf16 from Ampere (sm_80), fp16 before."""
    return torch.bfloat16 if major >= 8 else torch.float16


def dtype_name(dtype) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


def runnable_dtypes(isa: Optional[str] = None) -> list:
    """The dtypes worth running on this CPU, fastest float last: float32, bfloat16 where native, int8 where a kernel exists."""
    plan = cpu_plan(isa)
    out = ["float32"]
    if plan and plan.bf16_native:
        out.append("bfloat16")
    if why_no_int8(isa) is None:
        out.append("int8")
    return out


def describe(isa: Optional[str] = None) -> dict:
    """A short dict for printing: the ISA, the "auto" dtype, the int8 kernel, and the flags behind them."""
    simulated = isa is not None
    check_isa(isa)
    plan = cpu_plan(isa)
    flags = cpu_flags()
    return {
        "isa": (isa if simulated else cpu_isa()) or "none (no AVX2)",
        "simulated": simulated,
        "torch_capability": cpu_capability(),
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")},
        "vnni": vnni(flags) if not simulated else isa in ("avx512_bf16", "amx"),
        "dtype": dtype_name(plan.float_dtype if plan else torch.float32),
        "bf16_native": bool(plan and plan.bf16_native),
        "int8_kernel": int8_engine(isa),
        "int8_why": plan.int8_why if plan else why_no_int8(isa),
        "experts": plan.experts if plan else "sorted",
        "experts_why": plan.experts_why if plan else "",
        "threads": torch.get_num_threads(),
        # the vendor, not the ISA: this machine's only (a simulated ISA keeps the real vendor's rule)
        "vendor": cpu_vendor() or "unknown",
        "fp32_packed_at_any_size": library_fp32_gemm_slow(),
    }


def use_cpu_kernels(model) -> Optional[str]:
    """Gives a model on the CPU the package's few-row kernel (nomic_moe_kernels.small_gemm) for its
    short inputs. Returns what runs, in words, for the logs; the model is unchanged where the kernel
    cannot run (oneDNN's packed weights then serve, slower for a short query)."""
    from nomic_moe_kernels import small_gemm

    p = next(model.parameters(), None)
    if p is None or p.device.type != "cpu" or not hasattr(model, "set_cpu_kernel"):
        return None
    kernel = small_gemm.install(model)
    if kernel is None:
        return f"few-row kernel off: {small_gemm.why_unavailable()}"
    return (f"few-row kernel ({kernel.width}-column panels, {', '.join(dtype_name(d) for d in kernel.dtypes())}"
            + (", RoPE + attention" if kernel.attention_ok else "") + ")")
