"""Sentence embeddings from a converted folder with plain transformers: prompts, pooling, Matryoshka."""

import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError

from .batching import MAX_SEQ_LENGTH, length_batches
from .cuda_graphs import GraphedEmbedder
from .loading import load_model



def finish(embeddings: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    """Matryoshka: keep the first ``dim`` dimensions of unit vectors and normalise them again."""
    if dim is not None:
        if not 1 <= dim <= embeddings.shape[-1]:
            raise UserError(f"--dim {dim} is outside 1..{embeddings.shape[-1]}", "use 768 or 256 (the trained sizes)")
        embeddings = embeddings[:, :dim]
    return F.normalize(embeddings.float(), dim=-1)


class Encoder:
    """Encodes texts the way the sentence-transformers files describe, without sentence-transformers."""

    def __init__(self, model_dir, device: str = "cpu", dtype="float32"):
        """``dtype``: a torch.dtype or a name: "float32" (exact, the default), "bfloat16", "float16",
        "auto" (the fastest float the device computes natively, see nomic_moe_inference.cpu) or "int8"
        (the CPU's int8 kernels through model.quantize_int8())."""
        from transformers import AutoTokenizer

        from .cpu import resolve_dtype

        checks.model_folder(model_dir)  # one clear line for a broken file, before transformers reads it
        resolved = resolve_dtype(dtype, device)
        self.model_dir = Path(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.model, _ = load_model(model_dir, device, resolved)
        self.dtype = resolved
        self.device = device
        self.prompts = checks.prompts(self.model_dir)
        self.graphs = GraphedEmbedder.for_model(self.model)  # on CUDA, short batches replay captured graphs (launch-bound otherwise)

    def prompt_text(self, prompt: Optional[str]) -> str:
        if prompt is None:
            return ""
        if prompt not in self.prompts:
            raise UserError(f"unknown prompt {prompt!r}", f"use one of: {', '.join(sorted(self.prompts))}")
        return self.prompts[prompt]

    @torch.no_grad()
    def encode(self, texts: List[str], prompt: Optional[str] = None, dim: Optional[int] = None, batch_size: int = 32):
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise UserError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}", "pass a list of str")
        prefix = self.prompt_text(prompt)
        full = [prefix + t for t in texts]
        out = [None] * len(full)
        truncated = 0
        for idx in length_batches([len(t) for t in full], batch_size):
            batch = self.tokenizer(
                [full[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=MAX_SEQ_LENGTH,
                return_tensors="pt",
                return_overflowing_tokens=False,
            )
            truncated += int((batch["attention_mask"].sum(1) >= MAX_SEQ_LENGTH).sum())
            graphed = None
            if self.graphs is not None and self.graphs.bucket(*batch["input_ids"].shape) is not None:
                graphed = self.graphs.embed([r[m.bool()].tolist() for r, m in zip(batch["input_ids"], batch["attention_mask"])])
            if graphed is not None:
                pooled = F.normalize(torch.from_numpy(graphed[0]), dim=-1)
            else:
                ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
                pooled = self.model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
            emb = finish(pooled, dim).cpu()
            for j, i in enumerate(idx):
                out[i] = emb[j]
        if truncated:
            print(f"note: {truncated} text(s) reached {MAX_SEQ_LENGTH} tokens and were truncated", file=sys.stderr)
        if not out:
            return torch.empty(0, dim or self.model.config.hidden_size)
        return torch.stack(out)
