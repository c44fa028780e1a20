"""The few-row kernel against the libraries, one MoE layer's experts at a time, by rows per expert.

    python benchmarks/kernel_rows.py [--rows 1,8,16,32] [--dtypes float32,bfloat16,int8] [--repeats 20]

Each pass runs one MoE layer's expert products (8 experts, up [768 -> 3072] then down [3072 -> 768])
on `rows` rows each, cycling through `--sets` distinct layers so that no weight is cache-hot, as in a
forward pass. Prints the p50 per layer and the weight read rate it implies, for the library's path
(oneDNN's packed weights for fp32/bf16, FBGEMM per-batch for int8) and ours, beside the streaming read
rate of the same minutes. Interleaved: every repeat runs each side once.
"""

import argparse
import sys
import time

import torch

from nomic_moe_inference.latency import memory_bandwidth
from nomic_moe_kernels import small_gemm
from nomic_moe_modeling.cpu_nomic_moe import int8_engine
from nomic_moe_modeling.experts_nomic_moe import ONEDNN
from nomic_moe_modeling.int8_nomic_moe import Int8Linear

H, F, E = 768, 3072, 8


def layers(n_sets: int, dtype: torch.dtype, kernel):
    """[(library side, our side)] per layer: each a list of (callable x -> y) per product, in order."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n_sets):
        lib, ours = [], []
        for _ in range(E):
            for shape in ((F, H), (H, F)):
                w = torch.randn(shape, generator=g) * 0.02
                if dtype == torch.int8:
                    a = Int8Linear(w, None, int8_engine())  # per_batch, FBGEMM: the library's int8
                    b = Int8Linear(w, None, int8_engine(), activations="per_token")
                    b.set_cpu_kernel(kernel)
                    lib.append(a)
                    ours.append(b)
                else:
                    w = w.to(dtype)
                    pl, pk = ONEDNN.pack(w), kernel.pack(w)
                    lib.append(lambda x, pl=pl: ONEDNN.linear(x, pl))
                    ours.append(lambda x, pk=pk: kernel.linear(x, pk))
        out.append((lib, ours))
    return out


def run_layer(products, xs):
    for e in range(E):
        h = products[2 * e](xs[0])
        products[2 * e + 1](xs[1])
    return h


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="1,8,16,32")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--sets", type=int, default=6, help="distinct layers cycled, so none stays in cache")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kernel = small_gemm.load()
    if kernel is None:
        sys.exit(f"the few-row kernel cannot run here: {small_gemm.why_unavailable()}")
    print(f"{a.threads} threads; kernel dtypes {[str(d) for d in kernel.dtypes()]}", flush=True)
    rows_list = [int(r) for r in a.rows.split(",")]
    results = []
    for name in a.dtypes.split(","):
        dtype = getattr(torch, name)
        if dtype not in kernel.dtypes():
            print(f"[kernel-rows] {name}: not in this build, skipped", flush=True)
            continue
        sets = layers(a.sets, dtype, kernel)
        nbytes = 2 * E * H * F * (4 if dtype == torch.float32 else 2 if dtype == torch.bfloat16 else 1)
        xdtype = torch.float32 if dtype == torch.int8 else dtype
        stream = memory_bandwidth()
        for rows in rows_list:
            xs = [torch.randn(rows, H).to(xdtype), torch.randn(rows, F).to(xdtype)]
            t = {"lib": [], "ours": []}
            with torch.inference_mode():
                for s in sets:  # warm-up: first calls, buffers
                    run_layer(s[0], xs), run_layer(s[1], xs)
                for r in range(a.repeats):
                    for side, idx in (("lib", 0), ("ours", 1)):
                        s = sets[r % len(sets)]
                        t0 = time.perf_counter()
                        run_layer(s[idx], xs)
                        t[side].append(time.perf_counter() - t0)
            p50 = {k: sorted(v)[len(v) // 2] for k, v in t.items()}
            results.append((name, rows, p50["lib"], p50["ours"], nbytes, stream))
            print(f"[kernel-rows] {name} {rows} rows: library {p50['lib'] * 1e3:.2f} ms, ours {p50['ours'] * 1e3:.2f} ms", flush=True)
    print("\n| dtype | rows per expert | library ms (GB/s) | ours ms (GB/s) | gain | stream GB/s |")
    print("|---|---|---|---|---|---|")
    for name, rows, lib, ours, nbytes, stream in results:
        print(f"| {name} | {rows} | {lib * 1e3:.2f} ({nbytes / lib / 1e9:.1f}) | {ours * 1e3:.2f} ({nbytes / ours / 1e9:.1f}) "
              f"| {lib / ours:.2f}x | {stream / 1e9:.1f} |")


if __name__ == "__main__":
    main()
