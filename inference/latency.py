"""`nomic-moe bench --latency`: one query's latency on this CPU, per dtype, against its floor.

In one run, on the same CPU and threads:
  - the CPU's ISA (nomic_moe_inference.cpu);
  - p50 and p99 of a 32-token and a 128-token query, for each dtype this CPU runs (float32;
    bfloat16 where native; int8 always, where a kernel exists);
  - the floor of each: the larger of (a) the query's matmul FLOPs at the rate of a large dense
    GEMM in that dtype (4096 x 768 @ 768 x 3072: the fastest of torch's, oneDNN's packed product and,
    at 128 rows, the package's kernel), and (b) reading every non-embedding weight once at the memory bandwidth
    measured here (a sum over 1 GiB);
  - optionally (--llama-cpp) llama.cpp's llama-embedding on the published layout's GGUF (f32, f16,
    q8_0) on the same query lengths: the outside anchor (benchmarks/llama_cpp.py builds it).

Random weights at the real size (speed does not depend on the values), built in memory.
"""

import copy
import json
import sys
import time
from typing import List, Optional

import torch
import torch.nn.functional as F

from .bench import build_model, flops_per_token
from .cpu import describe, runnable_dtypes, use_cpu_kernels
from .loading import int8_activations

LENGTHS = (32, 128)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _best(fn, repeats=5):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_rates(dtype: str, M=4096, H=768, I=3072) -> dict:
    """FLOP/s of a large dense GEMM in ``dtype``, by who computes it: the library's (torch's GEMM; int8:
    the dynamic quantized linear on the CPU's int8 engine), oneDNN's packed product (fp32, native bf16),
    and the package's few-row kernel at the most rows it takes (128). Torch's own GEMM is not always the
    fastest: on VNNI CPUs the kernel computes int8 faster, and on AMD CPUs MKL's fp32 GEMM runs at less
    than half of oneDNN's packed product (RESULTS.md)."""
    from nomic_moe_kernels import small_gemm
    from nomic_moe_modeling.cpu_nomic_moe import int8_engine
    from nomic_moe_modeling.experts_nomic_moe import can_run_packed, pack_linear, packed_linear
    from nomic_moe_modeling.int8_nomic_moe import Int8Linear

    a = torch.randn(M, H)
    w = torch.randn(I, H) * 0.02
    flops = lambda rows: 2 * rows * H * I  # noqa: E731
    kernel = small_gemm.load()
    if dtype != "int8":
        dt = getattr(torch, dtype)
        a, w = a.to(dt), w.to(dt)
        rates = {"library": flops(M) / _best(lambda: F.linear(a, w))}
        with torch.no_grad():  # where the model itself takes the packed product
            if can_run_packed(a):
                pw = pack_linear(w)
                rates["oneDNN packed"] = flops(M) / _best(lambda: packed_linear(a, pw))
        if kernel is not None and dt in kernel.dtypes():
            rows = min(M, kernel.max_rows(dt))
            packed, x = kernel.pack(w), a[:rows].contiguous()
            rates["few-row kernel"] = flops(rows) / _best(lambda: kernel.linear(x, packed))
        return rates
    lin = Int8Linear(w, None, int8_engine())
    rates = {"library": flops(M) / _best(lambda: lin(a))}
    if kernel is not None and kernel.int8:
        rows = min(M, kernel.max_rows(torch.int8))
        q = Int8Linear(w, None, int8_engine(), activations="per_token")
        packed, x = kernel.pack_int8(q._wq, q._w_scale), a[:rows].contiguous()
        rates["few-row kernel"] = flops(rows) / _best(lambda: kernel.linear_int8(x, packed))
    return rates


def gemm_rate(dtype: str, M=4096, H=768, I=3072) -> float:
    """The fastest of gemm_rates: the floor's rate, so that the floor stays a lower bound."""
    return max(gemm_rates(dtype, M, H, I).values())


def memory_bandwidth(gib: float = 1.0) -> float:
    """Bytes/s read by a sum over a large fp32 tensor (every byte read once)."""
    x = torch.ones(int(gib * 2**30) // 4)
    t = _best(lambda: x.sum(), repeats=3)
    del x
    return gib * 2**30 / t


def weight_bytes(model) -> int:
    """Bytes of every weight except the embedding table, as stored (int8 matrices at one byte)."""
    from nomic_moe_modeling.int8_nomic_moe import Int8Linear

    emb = {id(p) for p in model.embeddings.parameters()}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in emb)
    return total + sum(m.weight_bytes() for m in model.modules() if isinstance(m, Int8Linear))


