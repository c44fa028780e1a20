"""Loading the model for inference: one place for what the encoders, the server and the corpus job do.

    model, kernel_note = load_model(model_dir, device="cpu", dtype="float32")

``dtype`` is a torch float dtype, a name ("float32", "bfloat16", "float16") or "int8" (loaded in fp32,
then model.quantize_int8(): the CPU's int8 kernels, per-token activations where the few-row kernel
runs them, see int8_activations). On the CPU the model also gets the package's
few-row kernel for short inputs (nomic_moe_inference.cpu.use_cpu_kernels); ``kernel_note`` says
what runs, for the logs (None off the CPU).
"""

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from nomic_moe_files.errors import UserError

from .cpu import FLOATS, use_cpu_kernels


def load_model(model_dir: Union[str, Path], device="cpu", dtype: Union[str, torch.dtype] = "float32") -> Tuple[object, Optional[str]]:
    from transformers import AutoModel

    int8 = dtype == "int8"
    torch_dtype = torch.float32 if int8 else (FLOATS[dtype] if isinstance(dtype, str) else dtype)
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch_dtype).to(device).eval()
    note = use_cpu_kernels(model)
    if int8:
        if not hasattr(model, "quantize_int8"):
            raise UserError(f"the model code in {model_dir} has no int8 path (quantize_int8)",
                            "convert the checkpoint again with this version, or use --dtype float32")
        model.quantize_int8(activations=int8_activations(model))
    return model, note


def int8_activations(model) -> str:
    """per_token where the few-row kernel computes int8 (AVX512_VNNI): a short query is faster than with
    FBGEMM's per-batch kernel, and a vector moves about 4x less with its batch partners (RESULTS.md,
    "int8 gate"); per_batch (FBGEMM, the fastest for batches) elsewhere."""
    kernel = getattr(model, "cpu_kernel", None)
    return "per_token" if kernel is not None and kernel.accepts(1, torch.int8) else "per_batch"
