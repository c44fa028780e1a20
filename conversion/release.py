"""`nomic-moe release SRC OUT [--layout ours|published|both] [--push ORG/NAME] [--dry-run] [--strict]`.

convert (verified) -> export ONNX (validated) -> verify every loading path against the plain
reference -> render the model card -> put OUT in place (files.publish) -> optionally upload.

Required files (weights, code, config, tokenizer, sentence-transformers files, onnx/model.onnx)
must pass or nothing is written. An optional ONNX variant (fused, fp16, int8) that misses its bound
is left out, named with its measured number in verification.json and the card, and the release
goes on; --strict makes any miss fatal. ReleaseResult.left_out says which happened.

Layouts: "ours" (model_type nomic_moe, the default) or "published" (nomic_bert, what TEI, vLLM and
llama.cpp read); "both" writes OUT/main (ours) and OUT/<published revision> (published), which
--push uploads to the branch main and to a second branch of the same repo. The two folders differ
only in config.json and the card: the weights and ONNX files are the same bytes (hard links).
"""

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source
from nomic_moe_files.publish import check_out_dir, publishing

from .convert import build_verified, config_dict, load_checked, log

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
    "int8": (0.999, None),
}
LAYOUT_CHOICES = ("ours", "published", "both")
PUBLISHED_REVISION = "nomic-bert"


@dataclass
class ReleaseResult:
    folders: dict  # Hub revision -> local folder
    layout: str
    left_out: List[dict] = field(default_factory=list)  # optional files that missed their bound

    @property
    def complete(self) -> bool:
        return not self.left_out

    def summary(self) -> str:
        where = ", ".join(str(p) for p in self.folders.values())
        if self.complete:
            return f"release complete: {where}"
        names = "; ".join(f"{e['file']} ({e['measured']}, needs {e['bound']})" for e in self.left_out)
        return f"release written WITHOUT optional file(s): {names}: {where} (--strict makes this fatal)"


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
        kind = {"model": "fp32", "fused": "fused", "int8": "int8"}.get(which, "half")
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
        row["file"] = f"onnx/{name}"
        row["required"] = which == "model"
        paths.append(row)
    return {"texts": full, "paths": paths, "ok": all(r["ok"] for r in paths if r.get("required", True))}


@torch.no_grad()
def verify_published_layout(folder: Path, ours: Path) -> List[dict]:
    """The published-layout folder through AutoModel and sentence-transformers, against our layout."""
    from sentence_transformers import SentenceTransformer

    prompts = checks.read_json(folder / "config_sentence_transformers.json", "sentence-transformers config")["prompts"]
    full = [prompts[p] + t for p, t in TEXTS]
    rows = []
    a = SentenceTransformer(str(ours), trust_remote_code=True, device="cpu").encode(full, prompt="", show_progress_bar=False)
    st = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu")
    b = st.encode(full, prompt="", show_progress_bar=False)
    name = type(st[0].auto_model).__name__
    cos = F.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=-1).min().item()
    diff = (torch.as_tensor(a) - torch.as_tensor(b)).abs().max().item()
    rows.append({"path": f"published layout: sentence-transformers ({name}) vs our layout", "min_cosine": cos, "max_abs": diff,
                 "bound": "abs <= 1e-05 (same weights, same code)", "ok": diff <= 1e-5})
    return rows


def print_table(report):
    from nomic_moe_card.render import result_word

    w = max(len(r["path"]) for r in report["paths"])
    print(f"{'path':<{w}}  {'min cos':>9}  {'max abs':>8}  result")
    for r in report["paths"]:
        diff = "" if r.get("max_abs") is None else f"{r['max_abs']:.1e}"
        flips = f"; routing flips {r['routing_flips']}" if "routing_flips" in r else ""
        print(f"{r['path']:<{w}}  {r['min_cosine']:9.6f}  {diff:>8}  {result_word(r)}  ({r['bound']}{flips})")


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


