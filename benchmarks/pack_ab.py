"""A/B of the CPU prepacking and the few-row kernel, interleaved in one process so that a noisy VM
hits every side alike.

    python benchmarks/pack_ab.py [--repeats 40] [--threads 2] [--dtype float32|bfloat16|int8] [--modes none,all,kernel]

Modes, cycled every repeat on the same real-size random model: "none" (stored weights only),
"experts" (expert matrices prepacked), "all" (experts + attention + dense MLP prepacked in oneDNN's
layout), "kernel" (as "all", with nomic_moe_kernels.small_gemm taking the products it accepts),
"kernel-experts" (the kernel for the experts only, oneDNN's packed weights for the rest),
"kernel-per-expert" (as "kernel", without its grouped calls: one call per expert segment).
Prints p50/p90 per mode and token count, the gain of each mode over the first, and the largest
difference of the sentence embeddings from the first mode's.
"""

import argparse
import sys
import time

import torch

from nomic_moe_inference.bench import build_model

PACKED = {"none": set(), "experts": {"NomicMoEExperts"}, "all": {"NomicMoEExperts", "NomicMoELinear"},
          "kernel": {"NomicMoEExperts", "NomicMoELinear"}, "kernel-experts": {"NomicMoEExperts", "NomicMoELinear"},
          "kernel-per-expert": {"NomicMoEExperts", "NomicMoELinear"}}
KERNEL = {"kernel": {"NomicMoEExperts", "NomicMoELinear", "Int8Linear"}, "kernel-experts": {"NomicMoEExperts"},
          "kernel-per-expert": {"NomicMoEExperts", "NomicMoELinear", "Int8Linear"}}


class PerExpert:
    """The kernel without its grouped calls (the model then calls it once per expert segment); same packs."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name

    def accepts(self, rows, dtype):
        return self.inner.accepts(rows, dtype)

    def pack(self, w):
        return self.inner.pack(w)

    def linear(self, x, packed, bias=None):
        return self.inner.linear(x, packed, bias)

    def pack_int8(self, wq, scale):
        return self.inner.pack_int8(wq, scale)

    def linear_int8(self, x, packed, bias=None):
        return self.inner.linear_int8(x, packed, bias)


def set_mode(model, mode, kernel):
    chosen = PerExpert(kernel) if mode == "kernel-per-expert" else kernel
    for m in model.modules():
        if hasattr(m, "pack_cpu"):
            m.pack_cpu = type(m).__name__ in PACKED[mode]
        if hasattr(m, "cpu_kernel"):  # set directly: the kernel's packs stay (the same layout either way)
            m.cpu_kernel = chosen if type(m).__name__ in KERNEL.get(mode, ()) else None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--batch", type=int, default=1, help="texts per forward pass (1: one query)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                   help="int8: per-token activations (the modes then differ only in the kernel: none = torch._int_mm)")
    p.add_argument("--modes", default="none,experts,all,kernel")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    MODES = a.modes.split(",")
    kernel = None
    if any(m.startswith("kernel") for m in MODES):
        from nomic_moe_kernels import small_gemm

        kernel = small_gemm.load()
        if kernel is None:
            sys.exit(f"the few-row kernel cannot run here: {small_gemm.why_unavailable()}")
    model = build_model("cpu").eval()
    if a.dtype == "int8":
        model.quantize_int8(activations="per_token")
    else:
        model = model.to(getattr(torch, a.dtype))
    lengths = [int(n) for n in a.lengths.split(",")]
    inputs = {n: torch.randint(5, model.config.vocab_size, (a.batch, n), generator=torch.Generator().manual_seed(n)) for n in lengths}
    times = {(m, n): [] for m in MODES for n in lengths}
    vectors = {}
    with torch.inference_mode():
        for mode in MODES:  # warm-up: packs are made here, not in the timed passes
            set_mode(model, mode, kernel)
            for n in lengths:
                vectors[mode, n] = model(input_ids=inputs[n], return_sentence_embedding=True).sentence_embedding.float()
        for r in range(a.repeats):
            for mode in MODES:
                set_mode(model, mode, kernel)
                for n in lengths:
                    t = time.perf_counter()
                    model(input_ids=inputs[n], return_sentence_embedding=True)
                    times[mode, n].append(time.perf_counter() - t)
            if (r + 1) % 10 == 0:
                print(f"[pack-ab] {r + 1}/{a.repeats} repeats", file=sys.stderr, flush=True)
    first = MODES[0]
    print(f"batch of {a.batch}, {a.dtype}, {a.threads} threads")
    print(f"| mode | tokens | p50 ms | p90 ms | p50 gain over {first} | max abs diff to {first} |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        base = sorted(times[first, n])[len(times[first, n]) // 2]
        for mode in MODES:
            t = sorted(times[mode, n])
            p50, p90 = t[len(t) // 2], t[int(len(t) * 0.9)]
            diff = (vectors[mode, n] - vectors[first, n]).abs().max().item()
            print(f"| {mode} | {n} | {p50 * 1e3:.1f} | {p90 * 1e3:.1f} | {base / p50:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
