"""What this CPU computes natively, and what runs on it: the CPU's counterpart of the GPU table.

The ISA is read from torch's CPU capability (the kernels aten dispatches to: AVX2, AVX512) plus the
CPU flags that torch does not report (/proc/cpuinfo on Linux): AVX512_BF16, AMX (bf16 and int8
tiles) and VNNI. One row of CPU_TABLE per ISA decides:

  float_dtype  what "fastest" / "auto" gives: bf16 only where the CPU computes it natively
               (AVX512_BF16 or AMX); elsewhere oneDNN emulates bf16 and a bf16 model is 10-100x
               slower than fp32, so fp32 is the floor.
  int8_engine  the quantized engine whose dynamic int8 linear kernel is fastest there, measured
               (benchmarks/RESULTS.md, "CPU: int8 kernels"): oneDNN on AMX (AMX int8 tiles),
               FBGEMM on AVX-512 (VNNI) and AVX2.
  experts      the expert backend: "sorted" (per-expert GEMMs on contiguous segments) everywhere.

Apart from the ISA, the vendor: torch's fp32 GEMM on x86 is MKL's, whose fast kernels run on Intel
CPUs only (library_fp32_gemm_slow).

Nothing here runs on import; the flags are read once, on first use.
"""

import functools
import warnings
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

ISAS = ("avx2", "avx512", "avx512_bf16", "amx")

# Measured on an AVX2-only machine of this project (the CPU issue): one bf16 expert product
# [64, 3072] @ [3072, 768] in 588 ms against 4.8 ms in fp32; a bf16 benchmark that takes a minute
# with native bf16 did not finish in 15 minutes there.
EMULATED_BF16_COST = ("one bf16 expert product [64, 3072] @ [3072, 768] took 588 ms against 4.8 ms in fp32 "
                      "on an AVX2 CPU (about 100x slower)")


@dataclass(frozen=True)
class CpuPlan:
    isa: str
    float_dtype: torch.dtype
    bf16_native: bool
    int8_engine: str
    int8_why: str
    experts: str
    experts_why: str


_SORTED_WHY = "per-expert GEMMs on contiguous segments, weights packed once for the GEMM library"

CPU_TABLE = {
    "avx2": CpuPlan(
        "avx2", torch.float32, False, "fbgemm",
        "FBGEMM's AVX2 int8 kernels (u8 x s8 -> s32); oneDNN's int8 was 3-8x slower at AVX2 in the same run",
        "sorted", _SORTED_WHY),
    "avx512": CpuPlan(
        "avx512", torch.float32, False, "fbgemm",
        "FBGEMM's AVX-512 (VNNI where present) int8 kernels", "sorted", _SORTED_WHY),
    "avx512_bf16": CpuPlan(
        "avx512_bf16", torch.bfloat16, True, "fbgemm",
        "FBGEMM's AVX-512 VNNI int8 kernels: as fast as oneDNN's for one query, without AMX", "sorted", _SORTED_WHY),
    "amx": CpuPlan(
        "amx", torch.bfloat16, True, "onednn",
        "oneDNN's AMX int8 tiles: 2-3x FBGEMM for 32-256 rows on this ISA", "sorted", _SORTED_WHY),
}


def _cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line (Linux) that starts with one of ``keys``; "" where none can be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags; empty where they cannot be read."""
    return frozenset(_cpuinfo("flags", "Features").split())


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD"); "" where it cannot be read."""
    return _cpuinfo("vendor_id")


@functools.lru_cache(maxsize=None)
def library_fp32_gemm_slow() -> bool:
    """torch's fp32 GEMM (MKL, on x86 builds) runs far below oneDNN's packed product on this CPU: MKL
    picks its fast kernels for Intel CPUs only. On an AMD EPYC (Zen 5, AVX-512), F.linear ran 2.2-2.8x
    slower than oneDNN's packed product from 32 to 2048 rows, and fp32 batches ran 1.9x faster with
    every product packed (benchmarks/RESULTS.md, "A new machine: AMD EPYC, Zen 5"). Unknown vendor:
    False (as measured on Intel)."""
    return torch.backends.mkl.is_available() and cpu_vendor() not in ("", "GenuineIntel")


