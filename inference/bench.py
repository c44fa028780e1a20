"""`nomic-moe bench`: the MoE model's speed against the upstream-style path and the hardware limit.

Full-size model with random weights (speed does not depend on the values), a fixed mixed-length
workload (log-normal lengths, median ~100 tokens, max 512), throughput counted in real tokens.

  upstream-style  the published remote code's way: padded batch through every layer, a Python loop
                  over experts with a host sync each (torch.where), padding routed through experts
  ours/<backend>  packed real tokens, each expert backend in turn
  limit           a plain dense GEMM of the FFN's shape, measured here: FLOP/s / FLOPs per real token
"""

import json
import math
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .batching import length_batches

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def workload(n_texts: int, seed: int = 0, median: float = 100.0, sigma: float = 0.8, max_len: int = 512) -> List[int]:
    """Token counts of the fixed mixed-length workload (special tokens included)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + sigma * torch.randn(n_texts, generator=g)).round().clamp(4, max_len)
    return [int(n) for n in lengths]


def make_inputs(lengths, idx, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed + idx[0])
    S = max(lengths[i] for i in idx)
    ids = torch.ones(len(idx), S, dtype=torch.long)
    mask = torch.zeros(len(idx), S, dtype=torch.long)
    for b, i in enumerate(idx):
        n = lengths[i]
        ids[b, :n] = torch.randint(3, vocab, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 0, 2
        mask[b, :n] = 1
    return ids.to(device), mask.to(device)


def flops_per_token(cfg, mean_len: float) -> float:
    """Matmul FLOPs per real token: projections, dense MLPs, routed experts, router, attention."""
    H, I, L, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_experts_per_tok
    n_moe = sum(cfg.is_moe_layer(i) for i in range(L))
    per_layer = 2 * H * 3 * H + 2 * H * H + 2 * 2 * mean_len * H  # qkv, out, scores + weighted sum
    return L * per_layer + (L - n_moe) * 2 * 2 * H * I + n_moe * (k * 2 * 2 * H * I + 2 * H * cfg.num_experts)


# ------------------------------------------------------------------------------------------------
# The upstream-style path, on the same weights
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def upstream_style_forward(model, ids, mask):
    """Padded batch everywhere; experts looped in Python with a host sync each; padding routed too."""
    from nomic_moe_modeling.modeling_nomic_moe import apply_rope, rope_cos_sin

    B, S = ids.shape
    emb = model.embeddings
    x = model.emb_ln(emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0])  # [B, S, H]
    H = x.shape[-1]
    positions = torch.arange(S, device=ids.device).repeat(B)
    additive = (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    for layer in model.encoder.layers:
        a = layer.attn
        q, k, v = a.Wqkv(x).view(B * S, 3, a.num_heads, a.head_dim).unbind(1)
        cos, sin = rope_cos_sin(positions, a.head_dim, a.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.view(B, S, a.num_heads, a.head_dim).transpose(1, 2) for t in (q, k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=additive).transpose(1, 2).reshape(B, S, H)
        x = layer.norm1(x + a.out_proj(ctx))
        if layer.is_moe:
            flat = x.view(B * S, H)
            probs = F.linear(flat.float(), layer.mlp.router.layer.weight.float()).softmax(-1)
            w, top = probs.topk(layer.mlp.router.top_k, dim=-1)
            w = w.to(x.dtype)
            ex = layer.mlp.experts
            w1, w2 = ex.mlp.per_expert()  # [E, I, H] each
            out = torch.zeros_like(flat)
            for e in range(w1.shape[0]):
                tok, slot = torch.where(top == e)
                if tok.numel() == 0:  # host sync, once per expert per layer
                    continue
                y = F.gelu(flat[tok] @ w1[e].T) @ w2[e]
                out.index_add_(0, tok, y * w[tok, slot, None])
            m = (out + ex.bias).view(B, S, H)
        else:
            m = layer.mlp.fc2(F.gelu(layer.mlp.fc1(x)))
        x = layer.norm2(x + m)
    return x


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    path: str
    dtype: str
    batching: str
    tokens: int
    seconds: float
    tokens_per_s: float
    peak_mem_mib: Optional[float] = None
    extra: dict = field(default_factory=dict)


def run_path(name, fn, inputs, n_tokens, device, dtype, batching, repeats=1):
    fn(*inputs[0])  # warm-up: kernel choice, allocator, compilation
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for ids, mask in inputs:
            fn(ids, mask)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    row = Row(name, str(dtype).replace("torch.", ""), batching, n_tokens, best, n_tokens / best, peak)
    log(f"  {name:<22} {row.dtype:<9} {batching:<8} {row.tokens_per_s:10.0f} tok/s  ({best:.2f}s)")
    return row


def _best_time(fn, device, repeats=5):
    fn()
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def dense_pair_time(a, w1, w2, device, gelu=False):
    """Seconds for the FFN GEMM pair a @ w1.T (GELU) @ w2.T, the faster of torch's GEMM and, on the CPU,
    oneDNN's packed product (on AMD CPUs MKL's fp32 GEMM runs at less than half of oneDNN's, and the
    model takes the packed one there): the dense yardstick of the limit and of the MoE block."""
    from nomic_moe_modeling.experts_nomic_moe import can_run_packed, pack_linear, packed_linear

    act = F.gelu if gelu else (lambda t: t)
    best = _best_time(lambda: F.linear(act(F.linear(a, w1)), w2), device)
    with torch.no_grad():
        if can_run_packed(a):
            p1, p2 = pack_linear(w1), pack_linear(w2)
            best = min(best, _best_time(lambda: packed_linear(act(packed_linear(a, p1)), p2), device))
    return best


def gemm_flops(device, dtype, M=4096, H=768, I=3072):
    """The hardware limit as this machine's GEMM libraries show it: a dense FFN GEMM pair, FLOP/s."""
    a = torch.randn(M, H, device=device, dtype=dtype)
    w1 = torch.randn(I, H, device=device, dtype=dtype)
    w2 = torch.randn(H, I, device=device, dtype=dtype)
    return 2 * 2 * M * H * I / dense_pair_time(a, w1, w2, device)


