"""`nomic-moe upcycle DENSE OUT`: a dense encoder -> a MoE encoder, the paper's recipe (SPEC §5).

Every MoE layer starts from the dense layer's MLP: each expert is a copy of fc1 / fc2
(w1[e] = fc1.weight, w2[e] = fc2.weight.T), the router starts at normal(0, 0.02).

Biases: the paper drops the dense MLP's biases and starts the shared expert bias at zero
(``--bias zero``, the default). ``--bias dense`` instead starts the shared bias at fc2's bias: with
renormalised top-k weights the upcycled model then computes exactly the dense model's function,
which is what a smooth start of MoE training wants. fc1's bias has no place in the experts and is
dropped either way, so exactness needs a dense model whose fc1 bias is zero.
"""

import time
from pathlib import Path

import torch

from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source
from nomic_moe_files.publish import check_out_dir

from . import layout
from .convert import load_checked, log, write_verified


def upcycle_weights(kw: dict, dense: dict, experts: int, top_k: int, every: int, renormalize: bool, bias: str, seed: int):
    """(new kw, new weights) from a dense model's kw and weights (published tensor names)."""
    if any(".experts." in k for k in dense):
        raise UserError("the source already has MoE layers", "upcycle a dense checkpoint (no experts)")
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k {top_k} must lie in 1..--experts {experts}", "e.g. --experts 8 --top-k 2")
    if bias not in ("zero", "dense"):
        raise UserError(f"--bias {bias!r}", "use zero (the paper) or dense")
    new_kw = dict(kw, num_experts=experts, num_experts_per_tok=top_k, moe_every_n_layers=every, norm_topk_prob=renormalize)
    g = torch.Generator().manual_seed(seed)
    out = dict(dense)
    for i in range(kw["num_hidden_layers"]):
        if not layout.is_moe(new_kw, i):
            continue
        p = f"encoder.layers.{i}.mlp."
        fc1_w, fc2_w = out.pop(p + "fc1.weight"), out.pop(p + "fc2.weight")  # [I, H], [H, I]
        out.pop(p + "fc1.bias")
        fc2_b = out.pop(p + "fc2.bias")
        out[p + "experts.mlp.w1"] = fc1_w.repeat(experts, 1).contiguous()  # [E*I, H]: block e = fc1
        out[p + "experts.mlp.w2"] = fc2_w.T.repeat(experts, 1).contiguous()  # [E*I, H]: block e = fc2.T
        out[p + "experts.bias"] = fc2_b.clone() if bias == "dense" else torch.zeros_like(fc2_b)
        router = torch.randn(experts, kw["hidden_size"], generator=g) * 0.02
        out[p + "router.layer.weight"] = router.to(fc1_w.dtype)
    return new_kw, out


def upcycle(dense: str, out: str, *, experts: int = 8, top_k: int = 2, every: int = 2, renormalize: bool = False,
            bias: str = "zero", seed: int = 0, tokenizer=None, force: bool = False) -> Path:
    t0 = time.time()
    src = resolve_source(dense)
    out_dir = check_out_dir(out, force)
    _, kw, dense = load_checked(src)
    new_kw, weights = upcycle_weights(kw, dense, experts, top_k, every, renormalize, bias, seed)
    n_moe = sum(layout.is_moe(new_kw, i) for i in range(new_kw["num_hidden_layers"]))
    log(f"upcycled {n_moe} of {new_kw['num_hidden_layers']} layers into {experts} experts (top-{top_k}), bias={bias}")
    write_verified(out_dir, new_kw, weights, weights, Path(tokenizer) if tokenizer else src, force=force)
    log(f"done in {time.time() - t0:.1f}s")
    return out_dir
