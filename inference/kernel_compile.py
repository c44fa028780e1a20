"""Compile the Triton expert kernels for a GPU architecture, on any machine (no GPU needed).

    python -m nomic_moe_inference.kernel_compile --arch 75 80 90 --dtype float16 bfloat16 [--json]

Triton compiles to PTX and cubin for any `GPUTarget` on the CPU; ptxas (shipped with Triton) then
reports registers and spills. Each result says whether the PTX uses tensor-core instructions
(mma / wgmma): without them the dot runs on FMA units. Only the launcher, a small C file built at
first launch, needs the user's machine (and a C compiler): the doctor checks for that separately.

Runs in a process of its own: under TRITON_INTERPRET=1 (the tests on a CPU machine) triton.jit
makes interpreter objects that cannot be compiled, so callers use compile_in_subprocess().
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

KNOWN_ARCHS = (75, 80, 86, 89, 90, 100, 120)  # Turing, Ampere, Ada, Hopper, Blackwell (datacenter, consumer)
TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _signature(kernel: str, dt: str):
    """Argument types of the two kernels (modeling/experts_nomic_moe.py), and their constexprs."""
    if kernel == "up":
        sig = {"x_ptr": f"*{dt}", "w1_ptr": f"*{dt}", "h_ptr": f"*{dt}", "order_ptr": "*i32", "block_ends_ptr": "*i32",
               "offsets_ptr": "*i32", "H": "i32", "I": "i32"}
        const = {"TOP_K": 2}
    else:
        sig = {"h_ptr": f"*{dt}", "w2_ptr": f"*{dt}", "y_ptr": f"*{dt}", "order_ptr": "*i32", "weights_ptr": f"*{dt}",
               "block_ends_ptr": "*i32", "offsets_ptr": "*i32", "H": "i32", "I": "i32"}
        const = {}
    return sig, const


def _ptxas_candidates():
    """Triton's own ptxas builds (the Blackwell one reads the newest PTX versions), then a CUDA toolkit's."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    paths = (os.environ.get("TRITON_PTXAS_PATH"), os.path.join(bin_dir, "ptxas-blackwell"), os.path.join(bin_dir, "ptxas"),
             shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas")
    return [p for p in paths if p and os.path.exists(p)]


def compile_one(kernel: str, arch: int, dtype: str) -> dict:
    """Compile one kernel for sm_<arch> in dtype; the result says ok or the error."""
    row = {"kernel": kernel, "arch": f"sm_{arch}", "dtype": dtype}
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from nomic_moe_modeling import experts_nomic_moe as ex

        tiles, launch = ex._tiles((arch // 10, arch % 10))
        sig, const = _signature(kernel, TRITON_DTYPES[dtype])
        fn = ex._up_kernel if kernel == "up" else ex._down_kernel
        constexprs = {"E": 8, "IEEE": dtype == "float32", **const, **tiles}
        sig.update({name: "constexpr" for name in constexprs})
        compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                                  options=dict(launch))
        ptx = compiled.asm["ptx"]
        row.update(ok=True, shared_bytes=int(compiled.metadata.shared), num_warps=launch.get("num_warps"),
                   tiles=f"{tiles['BLOCK_M']}x{tiles['BLOCK_N']}x{tiles['BLOCK_K']}",
                   tensor_cores=bool(re.search(r"\b(w?gmma|mma)\.", ptx)), triton=triton.__version__)
        row.update(_resources(ptx))
    except Exception as e:  # noqa: BLE001 - the report says what failed
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _resources(ptx: str) -> dict:
    """Registers and spill stack from ptxas -v, for the PTX's own target (sm_90a for wgmma)."""
    target = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
    if target is None:
        return {"registers": None, "stack_bytes": None}
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    text = ""
    try:
        for ptxas in _ptxas_candidates():
            r = subprocess.run([ptxas, f"-arch={target.group(1).rstrip(',')}", "-v", f.name, "-o", os.devnull],
                               capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                text = r.stdout + r.stderr
                break
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", text)
    stack = re.search(r"(\d+) bytes cumulative stack size", text) or re.search(r"(\d+) bytes stack frame", text)
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else 0}


def compile_in_subprocess(archs, dtypes, timeout: int = 900) -> list:
    """compile_one for every (kernel, arch, dtype), in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its current default
    cmd = [sys.executable, "-m", "nomic_moe_inference.kernel_compile", "--json", "--arch", *map(str, archs), "--dtype", *dtypes]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        return [{"kernel": k, "arch": f"sm_{a}", "dtype": d, "ok": False, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
                for a in archs for d in dtypes for k in ("up", "down")]
    return json.loads(r.stdout)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(KNOWN_ARCHS))
    p.add_argument("--dtype", nargs="+", default=["float16", "bfloat16"], choices=list(TRITON_DTYPES))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled")
    rows = [compile_one(k, arch, d) for arch in a.arch for d in a.dtype for k in ("up", "down")]
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            detail = (f"shared {r['shared_bytes']} B, {r['registers']} registers, stack {r['stack_bytes']} B, tensor cores "
                      f"{'yes' if r['tensor_cores'] else 'NO'}" if r["ok"] else r["error"])
            print(f"{r['kernel']:<5} {r['arch']:<7} {r['dtype']:<9} {'ok' if r['ok'] else 'FAILED':<7} {detail} ({r['seconds']}s)")


if __name__ == "__main__":
    main()