@torch.no_grad()
def moe_layer_vs_dense(model, device, dtype, n_tokens=8192):
    """One MoE block (route + experts) against a dense GEMM pair of the same FLOPs (N*k rows)."""
    from nomic_moe_modeling.modeling_nomic_moe import Packing

    layer = next(l for l in model.encoder.layers if l.is_moe).mlp
    H = model.config.hidden_size
    I = model.config.intermediate_size
    k = model.config.num_experts_per_tok
    x = torch.randn(n_tokens, H, device=device, dtype=dtype)
    packing = Packing.from_mask(torch.ones(1, n_tokens, dtype=torch.bool, device=device))
    moe = _best_time(lambda: layer(x, packing), device)
    a = torch.randn(n_tokens * k, H, device=device, dtype=dtype)
    w1 = torch.randn(I, H, device=device, dtype=dtype)
    w2 = torch.randn(H, I, device=device, dtype=dtype)
    dense = dense_pair_time(a, w1, w2, device, gelu=True)
    return {"moe_ms": moe * 1e3, "dense_pair_ms": dense * 1e3, "ratio": moe / dense, "tokens": n_tokens}


@torch.no_grad()
def query_latency(model, device, n=32, repeats=20):
    ids = torch.randint(3, 1000, (1, n), device=device)
    times = []
    model(input_ids=ids)
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def query_latency_graphed(model, device, n=32, repeats=50):
    """A 32-token query through a captured CUDA graph (nomic_moe_inference.cuda_graphs), ids in and vector out"""
    from .cuda_graphs import GraphedEmbedder

    g = GraphedEmbedder.for_model(model)
    if g is None:
        return None
    ids = [torch.randint(3, 1000, (n,)).tolist()]
    if g.embed(ids) is None:  # the capture, checked against forward
        log(f"CUDA graphs: {g.broken}")
        return None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        g.embed(ids)  # returns host arrays: synchronised
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


@torch.no_grad()
def embeddings(model, inputs):
    return torch.cat([model(input_ids=i, attention_mask=m, return_sentence_embedding=True).sentence_embedding.float().cpu()
                      for i, m in inputs])


def build_model(device, seed=0):
    from nomic_moe_modeling.configuration_nomic_moe import NomicMoEConfig
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

    torch.manual_seed(seed)
    cfg = NomicMoEConfig()
    model = NomicMoEModel(cfg).eval()
    with torch.no_grad():  # a router as decisive as the published one: top-2 weights sum to ~0.7
        for layer in model.encoder.layers:
            if layer.is_moe:
                layer.mlp.router.layer.weight.normal_(0.0, 1.6 / cfg.hidden_size**0.5)
    return model.to(device)