def cpu_capability() -> str:
    """torch's own word for the vector ISA its kernels use here: "AVX2", "AVX512", "DEFAULT", ..."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - very old torch
        return "DEFAULT"


def classify(capability: str, flags: FrozenSet[str]) -> Optional[str]:
    """One of ISAS, or None for a CPU that is none of them (no AVX2: ARM, old x86)."""
    cap = capability.upper()
    if cap.startswith("AVX512"):
        if {"amx_bf16", "amx_int8", "amx_tile"} <= flags:
            return "amx"
        if "avx512_bf16" in flags:
            return "avx512_bf16"
        return "avx512"
    if cap.startswith("AVX2"):
        return "avx2"
    return None


@functools.lru_cache(maxsize=None)
def cpu_isa() -> Optional[str]:
    """This CPU's row of CPU_TABLE (None: no AVX2)."""
    return classify(cpu_capability(), cpu_flags())


def vnni(flags: Optional[FrozenSet[str]] = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return "avx512_vnni" in flags or "avx_vnni" in flags


def cpu_plan(isa: Optional[str] = None) -> Optional[CpuPlan]:
    """The table's row for ``isa`` (a name in ISAS, to simulate another CPU) or for this CPU."""
    if isa is None:
        isa = cpu_isa()
    elif isa not in CPU_TABLE:
        raise ValueError(f"unknown CPU ISA {isa!r}; choose one of {', '.join(ISAS)}")
    return CPU_TABLE.get(isa)


def bf16_native(isa: Optional[str] = None) -> bool:
    plan = cpu_plan(isa)
    return bool(plan and plan.bf16_native)


def quantized_engines() -> list:
    """torch's quantized engines in this build (fbgemm, x86 and onednn on x86; qnnpack on ARM)."""
    return list(torch.backends.quantized.supported_engines)


def int8_engine(isa: Optional[str] = None, engines=None) -> Optional[str]:
    """The quantized engine for int8 on this CPU, or None where torch has no x86 int8 kernel."""
    plan = cpu_plan(isa)
    engines = quantized_engines() if engines is None else engines
    if plan is None:
        return None
    if plan.int8_engine in engines:
        return plan.int8_engine
    for other in ("fbgemm", "x86", "onednn"):
        if other in engines:
            return other
    return None


def why_no_int8(isa: Optional[str] = None, engines=None) -> Optional[str]:
    """None if int8 runs here, else why not, in words."""
    engines = quantized_engines() if engines is None else engines
    if cpu_plan(isa) is None:
        return (f"int8 needs an x86 CPU with AVX2 or newer (torch reports CPU capability {cpu_capability()!r}); "
                "use float32")
    if int8_engine(isa, engines) is None:
        return (f"this torch build has no x86 int8 kernel (quantized engines: {', '.join(engines) or 'none'}; "
                "FBGEMM or oneDNN is needed); use float32")
    return None


_WARNED = set()


def warn_if_emulated_bf16(dtype: torch.dtype, isa: Optional[str] = None) -> bool:
    """Warns once per process when bf16 runs on a CPU that only emulates it. True if it warned."""
    if dtype != torch.bfloat16 or bf16_native(isa):
        return False
    key = isa or cpu_isa()
    if key in _WARNED:
        return False
    _WARNED.add(key)
    warnings.warn(
        f"NomicMoE: bfloat16 on a CPU without native bf16 ({key or cpu_capability()}: no AVX512_BF16, no AMX) is "
        f"emulated and very slow: {EMULATED_BF16_COST}. Use float32 (exact) or int8 (model.quantize_int8()) "
        "on this CPU; `nomic-moe doctor` shows what runs here.",
        RuntimeWarning,
        stacklevel=3,
    )
    return True
