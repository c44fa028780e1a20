"""A/B of the CPU fp32 prepacking, interleaved in one process so that a noisy VM hits both sides alike.

    python benchmarks/pack_ab.py [--repeats 40] [--threads 2]

Modes, cycled every repeat on the same real-size random model: "none" (stored weights only),
"experts" (expert matrices prepacked), "all" (experts + attention + dense MLP prepacked).
Prints p50/p90 per mode and token count, and the gain of each mode over "none".
"""

import argparse
import sys
import time

import torch

from nomic_moe_inference.bench import build_model

MODES = {"none": set(), "experts": {"NomicMoEExperts"}, "all": {"NomicMoEExperts", "NomicMoELinear"}}


def set_mode(model, mode):
    for m in model.modules():
        if hasattr(m, "pack_cpu"):
            m.pack_cpu = type(m).__name__ in MODES[mode]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--batch", type=int, default=1, help="texts per forward pass (1: one query)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model = build_model("cpu").eval()
    lengths = [int(n) for n in a.lengths.split(",")]
    inputs = {n: torch.randint(5, model.config.vocab_size, (a.batch, n), generator=torch.Generator().manual_seed(n)) for n in lengths}
    times = {(m, n): [] for m in MODES for n in lengths}
    with torch.inference_mode():
        for mode in MODES:  # warm-up: packs are made here, not in the timed passes
            set_mode(model, mode)
            for n in lengths:
                model(input_ids=inputs[n], return_sentence_embedding=True)
        for r in range(a.repeats):
            for mode in MODES:
                set_mode(model, mode)
                for n in lengths:
                    t = time.perf_counter()
                    model(input_ids=inputs[n], return_sentence_embedding=True)
                    times[mode, n].append(time.perf_counter() - t)
            if (r + 1) % 10 == 0:
                print(f"[pack-ab] {r + 1}/{a.repeats} repeats", file=sys.stderr, flush=True)
    print(f"batch of {a.batch}")
    print(f"| mode | tokens | p50 ms | p90 ms | p50 gain over none |")
    print("|---|---|---|---|---|")
    for n in lengths:
        base = sorted(times["none", n])[len(times["none", n]) // 2]
        for mode in MODES:
            t = sorted(times[mode, n])
            p50, p90 = t[len(t) // 2], t[int(len(t) * 0.9)]
            print(f"| {mode} | {n} | {p50 * 1e3:.1f} | {p90 * 1e3:.1f} | {base / p50:.2f}x |")


if __name__ == "__main__":
    main()
