"""One part of the corpus in, one parquet file out: the unit both engines run (locally, or in a Ray actor).

A part is a range of rows of one input file. The worker reads it, packs its texts into batches of
about `batch_tokens` real tokens (sorted by length, so little padding), runs the model (PyTorch or
ONNX Runtime), pools, truncates to `dim` and normalises, and writes part-NNNNN.parquet with the
columns id and embedding (fixed-size list of float32), in input order. The file is written beside
its name and renamed into place, so it is either whole or absent; a part whose file is already
there and whole is not embedded again, which makes retries and reruns safe (exactly once).
"""

import os
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from nomic_moe_inference.batching import MAX_SEQ_LENGTH, pad_batch, token_batches

from . import inputs


def part_file(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"part-{index:05d}.parquet"


def part_is_done(out_dir: Path, part: dict) -> bool:
    """The part's file exists and holds its rows (a parquet file cut short has no readable footer)."""
    import pyarrow.parquet as pq

    path = part_file(out_dir, part["index"])
    if not path.exists():
        return False
    try:
        return pq.ParquetFile(str(path)).metadata.num_rows == part["rows"]
    except Exception:  # noqa: BLE001 - unreadable: redo it
        return False


class PartEmbedder:
    """Loads the model once; embed_part() may then run any number of parts (a Ray actor keeps one)."""

    def __init__(self, settings: dict):
        self.s = settings
        threads = settings.get("threads")
        if threads:
            import torch

            torch.set_num_threads(threads)
        self._load()

    def _load(self):
        from transformers import AutoTokenizer

        s = self.s
        self.tokenizer = AutoTokenizer.from_pretrained(s["model_dir"], trust_remote_code=True)
        if s.get("onnx"):
            from nomic_moe_inference.onnx_encoder import session

            self.session = session(Path(s["model_dir"]) / s["onnx"], "cuda" if s["device"] == "cuda" else "cpu", s.get("threads"))
            self.model = None
        else:
            from nomic_moe_inference.loading import load_model

            self.model, _ = load_model(s["model_dir"], s["device"], s["dtype"])  # int8: the CPU's int8 kernels

    def embed_texts(self, texts: List[str]):
        """(embeddings [n, dim] float32, real tokens, truncated texts)."""
        ids = self.tokenizer([self.s["prefix"] + t for t in texts], truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]
        lengths = [len(x) for x in ids]
        dim = self.s["dim"]
        out: Optional[np.ndarray] = None
        for batch in token_batches(lengths, self.s["batch_tokens"]):
            emb = self._run(*pad_batch(ids, batch, self.tokenizer.pad_token_id))[:, :dim]
            emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[batch] = emb
        truncated = sum(n >= MAX_SEQ_LENGTH for n in lengths)
        return out if out is not None else np.zeros((0, dim or 0), np.float32), sum(lengths), truncated

    def _run(self, tok: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.model is None:
            from nomic_moe_inference.onnx_encoder import sentence_embeddings

            return sentence_embeddings(self.session, tok, mask).astype(np.float32)
        import torch

        with torch.inference_mode():
            t, m = torch.from_numpy(tok).to(self.s["device"]), torch.from_numpy(mask).to(self.s["device"])
            return self.model(input_ids=t, attention_mask=m, return_sentence_embedding=True).sentence_embedding.float().cpu().numpy()

    def embed_part(self, part: dict) -> dict:
        """Embeds and writes one part (unless its file is already whole); returns its numbers."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out_dir = Path(self.s["output"])
        t0 = time.time()
        if part_is_done(out_dir, part):
            return {"index": part["index"], "rows": part["rows"], "tokens": 0, "truncated": 0, "seconds": 0.0, "skipped": True}
        skip = set(part["skip"])
        rows = [r for r in inputs.part_rows(Path(part["input"]), self.s["text_column"], self.s["id_column"], part["start"], part["end"],
                                            part.get("offset", 0), part.get("line", 0)) if r.ordinal not in skip]
        if len(rows) != part["rows"]:
            raise RuntimeError(f"part {part['index']}: read {len(rows)} rows from {part['input']}, the plan says {part['rows']}: "
                               "did the input change?")
        emb, tokens, truncated = self.embed_texts([r.text for r in rows])
        ids = pa.array([r.id for r in rows], type=pa.string() if self.s["id_type"] == "str" else pa.int64())
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])
        table = pa.table({"id": ids, "embedding": vectors})
        final = part_file(out_dir, part["index"])
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, str(tmp))
        os.replace(tmp, final)  # whole or absent; a rerun of the same part writes the same rows
        return {"index": part["index"], "rows": len(rows), "tokens": tokens, "truncated": truncated,
                "seconds": time.time() - t0, "skipped": False}
