"""Why runtimes disagree, in numbers: each engine's embeddings against our fp32 reference on the same texts.

    python benchmarks/engine_parity.py [--real-size] [--llama-cpp] [--out FILE]

Builds a random checkpoint (seed 0), releases it in the published layout (so every file an engine
reads is the one we publish), then embeds TEXTS through every path and compares each with the
plain fp32 implementation of SPEC §2 (conversion/reference.py) on the same token ids:

  PyTorch fp32 / bf16 / fp16   AutoModel with trust_remote_code, mean pooling
  ONNX Runtime CPU             each file in onnx/ (fp16 needs the CUDA provider: reported, not run)
  llama.cpp f32                the GGUF from convert_hf_to_gguf.py, llama-embedding (--llama-cpp):
                               with the expert bias as published (llama.cpp drops it), and on a
                               copy whose expert bias is zero (its own reference)
  TEI (emulated)               not run here (Rust, candle): its math, tanh-GELU everywhere, in the
                               plain reference

Prints a Markdown table for benchmarks/RESULTS.md and writes JSON with --out.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

TEXTS = [
    "search_query: What food did they eat?",
    "search_document: The settlers ate bread, salted fish and wild berries through the winter.",
    "search_query: thunderstorms",
    "search_document: Thunderstorms are expected this afternoon across the northern plains.",
    "classification: This movie was a delight from start to finish.",
    "clustering: Quarterly earnings beat analyst expectations.",
    "search_document: Bonjour, comment allez-vous aujourd'hui ?",
    "search_document: Die Katze schläft auf dem Sofa.",
]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def compare(name, emb, ref, note=""):
    emb, ref = (t.float() if torch.is_tensor(t) else torch.from_numpy(np.asarray(t)).float() for t in (emb, ref))
    cos = F.cosine_similarity(emb, ref, dim=-1)
    return {"path": name, "min_cosine": cos.min().item(), "mean_cosine": cos.mean().item(),
            "max_abs": (emb - ref).abs().max().item(), "note": note}


def reference_embeddings(weights, kw, batch, gelu="none"):
    from nomic_moe_conversion.reference import mean_pool, reference_forward

    return mean_pool(reference_forward(weights, kw, batch["input_ids"], batch["attention_mask"], gelu=gelu), batch["attention_mask"])


@torch.no_grad()
def measure(real_size=False, llama=False, work=None):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    from nomic_moe_conversion.layout import our_config_kwargs
    from nomic_moe_conversion.release import release
    from nomic_moe_conversion.synthetic import make_published_checkpoint, real_size_shape
    from nomic_moe_inference.onnx_encoder import OnnxEncoder

    work = Path(work or tempfile.mkdtemp(prefix="nomic-moe-parity-"))
    shape = real_size_shape(vocab_size=512) if real_size else dict(num_experts=8, top_k=2, num_layers=4)
    log(f"checkpoint: {'real size (vocabulary 512)' if real_size else 'small'} random weights, seed 0")
    src = make_published_checkpoint(work / "src", seed=0, weight_std=0.02 if real_size else None, **shape)
    folder = release(str(src), str(work / "published"), layout_name="published", synthetic=True, force=True).folders["main"]

    weights = load_file(str(src / "model.safetensors"))
    kw = our_config_kwargs(json.loads((src / "config.json").read_text()))
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=512, return_tensors="pt")
    ref = reference_embeddings(weights, kw, batch)
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).eval()
        emb = model(**batch, return_sentence_embedding=True).sentence_embedding
        rows.append(compare(f"PyTorch {str(dtype)[6:]} (AutoModel)", emb, ref))
        del model
    for onnx_file in sorted((folder / "onnx").glob("*.onnx")):
        try:
            enc = OnnxEncoder(folder, f"onnx/{onnx_file.name}", provider="cpu")
            rows.append(compare(f"ONNX Runtime CPU {onnx_file.name}", enc.encode(TEXTS), ref))
        except Exception as e:  # the fp16 graph: CUDA provider only
            rows.append({"path": f"ONNX Runtime CPU {onnx_file.name}", "min_cosine": None, "mean_cosine": None,
                         "max_abs": None, "note": f"not run on the CPU provider ({type(e).__name__}); for CUDA"})
    rows.append(compare("TEI (emulated: tanh-GELU everywhere, fp32)", reference_embeddings(weights, kw, batch, gelu="tanh"), ref,
                        "not run here; its math in the plain reference"))
    if llama:
        import llama_cpp

        tools = llama_cpp.prepare()
        gguf = llama_cpp.to_gguf(tools, folder, work / "model-f32.gguf")
        rows.append(compare("llama.cpp f32, expert bias as published", llama_cpp.embed(tools, gguf, TEXTS), ref,
                            "llama.cpp drops experts.bias"))
        zero = work / "published-zero-bias"
        shutil.copytree(folder, zero, ignore=shutil.ignore_patterns("onnx"))
        w0 = {k: (torch.zeros_like(t) if k.endswith("mlp.experts.bias") else t) for k, t in weights.items()}
        save_file(w0, str(zero / "model.safetensors"), metadata={"format": "pt"})
        gguf0 = llama_cpp.to_gguf(tools, zero, work / "model-f32-zero-bias.gguf")
        rows.append(compare("llama.cpp f32, expert bias zero", llama_cpp.embed(tools, gguf0, TEXTS),
                            reference_embeddings(w0, kw, batch), "against the reference on the same zero-bias weights"))
    return {"texts": TEXTS, "real_size": real_size, "rows": rows, "date": time.strftime("%Y-%m-%d"), "work": str(work)}


def markdown(result) -> str:
    lines = ["| path | min cosine to fp32 reference | mean cosine | max abs diff | note |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["min_cosine"] is None:
            lines.append(f"| {r['path']} | - | - | - | {r['note']} |")
        else:
            lines.append(f"| {r['path']} | {r['min_cosine']:.6f} | {r['mean_cosine']:.6f} | {r['max_abs']:.1e} | {r['note']} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real-size", action="store_true", help="the published shapes (vocabulary cut to 512 rows)")
    p.add_argument("--llama-cpp", action="store_true", help="build llama.cpp from the PyPI sdist (cached) and add its rows")
    p.add_argument("--out")
    p.add_argument("--workdir")
    a = p.parse_args()
    torch.set_num_threads(2)
    result = measure(a.real_size, a.llama_cpp, a.workdir)
    print(markdown(result))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
