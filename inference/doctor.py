"""`nomic-moe doctor`: what will run here, and why.

For the real device, or a simulated CUDA compute capability (`--capability 7.5`), and a dtype:
the attention kernel and the expert backend that `auto` picks, each with its reason and the
candidates it passed over; the packages and tools the fast paths need; with --compile, each Triton
kernel compiled for that architecture (on the CPU, no GPU needed), with its shared memory,
registers, spills and whether it uses tensor cores.
"""

import importlib.util
import shutil
from typing import Optional

import torch

from nomic_moe_files.errors import UserError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HEAD_DIM = 64  # the published model's head size


def parse_capability(text: str):
    try:
        major, minor = (int(p) for p in text.split("."))
    except ValueError:
        raise UserError(f"--capability {text!r} is not MAJOR.MINOR", "e.g. --capability 7.5 (T4), 8.0 (A100), 8.9 (L4), 9.0 (H100)") from None
    if not 3 <= major <= 20:
        raise UserError(f"--capability {text} is not a CUDA compute capability", "e.g. 7.5, 8.0, 8.6, 8.9, 9.0, 10.0, 12.0")
    return major, minor


def _version(module: str) -> Optional[str]:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as e:  # noqa: BLE001 - a broken install is worth reporting, not crashing on
        return f"broken ({type(e).__name__})"


def auto_dtype(capability: Optional[str], cpu: Optional[str]) -> str:
    """What `--dtype auto` loads on the device doctor describes: a (simulated) GPU's bf16 from sm_80,
    fp16 before; a (simulated) CPU's row of the CPU table."""
    from .cpu import dtype_name, gpu_auto_dtype, resolve_dtype

    if capability is not None or (cpu is None and torch.cuda.is_available()):
        major = parse_capability(capability)[0] if capability is not None else torch.cuda.get_device_capability()[0]
        return dtype_name(gpu_auto_dtype(major))
    return dtype_name(resolve_dtype("auto", "cpu", isa=cpu))


