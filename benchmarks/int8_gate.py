"""The int8 gate: cosine to fp32 on every text of the verification and benchmark sets, routing flips
counted, batch invariance and one query's latency, for each way of quantizing the activations (and
per-token activations through the few-row kernel, where the CPU has AVX512_VNNI).

    python benchmarks/int8_gate.py MODEL_DIR [--threads 2] [--repeats 20]

Texts: the release verification's texts (with their prompts, through the folder's tokenizer), the
latency benchmark's 32- and 128-token queries, and 16 texts of 12-400 tokens (the serving
benchmark's range). A routing flip is a (token, MoE layer) whose set of top-k experts differs from
fp32's; shown as a share of all (token, layer) pairs and for the worst layer. Batch invariance: the
largest difference between a text's vector alone and inside one padded batch of all the texts.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def log(msg):
    print(f"[int8-gate] {msg}", file=sys.stderr, flush=True)


def texts(model_dir):
    from transformers import AutoTokenizer

    from nomic_moe_conversion.release import TEXTS

    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    prompts = {"query": "search_query: ", "document": "search_document: ", "passage": "search_document: ",
               "classification": "classification: ", "clustering": "clustering: "}
    out = [("verify:" + name, tok(prompts[name] + text, truncation=True, max_length=512)["input_ids"]) for name, text in TEXTS]
    g = torch.Generator().manual_seed(0)
    for n in (32, 128):
        ids = torch.randint(3, 1000, (n,), generator=g).tolist()
        out.append((f"query:{n}", [0] + ids[1:-1] + [2]))
    lengths = torch.randint(12, 401, (16,), generator=g).tolist()
    for i, n in enumerate(lengths):
        out.append((f"bench:{n}", [0] + torch.randint(3, 1000, (n - 2,), generator=g).tolist() + [2]))
    return out


@torch.inference_mode()
def run_one(model, ids, top_k):
    """(sentence vector [H], top-k expert sets per MoE layer [L, n, k] sorted)"""
    t = torch.tensor([ids])
    out = model(input_ids=t, attention_mask=torch.ones_like(t), return_sentence_embedding=True, output_router_logits=True)
    sets = torch.stack([r.topk(top_k, -1).indices.sort(-1).values for r in out.router_logits])
    return out.sentence_embedding[0], sets


@torch.inference_mode()
def batch_drift(model, items):
    """Largest |vector alone - vector inside one padded batch of every text|."""
    S = max(len(ids) for _, ids in items)
    ids = torch.ones(len(items), S, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (_, x) in enumerate(items):
        ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    together = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
    alone = torch.stack([model(input_ids=torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                               return_sentence_embedding=True).sentence_embedding[0] for _, x in items])
    return (together - alone).abs().max().item()


def p50_ms(model, ids, repeats):
    t = torch.tensor([ids])
    m = torch.ones_like(t)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=t, attention_mask=m)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=t, attention_mask=m)
            times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "out/int8_gate.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

    items = texts(a.model_dir)
    load = lambda: NomicMoEModel.from_pretrained(a.model_dir).eval()  # noqa: E731 - this checkout's code, not the folder's copy
    ref_model = load()
    k = ref_model.config.num_experts_per_tok
    log(f"fp32 reference on {len(items)} texts")
    ref = [run_one(ref_model, ids, k) for _, ids in items]
    queries = {n: ids for name, ids in items if name.startswith("query:") for n in [int(name.split(":")[1])]}
    rows = [{"mode": "fp32", "min_cosine": 1.0, "flip_share": 0.0, "worst_layer_flip_share": 0.0,
             "batch_drift": batch_drift(ref_model, items),
             **{f"p50_ms_{n}": p50_ms(ref_model, ids, a.repeats) for n, ids in queries.items()}}]
    del ref_model
    from nomic_moe_kernels import small_gemm

    kernel = small_gemm.load()
    modes = [("per_token", None), ("per_batch", None)] + ([("per_token", kernel)] if kernel is not None and kernel.int8 else [])
    for mode, with_kernel in modes:
        model = load()
        model.set_cpu_kernel(with_kernel)  # the few-row kernel (AVX512_VNNI): the same sums as per_token's torch._int_mm
        model.quantize_int8(activations=mode)
        mode = f"{mode} + few-row kernel" if with_kernel is not None else mode
        log(f"int8 {mode}")
        cos, flips, pairs = [], None, 0
        for (name, ids), (rv, rsets) in zip(items, ref):
            v, sets = run_one(model, ids, k)
            cos.append((name, float(torch.nn.functional.cosine_similarity(v, rv, 0))))
            changed = (sets != rsets).any(-1).sum(-1)  # [L] tokens whose expert set moved
            flips = changed if flips is None else flips + changed
            pairs += len(ids)
        worst = min(cos, key=lambda c: c[1])
        rows.append({"mode": f"int8 {mode}", "min_cosine": worst[1], "worst_text": worst[0],
                     "flip_share": float(flips.sum()) / (pairs * len(flips)), "worst_layer_flip_share": float(flips.max()) / pairs,
                     "batch_drift": batch_drift(model, items),
                     **{f"p50_ms_{n}": p50_ms(model, ids, a.repeats) for n, ids in queries.items()}})
        del model
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(f"{len(items)} texts, {torch.backends.cpu.get_cpu_capability()}, {a.threads} threads")
    print("| mode | min cosine to fp32 (text) | routing flips, all layers | worst layer | max batch drift | p50 32 tok ms | p50 128 tok ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['min_cosine']:.5f} ({r.get('worst_text', '-')}) | {100 * r['flip_share']:.2f}% | "
              f"{100 * r['worst_layer_flip_share']:.2f}% | {r['batch_drift']:.1e} | {r['p50_ms_32']:.1f} | {r['p50_ms_128']:.1f} |")


if __name__ == "__main__":
    main()
