"""Checked readers for every file a command takes in: one clear line naming the file and what is wrong.

A truncated download, an HTML error page saved as model.safetensors, a hand-edited config.json
with a trailing comma: each gets a UserError that says which file and what to do, before any
work starts, instead of a traceback from deep inside a library.
"""

import json
import struct
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

REDOWNLOAD = "download the file again (an interrupted download leaves it short), or reconvert the model"


def _looks_like(head: bytes) -> str:
    if head.startswith(b"PK"):
        return "a zip archive (a PyTorch .bin/.pt pickle?)"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        return "a Python pickle"
    if head.lstrip().lower().startswith((b"<!doctype", b"<html")):
        return "an HTML page (a failed download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (git lfs pull)"
    return "not a safetensors file"


def safetensors_header(path) -> dict:
    """The header of a safetensors file, after checking that the file holds every byte it declares."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file", "pass the folder that holds the model's weights")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: {size} bytes, too short for a safetensors file", REDOWNLOAD)
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20 or 8 + n > size:
            what = _looks_like(head + f.read(64))
            if what == "not a safetensors file" and n <= 100 * 2**20:
                raise UserError(f"{path}: truncated: the header alone needs {8 + n} bytes, the file has {size}", REDOWNLOAD)
            raise UserError(f"{path}: {what}", "pass a safetensors checkpoint (model.safetensors)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        for k, v in entries.items():
            lo, hi = (int(x) for x in v["data_offsets"])
            if not (0 <= lo <= hi) or not isinstance(v["shape"], list) or not isinstance(v["dtype"], str):
                raise ValueError(f"bad entry {k}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e})", REDOWNLOAD) from None
    if 8 + n + end > size:
        raise UserError(
            f"{path}: truncated: the header declares {8 + n + end:,} bytes, the file has {size:,} "
            f"({size / (8 + n + end):.0%})",
            REDOWNLOAD,
        )
    return entries


def read_json(path, what: str = "JSON file", required: Iterable[str] = ()) -> dict:
    """A JSON object from ``path``; refuses a missing file, invalid JSON, a non-object or missing keys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file", f"the {what} is missing; is this the right folder?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not text (binary data where the {what} should be)", REDOWNLOAD) from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", f"fix or restore the {what}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}", f"restore the {what}")
    missing = [k for k in required if k not in data]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}", f"restore the {what} from the model's release")
    return data


def prompts(folder) -> dict:
    """The prompts of a model folder's config_sentence_transformers.json, or {} where it has none."""
    path = Path(folder) / "config_sentence_transformers.json"
    return read_json(path, "sentence-transformers config").get("prompts", {}) if path.exists() else {}


MODEL_TYPES = ("nomic_moe", "nomic_bert")


def model_config(folder) -> dict:
    """config.json of a model folder in either layout, checked for the keys the layout needs."""
    path = Path(folder) / "config.json"
    cfg = read_json(path, "model config (config.json)", required=("model_type",))
    kind = cfg["model_type"]
    if kind not in MODEL_TYPES:
        raise UserError(
            f"{path}: model_type {kind!r} is not a Nomic Embed v2 MoE model ({' or '.join(MODEL_TYPES)})",
            "pass a folder written by nomic-moe convert / release, or the published nomic-embed-text-v2-moe",
        )
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts") if kind == "nomic_moe" else (
        "n_embd", "n_layer", "n_head")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)} for model_type {kind}", "restore config.json from the model's release")
    return cfg


def tokenizer_files(folder) -> None:
    """The tokenizer of a model folder loads: tokenizer.json parses (or a SentencePiece model is there)."""
    folder = Path(folder)
    tj = folder / "tokenizer.json"
    if tj.exists():
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(tj))
        except Exception as e:
            raise UserError(f"{tj}: not a loadable tokenizer ({str(e).splitlines()[0][:160]})", REDOWNLOAD) from None
    elif not (folder / "sentencepiece.bpe.model").exists():
        raise UserError(f"{folder}: no tokenizer (tokenizer.json or sentencepiece.bpe.model)", "copy the model's tokenizer files into the folder")
    tc = folder / "tokenizer_config.json"
    if tc.exists():
        read_json(tc, "tokenizer config (tokenizer_config.json)")


def onnx_file(path) -> None:
    """An ONNX graph that parses (protobuf), with its external data present."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file", "run nomic-moe export-onnx MODEL_DIR first, or name one of the files in onnx/")
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except ImportError:
        return  # onnxruntime alone (serving): its own loader reports problems, wrapped by the session builder
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:160]})", REDOWNLOAD) from None
    if not model.graph.node:
        raise UserError(f"{path}: the ONNX graph is empty", REDOWNLOAD)


def model_folder(folder, need_weights: bool = True, need_tokenizer: bool = True) -> dict:
    """Checks a model folder before anything loads it; returns its config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder", "pass a model folder (config.json, model.safetensors, tokenizer) or a Hub repo id")
    cfg = model_config(folder)
    if need_weights:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "weights index", required=("weight_map",))["weight_map"]
            for name in sorted(set(weight_map.values())):
                safetensors_header(folder / name)
        else:
            safetensors_header(folder / "model.safetensors")
    if need_tokenizer:
        tokenizer_files(folder)
    return cfg


def first_line(e: BaseException, limit: Optional[int] = 200) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
