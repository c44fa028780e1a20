"""GPU correctness checks, run by benchmarks/gpu_check.sh on a lent GPU before the benchmark.

Each backend on CUDA against eager (fp32 to 1e-5 with exact products; fp16/bf16 by cosine), the
varlen attention path against padded SDPA, and the whole model in bf16 on CUDA against fp32 on the
CPU with near-tie routing flips counted. Prints one line per check and exits non-zero on failure.
"""

import sys

import torch
import torch.nn.functional as F

from nomic_moe_conversion.release import half_precision_row
from nomic_moe_modeling.configuration_nomic_moe import NomicMoEConfig
from nomic_moe_modeling.experts_nomic_moe import BACKENDS, Target, why_unavailable
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel, NomicMoERouter

failures = []


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        failures.append(name)


def case(N, dtype, device, H=768, I=3072, E=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = NomicMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k)
    router = NomicMoERouter(cfg)
    with torch.no_grad():
        router.layer.weight.copy_(torch.randn(E, H, generator=g) * H**-0.5)
    x = torch.randn(N, H, generator=g)
    w1 = torch.randn(E, I, H, generator=g) * H**-0.5
    w2 = torch.randn(E, I, H, generator=g) * I**-0.5
    router = router.to(device)
    x, w1, w2 = (t.to(device, dtype) for t in (x, w1, w2))
    with torch.no_grad():
        return x, router(x), w1, w2


def graphs_check(gpu_model, cpu_model, dev):
    """Short batches through captured CUDA graphs (GraphedEmbedder) at the real size, against fp32 on the CPU; and their latency."""
    import numpy as np

    from nomic_moe_inference.batching import pad_batch
    from nomic_moe_inference.bench import query_latency_graphed
    from nomic_moe_inference.cuda_graphs import GraphedEmbedder

    g = GraphedEmbedder(gpu_model, pad_id=1)  # built here, not by for_model: the CPU smoke run of this check uses it too
    rng = np.random.default_rng(0)
    for lengths in ([32], [12, 40, 7], [128] * 8, [30] * 64, [7]):
        rows = [[0] + rng.integers(3, 250000, n - 2).tolist() + [2] for n in lengths]
        out = g.embed(rows)
        if out is None:
            check("CUDA graphs", False, f"turned off: {g.broken}")
            return
        got = out[0]
        ids, mask = (torch.from_numpy(a) for a in pad_batch(rows, list(range(len(rows))), 1))
        with torch.no_grad():
            want = cpu_model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
        c = F.cosine_similarity(torch.from_numpy(got), want, dim=-1).min().item()
        check(f"CUDA graph bf16, {len(rows)} x up to {max(lengths)} tokens, vs fp32 cpu", c >= 0.999, f"min cosine {c:.5f}")
    for n in (32, 128):
        print(f"CUDA graph: one {n}-token query p50 {query_latency_graphed(gpu_model, dev, n):.2f} ms "
              f"(ids in, vector back on the host)", flush=True)