def push(folder: Path, repo_id: str, token: str, private: bool = False, revision: str = "main") -> str:
    """Uploads the folder as one commit to ``revision``: on the Hub it lands whole or not at all."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True, private=private)
    if revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                               commit_message=f"Release via nomic-moe release ({revision})")
    return getattr(commit, "commit_url", str(commit))


def _finish_folder(folder: Path, report: dict, left_out: list, repo_id: str, results_md, synthetic: bool,
                   layout_name: str, revisions: dict) -> None:
    from nomic_moe_card.render import render_card

    report = dict(report, left_out=left_out, layout=layout_name, revisions=revisions)
    (folder / "verification.json").write_text(json.dumps(report, indent=2))
    card = render_card(folder, report, repo_id, results_md or results_md_default(), synthetic=synthetic,
                       layout=layout_name, revisions=revisions)
    (folder / "README.md").write_text(card)


def _link_tree(src: Path, dst: Path) -> None:
    """dst gets src's files as hard links (the same bytes, no second copy on disk)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)


def release(src: str, out: str, *, repo_id: str = "nomic-ai/nomic-embed-text-v2-moe", push_to: Optional[str] = None,
            dry_run: bool = False, force: bool = False, exporter: str = "auto", results_md=None, synthetic: bool = False,
            private: bool = False, layout_name: str = "ours", published_revision: str = PUBLISHED_REVISION,
            strict: bool = False) -> ReleaseResult:
    from .onnx_export import export_onnx

    t0 = time.time()
    if layout_name not in LAYOUT_CHOICES:
        raise UserError(f"unknown --layout {layout_name}", f"use one of {', '.join(LAYOUT_CHOICES)}")
    if layout_name == "both" and (not published_revision or published_revision == "main"):
        raise UserError(f"--published-revision {published_revision!r}", "name a branch other than main, e.g. nomic-bert")
    src_dir = resolve_source(src)
    out_dir = check_out_dir(out, force)
    repo_id = push_to or repo_id
    token = push_token() if push_to and not dry_run else None
    _, kw, weights = load_checked(src_dir)  # read once: converted here and the reference below
    # Hub revision -> the layout it carries; one folder each (OUT itself when there is one)
    layouts = {"main": "ours", published_revision: "published"} if layout_name == "both" else {"main": layout_name}
    revisions = {which: rev for rev, which in layouts.items()}  # what the cards tell each kind of user
    place = (lambda root, rev: root / rev) if layout_name == "both" else (lambda root, rev: root)
    with publishing(out_dir, force) as tmp:
        main = place(tmp, "main")
        main.mkdir(exist_ok=True)
        build_verified(main, kw, weights, weights, src_dir, layout_name=layouts["main"])
        onnx_report = export_onnx(main, exporter=exporter, strict=strict)
        left_out = list(onnx_report["left_out"])
        log("[release] verifying every loading path against the reference")
        report = verify_release(main, kw, weights)
        for row in report["paths"]:
            if row.get("required", True) or row["ok"]:
                continue
            if strict:
                raise UserError(f"release verification failed for {row['file']} (--strict)", "nothing was written; see the table")
            (main / row["file"]).unlink()
            left_out.append({"file": row["file"], "measured": f"min cosine {row['min_cosine']:.6f}", "bound": row["bound"],
                             "stage": "release verification"})
        if layout_name == "both":
            pub = place(tmp, published_revision)
            _link_tree(main, pub)
            (pub / "config.json").unlink()  # a link to main's: write a new file, not through the link
            (pub / "config.json").write_text(json.dumps(config_dict(kw, next(iter(weights.values())).dtype, "published"),
                                                        indent=2, sort_keys=True))
            report["paths"] += verify_published_layout(pub, main)
            report["ok"] = report["ok"] and all(r["ok"] for r in report["paths"] if r.get("required", True))
        print_table(report)
        if not report["ok"]:
            (main / "verification.json").write_text(json.dumps(report, indent=2))
            raise UserError("release verification failed (see the table)", "nothing was written; fix the failing path first")
        for rev, which in layouts.items():
            _finish_folder(place(tmp, rev), report, left_out, repo_id, results_md, synthetic, which, revisions)
    folders = {rev: place(out_dir, rev) for rev in layouts}
    result = ReleaseResult(folders, layout_name, left_out)
    files = [f for folder in folders.values() for f in listing(folder)]
    log(f"[release] {out_dir}: {len(files)} files, {sum(size for _, size in files) / 2**20:.0f} MiB, in {time.time() - t0:.0f}s")
    for rev, folder in folders.items():
        if dry_run:
            print(f"would upload to {repo_id} (revision {rev}):")
            for name, size in listing(folder):
                print(f"  {size / 2**20:10.2f} MiB  {name}")
        elif push_to:
            print(f"uploaded: {push(folder, push_to, token, private, revision=rev)}")
    return result
