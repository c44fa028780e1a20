"""Profile of one short query at the real size: where a 32- / 128-token query spends its time.

    python benchmarks/profile_latency.py [--dtypes float32,bfloat16,int8] [--threads 2] [--lengths 32,128]

For each dtype and length, from torch.profiler over 10 forward passes (after 3 warm-ups):
  ops/forward        aten (and quantized) operators called per forward pass
  GEMM ms / rest ms  self time in matrix products (mm, addmm, linear, bmm, quantized linear, SDPA's
                     products count as attention) against everything else
  by module          attention, router, experts, dense MLP, LayerNorms+embeddings, from forward hooks
  reorders/forward   oneDNN primitives of kind "reorder" per forward (a run with ONEDNN_VERBOSE=1 in a
                     child process): a weight converted to the GEMM library's layout on every call
Random weights at the real size (nomic_moe_inference.bench.build_model).
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time

import torch

GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "quantized::linear_dynamic",
            "aten::_mkldnn_linear", "mkldnn::", "aten::mkldnn_rnn", "aten::baddbmm")


def build(dtype):
    from nomic_moe_inference.bench import build_model
    from nomic_moe_inference.cpu import use_cpu_kernels
    from nomic_moe_inference.loading import int8_activations

    model = build_model("cpu").eval()
    if dtype != "float32" and dtype != "int8":
        model = model.to(getattr(torch, dtype))
    print(f"[profile] {dtype}: {use_cpu_kernels(model)}", file=sys.stderr)
    if dtype == "int8":
        model.quantize_int8(activations=int8_activations(model))
    return model


def query(n):
    ids = torch.randint(3, 1000, (1, n), generator=torch.Generator().manual_seed(n))
    ids[0, 0], ids[0, -1] = 0, 2
    return ids, torch.ones_like(ids)


def module_times(model, ids, mask, passes=10):
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoEAttention, NomicMoEExperts, NomicMoEMLP, NomicMoERouter

    kinds = {NomicMoEAttention: "attention", NomicMoERouter: "routing", NomicMoEExperts: "experts", NomicMoEMLP: "dense MLP"}
    acc = collections.Counter()
    handles = []
    for mod in model.modules():
        kind = kinds.get(type(mod))
        if kind:
            def pre(m, a, kind=kind):
                m._t0 = time.perf_counter()

            def post(m, a, o, kind=kind):
                acc[kind] += time.perf_counter() - m._t0

            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(passes):
            model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
        total = time.perf_counter() - t0
    for h in handles:
        h.remove()
    out = {k: 1e3 * v / passes for k, v in acc.items()}
    out["rest (embeddings, LayerNorms, packing, pooling)"] = 1e3 * total / passes - sum(out.values())
    out["total"] = 1e3 * total / passes
    return out


def profile(model, ids, mask, passes=10):
    from torch.profiler import ProfilerActivity, profile as tprofile

    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(passes):
                model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
    events = prof.key_averages()
    # top-level operators only (an op called inside another op is not a second dispatch from Python)
    top = [e for e in prof.events() if e.cpu_parent is None]
    ops = len(top) / passes
    gemm = sum(e.self_cpu_time_total for e in events if any(e.key.startswith(g) for g in GEMM_OPS)) / passes / 1e3
    sdpa = sum(e.cpu_time_total for e in events if e.key == "aten::scaled_dot_product_attention") / passes / 1e3
    total = sum(e.self_cpu_time_total for e in events) / passes / 1e3
    syncs = sum(e.count for e in events if e.key in ("aten::item", "aten::_local_scalar_dense")) / passes
    heaviest = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
    return {
        "ops_per_forward": ops,
        "gemm_ms": gemm,
        "sdpa_ms": sdpa,
        "other_ms": total - gemm,
        "host_syncs_per_forward": syncs,
        "top_ops": [(e.key, e.count // passes, round(e.self_cpu_time_total / passes / 1e3, 2)) for e in heaviest],
    }


def reorders(dtype, n, threads):
    """oneDNN reorders per forward pass, from a child run with ONEDNN_VERBOSE=1 (2 passes, the second counted)."""
    code = f"""
import sys, torch
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from profile_latency import build, query
torch.set_num_threads({threads})
m = build({dtype!r}); ids, mask = query({n})
with torch.no_grad():
    m(input_ids=ids, attention_mask=mask)
    print("=== MARK ===", flush=True)
    m(input_ids=ids, attention_mask=mask)
"""
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    after = r.stdout.split("=== MARK ===", 1)[-1].splitlines()
    execs = [ln for ln in after if ln.startswith("onednn_verbose") and ",exec," in ln]
    kinds = collections.Counter(ln.split(",")[3] if len(ln.split(",")) > 3 else "?" for ln in execs)
    reorder_lines = [ln for ln in execs if ",reorder," in ln]
    shapes = collections.Counter(ln.split(",")[-2] for ln in reorder_lines)
    return {"onednn_calls": len(execs), "kinds": dict(kinds), "reorders": len(reorder_lines), "reorder_shapes": dict(shapes.most_common(6))}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--lengths", default="32,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-onednn-verbose", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = []
    for dtype in a.dtypes.split(","):
        model = build(dtype)
        for n in (int(x) for x in a.lengths.split(",")):
            ids, mask = query(n)
            row = {"dtype": dtype, "tokens": n, **profile(model, ids, mask), "modules_ms": module_times(model, ids, mask)}
            if not a.no_onednn_verbose:
                row["onednn"] = reorders(dtype, n, a.threads)
            results.append(row)
            print(json.dumps(row), flush=True)
        del model
    print("\n| dtype | tokens | ms/forward | ops/forward | host syncs | GEMM ms | other ms | attention | routing | experts | dense MLP | rest | oneDNN calls | reorders/forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["modules_ms"]
        od = r.get("onednn", {})
        print(f"| {r['dtype']} | {r['tokens']} | {m['total']:.1f} | {r['ops_per_forward']:.0f} | {r['host_syncs_per_forward']:.0f} | "
              f"{r['gemm_ms']:.1f} | {r['other_ms']:.1f} | {m.get('attention', 0):.1f} | {m.get('routing', 0):.1f} | "
              f"{m.get('experts', 0):.1f} | {m.get('dense MLP', 0):.1f} | {m['rest (embeddings, LayerNorms, packing, pooling)']:.1f} | "
              f"{od.get('onednn_calls', '-')} | {od.get('reorders', '-')} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
