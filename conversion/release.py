"""`nomic-moe release SRC OUT [--push ORG/NAME] [--dry-run]`: one verified command, checkpoint -> Hub repo.

convert (verified) -> export ONNX (validated) -> verify every loading path against the plain
reference -> render the model card -> move OUT into place -> optionally upload. Any path past its
bound fails the release and leaves no OUT.
"""

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source

from .convert import check_out_dir, load_checked, log, write_verified

TEXTS = [
    ("query", "What food did they eat?"),
    ("query", "thunderstorms"),
    ("document", "The settlers ate bread, salted fish and wild berries through the winter."),
    ("document", ""),
    ("passage", "¡Hola!"),
    ("classification", "This movie was a delight from start to finish. " * 60),  # past 512 tokens
    ("clustering", "Quarterly earnings beat analyst expectations."),
]
BOUNDS = {  # path kind -> (min cosine, max abs diff of last_hidden_state or None)
    "fp32": (0.99999, 1e-4),
    "fused": (0.9999, None),
    "half": (0.999, None),
}
REPO_FILES_FIRST = ("README.md", "config.json", "model.safetensors")


def results_md_default() -> Optional[Path]:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"
    return path if path.exists() else None


def _row(path, kind, cos, max_abs=None, extra=None):
    min_cos, abs_bound = BOUNDS[kind]
    ok = cos >= min_cos and (abs_bound is None or max_abs is None or max_abs <= abs_bound)
    bound = f"cos >= {min_cos}" + (f", abs <= {abs_bound:.0e}" if abs_bound is not None and max_abs is not None else "")
    row = {"path": path, "min_cosine": cos, "max_abs": max_abs, "bound": bound, "ok": bool(ok)}
    row.update(extra or {})
    return row


def half_precision_row(name, emb, ref, logits32, logits16, mask, max_flip_fraction=0.05, flipped_min_cos=0.99):
    """bf16/fp16 against the reference, with near-tie routing flips counted and bounded.

    A token whose top-k expert set differs from fp32's went through another expert: in a text with
    such a flip the vector can move past cosine 0.999 (measured: 0.9987 for a 9-token text whose
    2nd and 3rd router probabilities were 0.325 and 0.318). So texts without a flip must reach 0.999,
    texts with one 0.99, and flips must stay under 5% of the (token, layer) routing decisions.
    """
    k_flipped = torch.zeros(logits32[0].shape[0], dtype=torch.bool)  # token flipped in any layer
    decisions = flipped_decisions = 0  # (token, layer) routing decisions
    for a, b in zip(logits32, logits16):
        k = 2 if a.shape[-1] > 1 else 1
        top_a, top_b = a.topk(k).indices.sort(-1).values, b.float().topk(k).indices.sort(-1).values
        flipped = (top_a != top_b).any(-1).cpu()
        k_flipped |= flipped
        decisions += flipped.numel()
        flipped_decisions += int(flipped.sum())
    row_of_token = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask.bool()]
    text_flipped = torch.zeros(mask.shape[0], dtype=torch.bool).index_fill_(0, row_of_token[k_flipped], True)
    cos = F.cosine_similarity(emb.float(), ref, dim=-1)
    clean_min = cos[~text_flipped].min().item() if (~text_flipped).any() else 1.0
    flipped_min = cos[text_flipped].min().item() if text_flipped.any() else 1.0
    fraction = flipped_decisions / max(decisions, 1)
    ok = clean_min >= BOUNDS["half"][0] and flipped_min >= flipped_min_cos and fraction <= max_flip_fraction
    return {"path": name, "min_cosine": cos.min().item(), "max_abs": None, "ok": bool(ok),
            "bound": f"cos >= {BOUNDS['half'][0]} (texts with a routing flip: >= {flipped_min_cos}; flips <= {max_flip_fraction:.0%})",
            "routing_flips": f"{flipped_decisions}/{decisions} decisions, {int(k_flipped.sum())}/{k_flipped.numel()} tokens, "
                             f"{int(text_flipped.sum())} texts",
            "min_cosine_without_flips": clean_min}


