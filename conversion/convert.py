"""Published checkpoint (or our own format) -> a self-contained, Hub-ready folder in our format.

Order of work, so that bad input loses nothing:
  1. read config.json and the safetensors headers only, check every key and shape;
  2. write everything into a temporary folder beside OUT;
  3. load the written folder through AutoModel (the users' path) and compare it with the plain
     reference implementation of SPEC §2 on the source weights;
  4. only then move the folder into place (one rename).
"""

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source
from nomic_moe_files.publish import check_out_dir, publishing
from nomic_moe_inference.batching import MAX_SEQ_LENGTH

from . import layout
from .synthetic import TOKENIZER_FILES

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

PROMPTS = {
    "query": "search_query: ",
    "document": "search_document: ",
    "passage": "search_document: ",
    "classification": "classification: ",
    "clustering": "clustering: ",
    # task-type names that MTEB and sentence-transformers pass as prompt names
    "Classification": "classification: ",
    "MultilabelClassification": "classification: ",
    "PairClassification": "classification: ",
    "STS": "classification: ",
    "Summarization": "classification: ",
    "Clustering": "clustering: ",
}
DEFAULT_PROMPT = "document"  # a plain encode() embeds documents; queries use prompt_name="query"

VERIFY_TEXTS = [
    "search_query: What food did they eat?",
    "search_query: thunderstorms",
    "search_document: Hello!",
    "search_document: ¡Hola!",
    "",
]
VERIFY_ATOL = 1e-4  # fp32 agreement seen in practice is ~1e-6; this catches real mistakes


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def modeling_dir() -> Path:
    """The folder of the files published next to the weights (installed as nomic_moe_modeling)."""
    import importlib.util

    spec = importlib.util.find_spec("nomic_moe_modeling")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "modeling"