def report(capability: Optional[str] = None, dtype: str = "auto", compile: bool = False, cpu: Optional[str] = None) -> dict:
    from nomic_moe_modeling.experts_nomic_moe import BACKENDS, Target, auto_candidates, is_broken, why_not_auto
    from nomic_moe_modeling.modeling_nomic_moe import attention_candidates, attention_packages

    if dtype == "auto":
        dtype = auto_dtype(capability, cpu)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}", f"use one of {', '.join(DTYPES)}")
    if capability is not None:
        cap = parse_capability(capability)
        target = Target("cuda", cap, DTYPES[dtype])
        device = f"simulated CUDA device, compute capability {cap[0]}.{cap[1]} (sm_{cap[0]}{cap[1]})"
    elif cpu is not None:
        cap = None
        target = Target("cpu", None, DTYPES[dtype])
        device = f"simulated CPU with ISA {cpu}"
    elif torch.cuda.is_available():
        target = Target.of("cuda", DTYPES[dtype])
        cap = target.capability
        device = f"{torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]}, sm_{cap[0]}{cap[1]})"
    else:
        cap = None
        target = Target("cpu", None, DTYPES[dtype])
        device = "CPU (no CUDA device here; pass --capability MAJOR.MINOR to see a GPU's plan)"

    attention = attention_candidates(target, HEAD_DIM, None)
    experts = auto_candidates(target, training=False)
    chosen_experts = next(((n, w) for n, w in experts if not is_broken(n, target)), experts[-1])
    passed_over = {name: why_not_auto(name, target, training=False) for name in BACKENDS if name not in [n for n, _ in experts]}
    out = {
        "device": device,
        "capability": f"{cap[0]}.{cap[1]}" if cap else None,
        "dtype": dtype,
        "attention": {"kernel": attention[0][0], "why": attention[0][1], "candidates": [{"kernel": k, "why": w} for k, w in attention]},
        "experts": {"backend": chosen_experts[0], "why": chosen_experts[1],
                    "candidates": [{"backend": b, "why": w} for b, w in experts], "passed_over": passed_over},
        "packages": {"torch": torch.__version__, "triton": _version("triton"), "flash_attn": _version("flash_attn"),
                     "torch_varlen_attention": attention_packages()["torch_varlen"],
                     "c_compiler": shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")},
        "cpu": cpu_report(cpu, dtype),
        "notes": notes(target, cap) + (cpu_notes(cpu, dtype) if target.device == "cpu" else []),
    }
    if compile:
        from .kernel_compile import compile_in_subprocess

        if cap is None:
            raise UserError("--compile needs a GPU architecture", "add --capability MAJOR.MINOR (e.g. 9.0)")
        out["compiled"] = compile_in_subprocess([cap[0] * 10 + cap[1]], [dtype])
    return out


def notes(target, cap) -> list:
    out = []
    if target.device == "cuda" and target.dtype == torch.bfloat16 and cap < (8, 0):
        out.append("bf16 has no tensor cores before sm_80: it runs emulated (correct, slow); prefer float16 on this GPU")
    if target.device == "cuda" and not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        out.append("no C compiler: Triton cannot build its kernel launcher here; auto falls back to cuBLAS GEMMs (one warning)")
    if importlib.util.find_spec("triton") is None and target.device == "cuda":
        out.append("triton is not installed: the fused expert kernels are unavailable (pip install triton)")
    return out


def cpu_report(isa: Optional[str], dtype: str) -> dict:
    """This CPU's (or the simulated ISA's) row of the CPU table: ISA, auto dtype, int8 kernel."""
    from nomic_moe_kernels import small_gemm

    from .cpu import describe, dtype_name

    out = describe(isa)
    if not out["simulated"]:  # the few-row kernel is built for this CPU only (-march=native)
        k = small_gemm.load()
        out["few_row_kernel"] = ({"available": True, "dtypes": [dtype_name(d) for d in k.dtypes()],
                                  "max_rows": max(small_gemm.MAX_ROWS.values()), "library": str(k.path),
                                  "attention": k.attention_ok, "int8_gelu": k.fuses_gelu_int8,
                                  "layers_in_one_call": k.layers is not None,
                                  "huge_pages": small_gemm.huge_page_mode()
                                  if k.arena.enabled else "off (NOMIC_MOE_HUGE_PAGES=0)"} if k else
                                 {"available": False, "why": small_gemm.why_unavailable()})
    else:  # the simulated ISA's build, as the C files' #if's make it (small_gemm.BUILDS)
        march, dtypes = small_gemm.BUILDS[isa]
        out["few_row_kernel"] = {"available": True, "simulated": True, "march": march, "dtypes": list(dtypes),
                                 "max_rows": max(small_gemm.MAX_ROWS.values()), "attention": True,
                                 "int8_gelu": "int8" in dtypes, "layers_in_one_call": True,
                                 "huge_pages": small_gemm.huge_page_mode()}
    return out


def cpu_notes(isa: Optional[str], dtype: str) -> list:
    from nomic_moe_modeling.cpu_nomic_moe import EMULATED_BF16_COST, bf16_native, why_no_int8

    out = []
    if dtype == "bfloat16" and not bf16_native(isa):
        out.append(f"bf16 is emulated on this CPU (no AVX512_BF16, no AMX) and very slow: {EMULATED_BF16_COST}; "
                   "use float32 (exact) or int8")
    why = why_no_int8(isa)
    if why:
        out.append(why)
    return out


def print_report(r: dict) -> None:
    print(f"device     {r['device']}")
    c = r["cpu"]
    if c["simulated"]:
        print(f"cpu        {c['isa']} (simulated; this machine: torch capability {c['torch_capability']})")
    else:
        flags = " ".join(f for f, on in c["flags"].items() if on)
        print(f"cpu        {c['isa']} (torch capability {c['torch_capability']}; flags {flags})")
    print(f"           auto dtype {c['dtype']} ({'native bf16' if c['bf16_native'] else 'bf16 not native: fp32 is the fast float'}), "
          f"int8 kernel {c['int8_kernel'] or 'none'}: {c['int8_why']}"
          + ("; per-token activations (quantize_int8(activations='per_token')) use torch._int_mm" if c["int8_kernel"] else ""))
    from nomic_moe_modeling.experts_nomic_moe import PACKED_MAX_ROWS

    if c["fp32_packed_at_any_size"]:
        print(f"           fp32 products packed for oneDNN at every size: torch's fp32 GEMM (MKL) is slow on {c['vendor']}")
    else:
        print(f"           fp32 products packed for oneDNN up to {PACKED_MAX_ROWS} rows; larger ones on torch's own GEMM")
    fk = c.get("few_row_kernel")
    if fk:
        print("           few-row kernel " + ("(as built with -march=" + fk["march"] + ") " if fk.get("simulated") else "")
              + (f"on for {', '.join(fk['dtypes'])} products of up to {fk['max_rows']} rows (short queries)"
                                            if fk["available"] else f"off: {fk['why']} (oneDNN's packed weights serve short queries)"))
        if fk["available"]:
            print("           " + ("RoPE + attention in one kernel call" if fk["attention"] else
                                   "attention: torch's RoPE and SDPA (the kernel's attention needs AVX-512, or AVX2 with FMA)")
                  + f"; an MoE layer's routing in two kernel calls; packed weights in 2 MiB pages: THP {fk['huge_pages']}"
                  + ("; int8: the MLPs' GELU inside their down products" if fk.get("int8_gelu") else ""))
            print("           " + (f"a short input's encoder layers in one kernel call, {', '.join(fk['dtypes'])} "
                                   "(forward without hooks, hidden states or router logits)" if fk.get("layers_in_one_call") else
                                   "the model's own loop over its layers (the one-call path needs AVX-512, or AVX2 with FMA)"))
    print(f"dtype      {r['dtype']}")
    if fk and fk["available"] and fk["attention"] and r["device"].startswith("CPU"):
        print(f"attention  the few-row kernel's RoPE + attention per text (where it is installed; else "
              f"{r['attention']['kernel']}: {r['attention']['why']})")
    else:
        print(f"attention  {r['attention']['kernel']}: {r['attention']['why']}")
    for c in r["attention"]["candidates"][1:]:
        print(f"           then {c['kernel']}: {c['why']}")
    print(f"experts    {r['experts']['backend']}: {r['experts']['why']}")
    for c in r["experts"]["candidates"]:
        if c["backend"] != r["experts"]["backend"]:
            print(f"           also {c['backend']}: {c['why']}")
    for name, why in r["experts"]["passed_over"].items():
        print(f"           not {name}: {why}")
    pk = r["packages"]
    print(f"packages   torch {pk['torch']}, triton {pk['triton'] or 'absent'}, flash-attn {pk['flash_attn'] or 'absent'}, "
          f"torch varlen attention {'yes' if pk['torch_varlen_attention'] else 'no'}, C compiler {pk['c_compiler'] or 'none'}")
    for n in r["notes"]:
        print(f"note       {n}")
    for c in r.get("compiled", []):
        if c["ok"]:
            print(f"compiled   {c['kernel']:<4} {c['arch']} {c['dtype']}: ok, tiles {c['tiles']}, shared {c['shared_bytes']} B, "
                  f"registers {c['registers']}, spill stack {c['stack_bytes']} B, tensor cores {'yes' if c['tensor_cores'] else 'NO'} ({c['seconds']}s)")
        else:
            print(f"compiled   {c['kernel']:<4} {c['arch']} {c['dtype']}: FAILED {c['error']}")
