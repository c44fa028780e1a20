"""A small ONNX Runtime encoder: tokenizer + prompts + Matryoshka + batching by length (+ IO binding on CUDA).

Needs only onnxruntime (or onnxruntime-gpu), tokenizers and numpy. The provider is always named
explicitly, and asking for CUDA when ONNX Runtime cannot run it is an error, not a silent CPU run.
"""

from pathlib import Path
from typing import List, Optional

import numpy as np

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError

from .batching import MAX_SEQ_LENGTH, length_batches, pad_batch

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session(path: Path, provider: str = "cpu", threads: Optional[int] = None):
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise UserError(f"unknown provider {provider!r}", "use cpu or cuda")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise UserError(
            f"{wanted} is not available in this onnxruntime ({ort.__version__}: {ort.get_available_providers()})",
            "install onnxruntime-gpu (and not onnxruntime beside it) for CUDA, or use --provider cpu",
        )
    if provider == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (torch's), where no system CUDA is on the loader's path
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    checks.onnx_file(path)
    try:
        sess = ort.InferenceSession(str(path), opts, providers=[wanted])
    except Exception as e:  # ORT's own loader: a graph it cannot read or run
        raise UserError(f"{path}: ONNX Runtime cannot load it ({checks.first_line(e)})", checks.REDOWNLOAD) from None
    if sess.get_providers()[0] != wanted:  # ORT falls back to the CPU without saying so
        raise UserError(f"{wanted} was asked for but the session runs on {sess.get_providers()}", "check the CUDA install")
    return sess


def sentence_embeddings(sess, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Runs a session for its pooled output only; on CUDA through IO binding (inputs copied once)."""
    if sess.get_providers()[0] == PROVIDERS["cuda"]:
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_output("sentence_embedding", "cuda")
        sess.run_with_iobinding(io)
        return io.copy_outputs_to_cpu()[0]
    return sess.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]


def load_tokenizer(model_dir: Path):
    """texts -> lists of token ids, truncated to 512.

    transformers' tokenizer where it is installed, because that is what sentence-transformers and
    AutoModel users get (transformers 5 rebuilds the XLM-R pipeline itself); plain `tokenizers`
    from tokenizer.json otherwise, so that serving needs neither torch nor transformers.
    """
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        return lambda texts: tok(texts, truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]
    except ImportError:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        raw.enable_truncation(MAX_SEQ_LENGTH)
        raw.no_padding()  # batches are padded per batch, with id 1
        return lambda texts: [e.ids for e in raw.encode_batch(texts)]


class OnnxEncoder:
    def __init__(self, model_dir, file_name: str = "onnx/model.onnx", provider: str = "cpu", threads: Optional[int] = None):
        model_dir = Path(model_dir)
        path = model_dir / file_name
        if not path.exists():
            raise UserError(f"{path} does not exist", f"run nomic-moe export-onnx {model_dir} first")
        checks.model_folder(model_dir, need_weights=False)
        self.session = session(path, provider, threads)
        self.tokenizer = load_tokenizer(model_dir)
        self.prompts = checks.prompts(model_dir)

    def encode(self, texts: List[str], prompt: Optional[str] = None, dim: Optional[int] = None, batch_size: int = 32) -> np.ndarray:
        if prompt is not None and prompt not in self.prompts:
            raise UserError(f"unknown prompt {prompt!r}", f"use one of: {', '.join(sorted(self.prompts))}")
        if any(not isinstance(t, str) for t in texts):
            raise UserError("texts must be strings", "pass a list of str")
        prefix = self.prompts.get(prompt, "") if prompt else ""
        encs = self.tokenizer([prefix + t for t in texts]) if texts else []
        out = None
        for idx in length_batches([len(e) for e in encs], batch_size):
            ids, mask = pad_batch(encs, idx)
            emb = sentence_embeddings(self.session, ids, mask).astype(np.float32)
            if out is None:
                out = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb
        if out is None:
            return np.zeros((0, dim or 0), dtype=np.float32)
        if dim is not None:
            if not 1 <= dim <= out.shape[1]:
                raise UserError(f"--dim {dim} is outside 1..{out.shape[1]}", "use 768 or 256 (the trained sizes)")
            out = out[:, :dim]
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out