def weight_files(folder: Path):
    """safetensors files of the checkpoint, refusing pickles."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); they are never loaded here because unpickling runs code",
            "convert them to model.safetensors in a trusted environment first, or use a safetensors release",
        )
    raise UserError(f"{folder} has no model.safetensors", "pass a checkpoint folder with safetensors weights")


def read_headers(files) -> Dict[str, tuple]:
    """Every tensor's shape, from headers that were checked against the files' sizes."""
    shapes = {}
    for f in files:
        for k, entry in checks.safetensors_header(f).items():
            shapes[k] = tuple(entry["shape"])
    return shapes


def read_config(folder: Path):
    """(kind, our config kwargs, raw dict) where kind is 'published' or 'ours'."""
    cfg = checks.read_json(folder / "config.json", "model config (config.json)")
    if cfg.get("model_type") == "nomic_moe":
        cfg = checks.model_config(folder)
        return "ours", layout.kwargs_from_ours(cfg), cfg
    if layout.is_published_config(cfg):
        return "published", layout.our_config_kwargs(cfg), cfg
    raise UserError(
        f"unknown checkpoint layout in {folder / 'config.json'} (model_type={cfg.get('model_type')!r})",
        "expected the published nomic_bert MoE layout (SPEC §3) or this project's nomic_moe format",
    )


def strip_prefix(shapes: Dict[str, tuple]) -> str:
    """Checkpoints saved from a task model carry 'bert.' before every key."""
    return "bert." if shapes and all(k.startswith("bert.") for k in shapes) else ""


def load_checked(src: Path):
    """Reads and checks a source checkpoint. Returns (kind, kw, weights); both layouts share tensor names."""
    kind, kw, _ = read_config(src)
    files = weight_files(src)
    log(f"[1/4] checking {src}: {kind} layout, {len(files)} weight file(s)")
    shapes = read_headers(files)
    prefix = strip_prefix(shapes)
    shapes = {k[len(prefix) :]: s for k, s in shapes.items()}
    layout.check_keys(shapes, layout.published_shapes(kw), f"checkpoint {src}")
    log(f"      {len(shapes)} tensors, every key and shape as expected")

    weights = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                weights[key[len(prefix) :]] = sf.get_tensor(key)
    bad = sorted({str(t.dtype) for t in weights.values() if not t.dtype.is_floating_point})
    if bad:
        raise UserError(f"the checkpoint holds non-float tensors ({', '.join(bad)})", "pass a float checkpoint")
    return kind, kw, weights


def write_sentence_transformers_files(out: Path, hidden_size: int) -> None:
    (out / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
            indent=2,
        )
    )
    (out / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False}, indent=2)
    )
    (out / "config_sentence_transformers.json").write_text(
        json.dumps(
            {"prompts": PROMPTS, "default_prompt_name": DEFAULT_PROMPT, "similarity_fn_name": "cosine"}, indent=2
        )
    )
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden_size,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
                "pooling_mode_weightedmean_tokens": False,
                "pooling_mode_lasttoken": False,
                "include_prompt": True,
            },
            indent=2,
        )
    )
    (out / "2_Normalize").mkdir()


LAYOUTS = ("ours", "published")


def config_dict(kw: dict, dtype: torch.dtype, layout_name: str = "ours") -> dict:
    """config.json of either layout; the weights file is the same for both."""
    dtype_name = str(dtype).replace("torch.", "")
    if layout_name == "published":
        return layout.published_config(kw, dtype_name)
    from nomic_moe_modeling.configuration_nomic_moe import NomicMoEConfig

    cfg = NomicMoEConfig(**kw, architectures=["NomicMoEModel"]).to_dict()
    cfg["torch_dtype"] = dtype_name
    return cfg


def write_model_folder(out: Path, kw: dict, weights: Dict[str, torch.Tensor], tokenizer_dir: Path, layout_name: str = "ours") -> None:
    """Writes a model folder of either layout into ``out`` (which must exist and be empty)."""
    dtype = next(iter(weights.values())).dtype
    (out / "config.json").write_text(json.dumps(config_dict(kw, dtype, layout_name), indent=2, sort_keys=True))
    size = sum(t.numel() * t.element_size() for t in weights.values())
    log(f"[2/4] writing model.safetensors ({size / 2**20:.0f} MiB, {len(weights)} tensors)")
    save_file({k: t.contiguous() for k, t in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in sorted(modeling_dir().glob("*.py")):
        if f.name != "__init__.py":
            shutil.copy2(f, out / f.name)
    copied = [f for f in TOKENIZER_FILES if (tokenizer_dir / f).exists()]
    if "tokenizer.json" not in copied and "sentencepiece.bpe.model" not in copied:
        raise UserError(
            f"no tokenizer files in {tokenizer_dir}",
            "pass --tokenizer FOLDER with the model's tokenizer (tokenizer.json), e.g. from FacebookAI/xlm-roberta-base",
        )
    for f in copied:
        shutil.copy2(tokenizer_dir / f, out / f)
    write_sentence_transformers_files(out, kw["hidden_size"])


@torch.no_grad()
def verify(folder: Path, kw: dict, source: Dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """Converted folder through AutoModel vs the plain reference on the source weights; max abs diff."""
    from transformers import AutoModel, AutoTokenizer

    from .reference import reference_forward

    log("[3/4] verifying: AutoModel on the written folder vs the plain reference implementation")
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    model = AutoModel.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    batch = tok(VERIFY_TEXTS, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt")
    ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # the reference sees exactly the values the converted file holds
    ref_weights = {k: t.to(dtype).float() for k, t in source.items()}
    ref = reference_forward(ref_weights, kw, batch["input_ids"], batch["attention_mask"])
    real = batch["attention_mask"].bool()
    diff = (ours[real] - ref[real]).abs().max().item()
    log(f"      max |AutoModel - reference| over {int(real.sum())} real tokens: {diff:.2e} (limit {VERIFY_ATOL:.0e})")
    if not diff <= VERIFY_ATOL:
        raise UserError(
            f"verification failed: the converted model differs from the reference by {diff:.3e}",
            "this is a bug in the converter or the model code; nothing was written",
        )
    return diff


def build_verified(folder: Path, kw: dict, weights: dict, source: dict, tokenizer_dir: Path, check: bool = True,
                   layout_name: str = "ours") -> None:
    """Writes a model folder into the empty ``folder`` and verifies it against the reference."""
    write_model_folder(folder, kw, weights, tokenizer_dir, layout_name)
    if check:
        verify(folder, kw, source, next(iter(weights.values())).dtype)


def write_verified(out_dir: Path, kw: dict, weights: dict, source: dict, tokenizer_dir: Path, check: bool = True,
                   force: bool = False, layout_name: str = "ours") -> Path:
    """Writes and verifies a model folder beside out_dir, then puts it in place (files.publish)."""
    with publishing(out_dir, force) as tmp:
        build_verified(tmp, kw, weights, source, tokenizer_dir, check, layout_name)
        log(f"[4/4] moving into place: {out_dir}")
    return out_dir


def convert(
    src: str,
    out: str,
    *,
    dtype: Optional[str] = None,
    tokenizer: Optional[str] = None,
    force: bool = False,
    check: bool = True,
    layout_name: str = "ours",
) -> Path:
    t0 = time.time()
    src_dir = resolve_source(src)
    out_dir = check_out_dir(out, force)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype}", f"use one of {', '.join(DTYPES)}")
    if layout_name not in LAYOUTS:
        raise UserError(f"unknown --layout {layout_name}", f"use one of {', '.join(LAYOUTS)}")
    kind, kw, source = load_checked(src_dir)
    weights = {k: t.to(DTYPES[dtype]) for k, t in source.items()} if dtype is not None else source
    tokenizer_dir = Path(tokenizer).expanduser() if tokenizer else src_dir
    write_verified(out_dir, kw, weights, source, tokenizer_dir, check, force=force, layout_name=layout_name)
    log(f"done in {time.time() - t0:.1f}s")
    return out_dir
