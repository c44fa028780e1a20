"""Loading the model for inference: one place for what the encoders, the server and the corpus job do.

    model, kernel_note = load_model(model_dir, device="cpu", dtype="float32")

``dtype`` is a torch float dtype, a name ("float32", "bfloat16", "float16") or "int8" (loaded in fp32,
then model.quantize_int8(): the CPU's int8 kernels). On the CPU the model also gets the package's
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
    if int8:
        if not hasattr(model, "quantize_int8"):
            raise UserError(f"the model code in {model_dir} has no int8 path (quantize_int8)",
                            "convert the checkpoint again with this version, or use --dtype float32")
        model.quantize_int8()
    return model, use_cpu_kernels(model)