@torch.no_grad()
def query_times(model, n: int, repeats: int, seed: int = 0) -> List[float]:
    g = torch.Generator().manual_seed(seed + n)
    ids = torch.randint(3, 1000, (1, n), generator=g)
    ids[0, 0], ids[0, -1] = 0, 2
    mask = torch.ones_like(ids)
    for _ in range(3):
        model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
        times.append(time.perf_counter() - t0)
    return times


def percentile(times, q: float) -> float:
    s = sorted(times)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def models_for(dtypes):
    base = build_model("cpu").eval()
    log(f"CPU kernels: {use_cpu_kernels(base)}")  # copies below share it
    for d in dtypes:
        if d == "float32":
            yield d, base
        elif d == "int8":
            m = copy.deepcopy(base)
            m.quantize_int8(activations=int8_activations(m))  # as load_model does
            yield d, m
            del m
        else:
            yield d, copy.deepcopy(base).to(getattr(torch, d))


def latency_bench(dtypes: Optional[List[str]] = None, threads: int = 2, repeats: int = 50, llama_cpp: bool = False,
                  out: Optional[str] = None, isa: Optional[str] = None, lengths=LENGTHS) -> dict:
    torch.set_num_threads(threads)
    cpu = describe(isa)
    dtypes = dtypes or runnable_dtypes(isa)
    # A shared VM's rates drift by the minute (we saw 1.5x between two runs), and the floor is a lower
    # bound: each rate is measured before and after the queries it bounds, and the floor takes the higher.
    reads = [memory_bandwidth()]
    log(f"CPU {cpu['isa']} (torch {cpu['torch_capability']}), {threads} threads; auto dtype {cpu['dtype']}, int8 kernel "
        f"{cpu['int8_kernel']}; memory read {reads[0] / 1e9:.1f} GB/s")
    measured = []
    for dname, model in models_for(dtypes):
        rates = [gemm_rate(dname)]
        times = {n: query_times(model, n, repeats) for n in lengths}
        rates.append(gemm_rate(dname))
        measured.append((dname, model.config, weight_bytes(model), rates, times))
        log(f"  {dname:<9} GEMM {rates[0] / 1e9:.0f} then {rates[1] / 1e9:.0f} GFLOP/s")
        del model
    reads.append(memory_bandwidth())
    bandwidth = max(reads)
    log(f"memory read {reads[0] / 1e9:.1f} then {reads[1] / 1e9:.1f} GB/s")
    rows = []
    for dname, config, wbytes, rates, times in measured:
        rate = max(rates)
        for n in lengths:
            flops = flops_per_token(config, n) * n
            floor = max(flops / rate, wbytes / bandwidth)
            row = {"engine": "pytorch", "dtype": dname, "tokens": n, "p50_ms": percentile(times[n], 0.5) * 1e3,
                   "p99_ms": percentile(times[n], 0.99) * 1e3, "floor_ms": floor * 1e3, "gflop": flops / 1e9,
                   "gemm_gflops": rate / 1e9, "gemm_gflops_runs": [r / 1e9 for r in rates], "weight_mib": wbytes / 2**20,
                   "bound": "compute" if flops / rate >= wbytes / bandwidth else "memory"}
            row["x_floor"] = row["p50_ms"] / row["floor_ms"]
            rows.append(row)
            log(f"  {dname:<9} {n:>4} tokens: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms; floor {row['floor_ms']:.1f} ms "
                f"({row['bound']}: {flops / 1e9:.2f} GFLOP at {rate / 1e9:.0f} GFLOP/s, {wbytes / 2**20:.0f} MiB at {bandwidth / 1e9:.1f} GB/s) "
                f"-> {row['x_floor']:.2f}x")
    if llama_cpp:
        rows.extend(llama_cpp_rows(threads, lengths, repeats=max(3, repeats // 10)))
    result = {"cpu": cpu, "threads": threads, "torch": torch.__version__, "memory_gbs": bandwidth / 1e9,
              "memory_gbs_runs": [r / 1e9 for r in reads], "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print_table(result)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {out}")
    return result


def print_table(result):
    c = result["cpu"]
    print(f"\nCPU {c['isa']} (torch capability {c['torch_capability']}), {result['threads']} threads, memory read {result['memory_gbs']:.1f} GB/s")
    print("\n| engine | dtype | tokens | p50 ms | p99 ms | floor ms (bound) | p50 / floor |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if r.get("error"):
            print(f"| {r['engine']} | {r['dtype']} | {r['tokens']} | {r['error']} | | | |")
            continue
        floor = f"{r['floor_ms']:.1f} ({r['bound']})" if r.get("floor_ms") else "-"
        ratio = f"{r['x_floor']:.2f}x" if r.get("x_floor") else "-"
        print(f"| {r['engine']} | {r['dtype']} | {r['tokens']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {floor} | {ratio} |")


def llama_prompt_eval(cmd, tries: int = 12):
    """(seconds, tokens) of the one forward pass of a llama-embedding run, as llama.cpp times it.

    -v: llama.cpp prints that timing only at this verbosity. -lm none: the weights are read into
    memory at load, so the timed pass does not page them in (llama.cpp runs one warm-up pass first).
    Its asynchronous logger is not flushed before exit, so the line is sometimes missing while the
    exit code is 0 (benchmarks/llama_cpp.py embed() sees the same); the run is repeated then.
    """
    import re
    import subprocess

    for _ in range(tries):
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
        if r.returncode != 0:
            how = f"died of signal {-r.returncode}" if r.returncode < 0 else f"exited with {r.returncode}"
            raise RuntimeError(f"llama-embedding {how}: {r.stderr[-2000:]}")
        m = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", r.stdout + r.stderr)
        if m:
            return float(m.group(1)) / 1e3, int(m.group(2))
    raise RuntimeError(f"llama-embedding printed no timing in {tries} runs")


def llama_cpp_rows(threads: int, lengths, repeats: int = 5) -> list:
    """llama-embedding on the published layout's GGUF (f32, f16, q8_0): its own prompt-eval time per query."""
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import llama_cpp as harness  # benchmarks/llama_cpp.py (a source checkout only)
    except ImportError:
        log("llama.cpp: benchmarks/llama_cpp.py is not here (run from a source checkout); skipped")
        return []
    from nomic_moe_conversion.convert import convert
    from nomic_moe_conversion.synthetic import make_published_checkpoint, real_size_shape
    from transformers import AutoTokenizer

    tools = harness.prepare()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_published_checkpoint(tmp / "src", seed=0, weight_std=0.02, **real_size_shape())
        pub = convert(str(src), str(tmp / "published"), layout_name="published", check=False)
        f32 = harness.to_gguf(tools, pub, tmp / "model-f32.gguf", "f32")
        tokenizer = AutoTokenizer.from_pretrained(str(pub))
        for outtype in ("f32", "f16", "q8_0"):
            gguf = f32 if outtype == "f32" else harness.to_gguf(tools, pub, tmp / f"model-{outtype}.gguf", outtype)
            for n in lengths:
                text = " ".join(["the"] * (n - 2))  # one token per word plus <s> </s>
                if len(tokenizer(text)["input_ids"]) != n:
                    raise RuntimeError(f"the probe text is not {n} tokens for this tokenizer")
                times = []
                cmd = [str(tools.embedding), "-m", str(gguf), "-t", str(threads), "-fa", "off", "--pooling", "mean",
                       "--embd-normalize", "2", "-lm", "none", "-v", "-p", text]
                try:
                    for _ in range(repeats):
                        seconds, tokens = llama_prompt_eval(cmd)
                        if tokens != n:  # the same workload as ours, or no row
                            raise RuntimeError(f"llama.cpp evaluated {tokens} tokens for a {n}-token query")
                        times.append(seconds)
                except RuntimeError as e:  # the anchor failing is a result to report, not the end of the run
                    why = str(e).split(":")[0]
                    rows.append({"engine": "llama.cpp", "dtype": outtype, "tokens": n, "error": why})
                    log(f"  llama.cpp {outtype:<5} {n:>4} tokens: {why}")
                    continue
                rows.append({"engine": "llama.cpp", "dtype": outtype, "tokens": tokens, "p50_ms": percentile(times, 0.5) * 1e3,
                             "p99_ms": percentile(times, 0.99) * 1e3})
                log(f"  llama.cpp {outtype:<5} {tokens:>4} tokens: p50 {rows[-1]['p50_ms']:.1f} ms")
    return rows