def tile_sweep(dev, N=16384):
    """The triton pair under other tiles, timed at the real shape (the default is chosen from compile reports)."""
    import nomic_moe_modeling.experts_nomic_moe as ex

    if why_unavailable("triton", Target.of(dev, torch.bfloat16), False):
        return
    default = ex._tiles
    configs = [((64, 128, 64), 8, 3), ((64, 128, 64), 4, 3), ((128, 128, 64), 8, 3), ((64, 128, 32), 4, 4), ((128, 64, 64), 8, 3),
               ((64, 64, 64), 4, 4)]
    x, r, w1, w2 = case(N, torch.bfloat16, dev)
    print(f"triton tile sweep, bf16, {N} tokens x top-2, real shape:", flush=True)
    try:
        for (bm, bn, bk), warps, stages in configs:
            ex._tiles = lambda cap=None, c=(bm, bn, bk, warps, stages): (dict(BLOCK_M=c[0], BLOCK_N=c[1], BLOCK_K=c[2]),
                                                                         dict(num_warps=c[3], num_stages=c[4]))
            try:
                for _ in range(3):
                    BACKENDS["triton"](x, r, w1, w2)
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(10):
                    BACKENDS["triton"](x, r, w1, w2)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end) / 10
                flops = 2 * 2 * N * 2 * 768 * 3072
                print(f"  {bm}x{bn}x{bk} warps {warps} stages {stages}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is a finding
                print(f"  {bm}x{bn}x{bk} warps {warps} stages {stages}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    finally:
        ex._tiles = default


def main():
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 checks compare exact fp32 products
    print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for N in (1, 7, 333, 4096):
                x, r, w1, w2 = case(N, dtype, dev)
                ref = BACKENDS["eager"](x.float(), r, w1.float(), w2.float())
                for name in ("sorted", "grouped_mm", "triton"):
                    why = why_unavailable(name, Target.of(dev, dtype), False)
                    if why:
                        print(f"SKIP  {name} {dtype} N={N}: {why}")
                        continue
                    try:
                        got = BACKENDS[name](x, r, w1, w2).float()
                    except Exception as e:  # a backend that crashes here is a finding, not a stop
                        check(f"{name} {dtype} N={N}", False, f"{type(e).__name__}: {e}")
                        continue
                    if dtype == torch.float32:
                        d = (got - ref).abs().max().item()
                        check(f"{name} fp32 N={N}", d <= 1e-4, f"max abs diff {d:.2e}")  # TF32 is off
                    else:
                        c = F.cosine_similarity(got, ref, dim=-1).min().item()
                        check(f"{name} {str(dtype)[6:]} N={N}", c >= 0.999, f"min cosine {c:.5f}")

        torch.manual_seed(0)
        cfg = NomicMoEConfig()
        cpu_model = NomicMoEModel(cfg).eval()
        for layer in cpu_model.encoder.layers:
            if layer.is_moe:
                layer.mlp.router.layer.weight.normal_(0.0, 1.6 / cfg.hidden_size**0.5)
        lengths = [512, 300, 100, 32, 7, 1]
        ids = torch.ones(len(lengths), 512, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(lengths):
            ids[b, :n] = torch.randint(3, 250000, (n,))
            mask[b, :n] = 1
        ref = cpu_model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        gpu_model = NomicMoEModel(cfg).eval()
        gpu_model.load_state_dict(cpu_model.state_dict())
        gpu_model = gpu_model.to(dev, torch.bfloat16)
        m = mask[..., None].float()
        e32 = F.normalize((ref.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
        for impl in ("sorted", "grouped_mm", "triton", "auto"):
            if impl != "auto" and why_unavailable(impl, Target.of(dev, torch.bfloat16), False):
                continue
            gpu_model.set_moe_implementation(impl)
            out = gpu_model(input_ids=ids.to(dev), attention_mask=mask.to(dev), output_router_logits=True)
            h = out.last_hidden_state.float().cpu()
            e16 = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
            row = half_precision_row("bf16", e16, e32, ref.router_logits, [l.cpu() for l in out.router_logits], mask)
            check(f"model bf16 cuda ({impl}) vs fp32 cpu", row["ok"],
                  f"min cosine {row['min_cosine']:.5f} ({row['min_cosine_without_flips']:.5f} without flips), "
                  f"routing flips {row['routing_flips']}; {gpu_model.encoder.layers[1].mlp.experts.extra_repr()}")
        # varlen attention (packed, no padding) against SDPA on the padded layout: one attention call on
        # the same q, k, v (through the whole model, routing flips between two bf16 runs would swamp it)
        from nomic_moe_modeling.modeling_nomic_moe import ATTENTION_KERNELS, Packing

        packing = Packing.from_mask(mask.bool().to(dev))
        g = torch.Generator(device=dev).manual_seed(1)
        n = int(mask.sum())
        q, k, v = (torch.randn(n, 12, 64, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(3))
        exact = ATTENTION_KERNELS["sdpa_padded"](*(t.float() for t in (q, k, v)), packing).float()
        for name in ("torch_varlen", "sdpa_padded"):
            try:
                got = ATTENTION_KERNELS[name](q, k, v, packing).float()
            except RuntimeError as e:
                print(f"SKIP  attention {name}: {e}", flush=True)
                continue
            c = F.cosine_similarity(got.flatten(1), exact.flatten(1), dim=-1).min().item()
            check(f"attention {name} bf16 vs fp32 padded", c >= 0.999, f"min token cosine {c:.5f}")
        graphs_check(gpu_model, cpu_model, dev)
    tile_sweep(dev)
    print(f"{len(failures)} failed" if failures else "all GPU checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