@torch.no_grad()
def verify_release(folder: Path, kw: dict, published: dict) -> dict:
    """Every loading path against the plain reference of SPEC §2 on the source weights."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from .onnx_export import FILES
    from nomic_moe_inference.onnx_encoder import OnnxEncoder

    from .reference import mean_pool, reference_forward

    prompts = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    full = [prompts[p] + t for p, t in TEXTS]
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    batch = tok(full, padding=True, truncation=True, max_length=512, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_h = reference_forward({k: t.float() for k, t in published.items()}, kw, ids, mask)
    ref = mean_pool(ref_h, mask)
    real = mask.bool()
    paths = []

    def cos_to_ref(emb):
        return F.cosine_similarity(torch.as_tensor(emb).float(), ref, dim=-1).min().item()

    fp32_logits = None
    for dtype, kind in ((torch.float32, "fp32"), (torch.bfloat16, "half"), (torch.float16, "half")):
        model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype).eval()
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        h = out.last_hidden_state.float()
        finite = bool(torch.isfinite(h).all())
        name = f"transformers AutoModel {str(dtype)[6:]} + mean pooling"
        if kind == "fp32":
            fp32_logits = out.router_logits
            row = _row(name, kind, cos_to_ref(mean_pool(h, mask)), (h[real] - ref_h[real]).abs().max().item())
        else:
            row = half_precision_row(name, mean_pool(h, mask), ref, fp32_logits, out.router_logits, mask)
        row["finite"] = finite
        row["ok"] = row["ok"] and finite
        paths.append(row)
        if dtype == torch.float32:  # batch invariance: each text alone against the batch
            worst = 0.0
            for b in range(len(full)):
                n = int(mask[b].sum())
                alone = model(input_ids=ids[b : b + 1, :n]).last_hidden_state[0]
                worst = max(worst, (alone - h[b, :n]).abs().max().item())
            paths.append({"path": "batch invariance (AutoModel fp32, alone vs batched)", "min_cosine": 1.0,
                          "max_abs": worst, "bound": "abs <= 1e-05", "ok": worst <= 1e-5})
        del model

    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    st_emb = torch.cat([torch.as_tensor(st.encode([t], prompt_name=p, show_progress_bar=False)) for p, t in TEXTS])
    paths.append(_row("sentence-transformers (prompt names)", "fp32", cos_to_ref(st_emb)))

    for which, name in FILES.items():
        path = folder / "onnx" / name
        if not path.exists():
            continue
        kind = {"model": "fp32", "fused": "fused"}.get(which, "half")
        try:
            enc = OnnxEncoder(folder, f"onnx/{name}", provider="cpu")
            emb = torch.cat([torch.from_numpy(enc.encode([t], prompt=p)) for p, t in TEXTS])
            row = _row(f"ONNX Runtime CPU {name}", kind, cos_to_ref(emb), extra={"finite": bool(torch.isfinite(emb).all())})
            row["ok"] = row["ok"] and row["finite"]
        except Exception as e:  # an fp16 graph the CPU provider cannot run: recorded, checked on GPU
            if which != "fp16":
                raise
            row = {"path": f"ONNX Runtime CPU {name}", "min_cosine": float("nan"), "max_abs": None,
                   "bound": "CUDA provider only", "ok": True, "skipped": f"{type(e).__name__}: {str(e)[:200]}"}
        paths.append(row)
    return {"texts": full, "paths": paths, "ok": all(r["ok"] for r in paths)}


def print_table(report):
    w = max(len(r["path"]) for r in report["paths"])
    print(f"{'path':<{w}}  {'min cos':>9}  {'max abs':>8}  result")
    for r in report["paths"]:
        diff = "" if r.get("max_abs") is None else f"{r['max_abs']:.1e}"
        flips = f"; routing flips {r['routing_flips']}" if "routing_flips" in r else ""
        print(f"{r['path']:<{w}}  {r['min_cosine']:9.6f}  {diff:>8}  {'pass' if r['ok'] else 'FAIL'}  ({r['bound']}{flips})")


def listing(folder: Path):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(str(p.relative_to(folder)), p.stat().st_size) for p in files]


def push_token() -> str:
    """The token to upload with, or a refusal; checked before any work so a release never half-pushes."""
    from huggingface_hub import get_token

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be uploaded", "unset HF_HUB_OFFLINE on a machine with network access")
    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise UserError("no Hugging Face token found (HF_TOKEN or huggingface-cli login)", "export HF_TOKEN=hf_... with write access")
    return token


def push(folder: Path, repo_id: str, token: str, private: bool = False) -> str:
    """Uploads the folder as one commit: on the Hub it lands whole or not at all."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Release via nomic-moe release")
    return getattr(commit, "commit_url", str(commit))


def release(src: str, out: str, *, repo_id: str = "nomic-ai/nomic-embed-text-v2-moe", push_to: Optional[str] = None,
            dry_run: bool = False, force: bool = False, exporter: str = "auto", results_md=None, synthetic: bool = False,
            private: bool = False) -> Path:
    from nomic_moe_card.render import render_card

    from .onnx_export import export_onnx

    t0 = time.time()
    src_dir = resolve_source(src)
    out_dir = check_out_dir(out, force)
    repo_id = push_to or repo_id
    token = push_token() if push_to and not dry_run else None
    _, kw, weights = load_checked(src_dir)  # read once: converted here and the reference below
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.release-", dir=out_dir.parent))
    try:
        staged = write_verified(work / "repo", kw, weights, weights, src_dir)
        export_onnx(staged, exporter=exporter)
        log("[release] verifying every loading path against the reference")
        report = verify_release(staged, kw, weights)
        print_table(report)
        (staged / "verification.json").write_text(json.dumps(report, indent=2))
        if not report["ok"]:
            raise UserError("release verification failed (see the table)", "nothing was written; fix the failing path first")
        card = render_card(staged, report, repo_id, results_md or results_md_default(), synthetic=synthetic)
        (staged / "README.md").write_text(card)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    files = listing(out_dir)
    total = sum(s for _, s in files)
    log(f"[release] {out_dir}: {len(files)} files, {total / 2**20:.0f} MiB, in {time.time() - t0:.0f}s")
    if dry_run:
        print(f"would upload to {repo_id}:")
        for name, size in files:
            print(f"  {size / 2**20:10.2f} MiB  {name}")
    elif push_to:
        print(f"uploaded: {push(out_dir, push_to, token, private)}")
    return out_dir