def bench(device="cpu", dtypes=("float32", "bfloat16"), n_texts=64, batch_size=32, threads=None,
          backends=None, sorted_batches=(False, True), upstream=True, out=None, repeats=2):
    from nomic_moe_modeling.experts_nomic_moe import Target, why_unavailable

    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    lengths = workload(n_texts)
    n_tokens = sum(lengths)
    model = build_model(device)
    if device.type == "cpu":  # as our encoders and server run it: the package's CPU kernel where it builds
        from .cpu import use_cpu_kernels

        log(f"CPU kernels: {use_cpu_kernels(model)}")
    cfg = model.config
    fpt = flops_per_token(cfg, sum(n * n for n in lengths) / n_tokens)
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "texts": n_texts,
        "real_tokens": n_tokens,
        "median_len": sorted(lengths)[len(lengths) // 2],
        "max_len": max(lengths),
        "gflop_per_token": fpt / 1e9,
    }
    log(f"workload: {n_texts} texts, {n_tokens} real tokens, median {env['median_len']}, max {env['max_len']}; "
        f"{fpt / 1e9:.3f} GFLOP per real token; device {env['device']}, {env['threads']} threads")
    if backends is None:
        # auto: what a user gets (on the CPU the packed weights and the few-row kernel); the others by name
        backends = ["auto", "eager", "sorted", "grouped_mm"] + (["triton"] if device.type == "cuda" else [])
    rows, limits, cosines, extras = [], {}, {}, {}
    reference_emb = None
    for dname in dtypes:
        if dname == "int8":  # a fresh fp32 model, its matrices made int8 (the float copies are dropped)
            model = build_model(device)
            model.quantize_int8()
            dtype = torch.float32
            limits[dname] = gemm_flops(device, dtype)
            extras[dname] = {"query32_ms": query_latency(model, device), "moe_layer": moe_layer_vs_dense(model, device, dtype)}
            for sort in sorted_batches:
                batching = "sorted" if sort else "arrival"
                inputs = [make_inputs(lengths, idx, cfg.vocab_size, device) for idx in length_batches(lengths, batch_size, sort)]
                with torch.no_grad():
                    row = min((run_path("ours/int8", lambda i, m: model(input_ids=i, attention_mask=m), inputs, n_tokens, device, dtype, batching)
                               for _ in range(repeats)), key=lambda r: r.seconds)
                row.dtype = "int8"
                row.extra["fraction_of_limit"] = row.tokens_per_s * fpt / limits[dname]
                row.extra["limit_gflops"] = limits[dname] / 1e9
                rows.append(row)
                if not sort and reference_emb is not None:
                    cosines[dname] = float((embeddings(model, inputs) * reference_emb).sum(-1).min())
            continue
        dtype = DTYPES[dname]
        model.to(dtype)
        limits[dname] = gemm_flops(device, dtype)
        log(f"{dname}: dense GEMM {limits[dname] / 1e9:.1f} GFLOP/s -> limit {limits[dname] / fpt:.0f} real tok/s")
        extras[dname] = {"query32_ms": query_latency(model, device), "query32_graph_ms": query_latency_graphed(model, device),
                         "moe_layer": moe_layer_vs_dense(model, device, dtype)}
        graphed = extras[dname]["query32_graph_ms"]
        log(f"{dname}: one 32-token query {extras[dname]['query32_ms']:.1f} ms (auto backend)"
            + (f", {graphed:.2f} ms through a CUDA graph" if graphed else "") + "; MoE block "
            f"{extras[dname]['moe_layer']['ratio']:.2f}x a dense GEMM pair of the same FLOPs")
        runnable = []  # grouped_mm takes bf16 only: fp16 on an H200 skips it, with the reason
        for b in backends:
            why = None if b == "auto" else why_unavailable(b, Target.of(device, dtype), False)
            if why:
                log(f"{dname}: {b} skipped: {why}")
            else:
                runnable.append(b)
        for sort in sorted_batches:
            batching = "sorted" if sort else "arrival"
            inputs = [make_inputs(lengths, idx, cfg.vocab_size, device) for idx in length_batches(lengths, batch_size, sort)]
            paths = ([("upstream-style", None)] if upstream else []) + [(f"ours/{b}", b) for b in runnable]
            best = {}
            with torch.no_grad():
                # Interleaved repeats, each with the GEMM limit measured just before it: shared machines
                # drift (we saw the same GEMM run at 200 and at 100 GFLOP/s an hour apart), and a
                # ratio is only honest between runs taken under the same conditions.
                for _ in range(repeats):
                    for name, backend in paths:
                        if backend is None:
                            fn = lambda i, m: upstream_style_forward(model, i, m)  # noqa: E731
                        else:
                            model.set_moe_implementation(backend)
                            fn = lambda i, m: model(input_ids=i, attention_mask=m)  # noqa: E731
                        limit = gemm_flops(device, dtype, M=2048)
                        row = run_path(name, fn, inputs, n_tokens, device, dtype, batching)
                        row.extra["fraction_of_limit"] = row.tokens_per_s * fpt / limit
                        row.extra["limit_gflops"] = limit / 1e9
                        if name not in best or row.tokens_per_s > best[name].tokens_per_s:
                            best[name] = row
                model.set_moe_implementation("auto")
            rows.extend(best[name] for name, _ in paths)
            if not sort:
                emb = embeddings(model, inputs)
                if reference_emb is None:
                    reference_emb = emb
                cosines[dname] = float((emb * reference_emb).sum(-1).min())
    result = {"env": env, "limits_flops": limits, "min_cosine_to_first_dtype": cosines, "rows": [asdict(r) for r in rows],
              "per_dtype": extras,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print_table(result)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {out}")
    return result


def print_table(result):
    rows = result["rows"]
    first = rows[0]["dtype"] if rows else ""
    base = {r["batching"]: r["tokens_per_s"] for r in rows if r["path"] == "upstream-style" and r["dtype"] == first}
    print(f"\n| path | dtype | batching | real tok/s | x upstream-style {first} | % of GEMM limit (GFLOP/s then) | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = r["tokens_per_s"] / base[r["batching"]] if r["batching"] in base else float("nan")
        mem = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] else "-"
        print(f"| {r['path']} | {r['dtype']} | {r['batching']} | {r['tokens_per_s']:.0f} | {speedup:.2f} | "
              f"{100 * r['extra']['fraction_of_limit']:.0f}% ({r['extra']['limit_gflops']:.0f}) | {mem} |")
    for d, x in result.get("per_dtype", {}).items():
        m = x["moe_layer"]
        graphed = f" ({x['query32_graph_ms']:.2f} ms through a CUDA graph)" if x.get("query32_graph_ms") else ""
        print(f"{d}: one 32-token query {x['query32_ms']:.1f} ms{graphed}; MoE block over {m['tokens']} tokens "
              f"{m['moe_ms']:.1f} ms vs dense GEMM pair {m['dense_pair_ms']:.1f} ms ({m['ratio']:.2f}x)")
    if result["min_cosine_to_first_dtype"]:
        print(f"\nmin embedding cosine to the first dtype: {result['min_cosine_to_first_dtype']}")
    print(f"peak RSS: {result['peak_rss_mib']:.0f} MiB")


# ------------------------------------------------------------------------------------------------
# ONNX Runtime against PyTorch, same workload
# ------------------------------------------------------------------------------------------------


def bench_onnx(model_dir, files=("model.onnx", "model_fused.onnx", "model_qint8_avx512.onnx"), provider="cpu",
               torch_dtypes=("float32", "bfloat16"), n_texts=64, batch_size=32, threads=None, out=None, sort=False):
    """ORT sessions on MODEL_DIR/onnx/* against the PyTorch model on the same batches, real tokens/s.

    sort=False: arrival order (what a server sees); sort=True: batches of similar lengths, as
    OnnxEncoder and sentence-transformers make them (the graphs run the padded batch, PyTorch does not).
    """
    batching = "sorted" if sort else "arrival"
    from pathlib import Path

    from transformers import AutoModel

    from .onnx_encoder import sentence_embeddings, session

    model_dir = Path(model_dir)
    device = torch.device("cuda" if provider == "cuda" else "cpu")
    if threads:
        torch.set_num_threads(threads)
    lengths = workload(n_texts)
    n_tokens = sum(lengths)
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.float32).eval().to(device)
    inputs = [make_inputs(lengths, idx, model.config.vocab_size, device) for idx in length_batches(lengths, batch_size, sort)]
    log(f"workload: {n_texts} texts, {n_tokens} real tokens, {batching} batches; provider {provider}, {torch.get_num_threads()} torch threads")
    rows, cos = [], {}
    with torch.no_grad():
        reference = embeddings(model, inputs)
        for dname in torch_dtypes:
            model.to(DTYPES[dname])
            rows.append(run_path("pytorch", lambda i, m: model(input_ids=i, attention_mask=m), inputs, n_tokens, device, DTYPES[dname], batching))
    del model
    cpu_inputs = [(i.cpu().numpy(), m.cpu().numpy()) for i, m in inputs]
    for name in files:
        sess = session(model_dir / "onnx" / name, provider, threads)
        run = lambda ids, mask, sess=sess: sentence_embeddings(sess, ids, mask)  # noqa: E731
        emb = torch.cat([torch.from_numpy(run(i, m)).float() for i, m in cpu_inputs])
        cos[name] = float((emb * reference).sum(-1).min())
        row = run_path(f"onnxruntime/{name}", run, cpu_inputs, n_tokens, torch.device("cpu"), torch.float32, batching)
        row.dtype = "fp16" if "fp16" in name else ("int8" if "int8" in name else "float32")
        rows.append(row)
    base = rows[0].tokens_per_s
    print(f"\n| path | dtype | real tok/s | x PyTorch {rows[0].dtype} | min cosine to PyTorch fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        c = cos.get(r.path.split("/", 1)[-1], None)
        print(f"| {r.path} | {r.dtype} | {r.tokens_per_s:.0f} | {r.tokens_per_s / base:.2f} | {'' if c is None else f'{c:.5f}'} |")
    result = {"provider": provider, "batching": batching, "texts": n_texts, "real_tokens": n_tokens, "rows": [asdict(r) for r in rows], "min_cosine": cos}
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        log(f"wrote {out}")
    return result
