"""`nomic-moe export-onnx MODEL_DIR`: ONNX graphs of the model, validated on shapes the export never saw.

Files written to MODEL_DIR/onnx/ (inputs input_ids, attention_mask; outputs last_hidden_state,
sentence_embedding; dynamic batch and sequence axes):

  model.onnx                 fp32, exact math (erf GELU), packed: the real tokens are gathered once
                             (NonZero) and padding skips every position-wise step; sparse: each
                             token only through its top-k experts (one NonZero + Gather per expert),
                             nothing shape- or routing-specific frozen in. Through optimum's main_export where optimum is installed,
                             else torch.onnx directly; the same graph either way.
  model_fused.onnx           fp32, each MoE layer as ONNX Runtime's com.microsoft.MoE (softmax + top-k
                             inside, no renormalisation; its GELU is the tanh form) plus the shared bias
                             as one Add, then ORT's transformer fusions (LayerNorm, Gelu, ...).
  model_fp16.onnx            the fused graph in fp16 (inputs and outputs keep their types), for CUDA.
  model_qint8_avx512.onnx    model.onnx with the expert and MLP weights in int8 (blocks of 32, MatMulNBits,
                             int8 compute on AVX512-VNNI CPUs), for CPU.
"""

import copy
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.publish import publishing

OPSET = 17
INPUTS = ["input_ids", "attention_mask"]
OUTPUTS = ["last_hidden_state", "sentence_embedding"]
DYNAMIC_AXES = {
    "input_ids": {0: "batch_size", 1: "sequence_length"},
    "attention_mask": {0: "batch_size", 1: "sequence_length"},
    "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
    "sentence_embedding": {0: "batch_size"},
}
FILES = {
    "model": "model.onnx",
    "fused": "model_fused.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_qint8_avx512.onnx",
}
# (metric, bound) each file must meet against the PyTorch fp32 model
BOUNDS = {
    "model": ("max_abs_last_hidden_state", 1e-4),
    "fused": ("min_cosine_sentence_embedding", 0.9999),
    "fp16": ("min_cosine_sentence_embedding", 0.999),
    "int8": ("min_cosine_sentence_embedding", 0.999),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


class SentenceGraph(nn.Module):
    """The exported computation: both outputs from input_ids and attention_mask."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_sentence_embedding=True)
        return out.last_hidden_state, out.sentence_embedding


# ------------------------------------------------------------------------------------------------
# The fused MoE: ONNX Runtime's contrib operator in place of the unrolled experts
# ------------------------------------------------------------------------------------------------


class _OrtMoE(torch.autograd.Function):
    """Traces as com.microsoft.MoE; computes the same thing in PyTorch (only its shape matters there)."""

    @staticmethod
    def forward(ctx, x, logits, fc1, fc1_bias, fc2, k):
        probs = logits.float().softmax(-1)
        w, top = probs.topk(k, dim=-1)
        out = torch.zeros_like(x)
        for slot in range(k):
            h = F.gelu(torch.einsum("nh,nih->ni", x, fc1[top[:, slot]]), approximate="tanh")
            out = out + w[:, slot, None].to(x.dtype) * torch.einsum("ni,nhi->nh", h, fc2[top[:, slot]])
        return out

    @staticmethod
    def symbolic(g, x, logits, fc1, fc1_bias, fc2, k):
        out = g.op(
            "com.microsoft::MoE", x, logits, fc1, fc1_bias, fc2,
            activation_type_s="gelu", k_i=k, normalize_routing_weights_i=0, use_sparse_mixer_i=0,
        )
        out.setType(x.type())  # same shape and type as the input
        return out


class FusedSparseBlock(nn.Module):
    """Replaces NomicMoESparseBlock during the fused export."""

    def __init__(self, block):
        super().__init__()
        self.router = block.router
        w1, w2 = (w.detach() for w in block.experts.mlp.per_expert())  # [E, I, H] each
        self.register_buffer("fc1", w1.clone())  # [E, I, H]: ORT's fc1 layout already
        self.register_buffer("fc1_bias", torch.zeros(w1.shape[0], w1.shape[1], dtype=w1.dtype))
        self.register_buffer("fc2", w2.transpose(1, 2).contiguous())  # ORT wants [E, H, I]
        self.register_buffer("bias", block.experts.bias.detach().clone())
        self.k = block.router.top_k

    def forward(self, x, packing):
        logits = F.linear(x.float(), self.router.layer.weight.float()).to(x.dtype)
        return _OrtMoE.apply(x, logits, self.fc1, self.fc1_bias, self.fc2, self.k) + self.bias, None


def fused_copy(model):
    # by attribute, not isinstance: AutoModel's remote-code class is not the installed one
    model = copy.deepcopy(model)
    for layer in model.encoder.layers:
        if layer.is_moe:
            layer.mlp = FusedSparseBlock(layer.mlp)
    return model


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def dummy_inputs(vocab_size):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, min(vocab_size, 1000), (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def torch_export(model, path: Path):
    """torch.onnx's TorchScript exporter: it honours autograd.Function.symbolic (the fused MoE)."""
    import warnings

    ids, mask = dummy_inputs(model.config.vocab_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes are expected here
        torch.onnx.export(
            SentenceGraph(model),
            (ids, mask),
            str(path),
            input_names=INPUTS,
            output_names=OUTPUTS,
            dynamic_axes=DYNAMIC_AXES,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def optimum_available():
    try:
        import optimum.exporters.onnx  # noqa: F401
    except Exception:
        return False
    return True


def optimum_export(model_dir: Path, out_dir: Path):
    """optimum's main_export with our OnnxConfig (the optimum world: transformers < 4.58)."""
    from optimum.exporters.onnx import main_export

    from .optimum_config import nomic_moe_onnx_config
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    main_export(
        str(model_dir),
        output=str(out_dir),
        task="feature-extraction",
        trust_remote_code=True,
        opset=OPSET,
        device="cpu",
        do_validation=False,  # optimum only warns on a failed validation; ours below fails loudly
        custom_onnx_configs={"model": nomic_moe_onnx_config(config)},
        model_kwargs={"return_sentence_embedding": True},
        no_post_process=True,
        library_name="transformers",
    )
    produced = out_dir / "model.onnx"
    if not produced.exists():
        raise UserError(f"optimum wrote no model.onnx into {out_dir}", "run with --exporter torch")
    return produced


def to_fp16(src: Path, dst: Path):
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save(model, str(dst))


def optimize_fused(path: Path, config):
    """ORT's transformer fusions (LayerNorm, SkipLayerNorm, Gelu, ...) where its patterns match."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(
        str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size,
        opt_level=1, use_gpu=False,
    )
    opt.save_model_to_file(str(path))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def to_int8(src: Path, dst: Path):
    """Weight-only int8 (blocks of 32, symmetric) as com.microsoft.MatMulNBits, int8 compute on the CPU.

    Plain dynamic quantisation (QDQ of activations per tensor) cost too much accuracy on our test
    models (embedding cosine ~0.995); block-wise weights keep it above 0.9999. The router stays fp32:
    a flipped expert choice costs more than the router's few FLOPs save.
    """
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(src))
    router = [n.name for n in model.graph.node if "router" in n.name]
    q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4, nodes_to_exclude=router)
    q.process()
    q.model.save_model_to_file(str(dst), False)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def validation_batches(vocab_size, seed=1):
    """Shapes the export never saw: batch 1..8, lengths 1..512, right and left padding."""
    g = torch.Generator().manual_seed(seed)
    specs = [([1], "right"), ([512], "right"), ([3, 40, 17], "right"), ([8, 1, 2, 5, 9, 64, 33, 12], "right"),
             ([300, 7], "left"), ([128, 128, 5, 77], "right")]
    for lengths, side in specs:
        S = max(lengths)
        ids = torch.ones(len(lengths), S, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(lengths):
            row = torch.randint(3, min(vocab_size, 250000), (n,), generator=g)
            row[0], row[-1] = 0, 2
            sl = slice(0, n) if side == "right" else slice(S - n, S)
            ids[b, sl], mask[b, sl] = row, 1
        yield ids, mask


@torch.no_grad()
def validate(path: Path, model, which: str, provider: str = "cpu") -> dict:
    metric, bound = BOUNDS[which]
    from nomic_moe_inference.onnx_encoder import session

    sess = session(path, provider)
    max_abs, min_cos = 0.0, 1.0
    for ids, mask in validation_batches(model.config.vocab_size):
        ref = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)
        h, emb = sess.run(OUTPUTS, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        h, emb = torch.from_numpy(h).float(), torch.from_numpy(emb).float()
        if not (torch.isfinite(h).all() and torch.isfinite(emb).all()):
            raise UserError(f"{path.name} produced NaN or Inf", "this is an export bug; the file is not usable")
        real = mask.bool()
        max_abs = max(max_abs, (h[real] - ref.last_hidden_state[real]).abs().max().item())
        min_cos = min(min_cos, F.cosine_similarity(emb, ref.sentence_embedding, dim=-1).min().item())
    value = max_abs if metric.startswith("max_abs") else min_cos
    ok = value <= bound if metric.startswith("max_abs") else value >= bound
    result = {"file": path.name, "provider": provider, "max_abs_last_hidden_state": max_abs,
              "min_cosine_sentence_embedding": min_cos, "bound": f"{metric} {'<=' if metric.startswith('max_abs') else '>='} {bound}", "ok": ok}
    log(f"      {path.name:<26} max|dh| {max_abs:.2e}  min cos {min_cos:.6f}  ({result['bound']}) {'ok' if ok else 'FAILED'}")
    return result


def graph_ops(path: Path) -> dict:
    import onnx

    counts = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


REQUIRED_FILES = ("model",)  # the others are optional variants: one that misses its bar is left out, not fatal


def left_out_entry(which: str, result: dict) -> dict:
    measured = result.get("error") or (
        f"max abs diff {result['max_abs_last_hidden_state']:.3g}" if BOUNDS[which][0].startswith("max_abs")
        else f"min cosine {result['min_cosine_sentence_embedding']:.6f}")
    return {"file": FILES[which], "measured": measured, "bound": result.get("bound", ""), "stage": "export validation"}


def export_onnx(model_dir, exporter: str = "auto", variants=("model", "fused", "fp16", "int8"), force: bool = False,
                strict: bool = False):
    """Writes MODEL_DIR/onnx/ (files.publish) once every file kept passed validation; returns the report.

    model.onnx must pass. An optional variant (fused, fp16, int8) that misses its bound is left out
    and listed under report["left_out"] with its measured number; with strict=True any miss is fatal.
    """
    from transformers import AutoModel

    t0 = time.time()
    model_dir = Path(model_dir)
    checks.model_folder(model_dir, need_tokenizer=False)
    out_dir = model_dir / "onnx"
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists", "pass --force to replace it")
    unknown = [v for v in variants if v not in FILES]
    if unknown or "model" not in variants:
        raise UserError(f"--variants {','.join(variants)}: model is required; known: {', '.join(FILES)}", "e.g. --variants model,int8")
    if exporter == "auto":
        exporter = "optimum" if optimum_available() else "torch"
    if exporter == "optimum" and not optimum_available():
        raise UserError("optimum is not installed here", "use --exporter torch, or install optimum-onnx (transformers < 4.58)")

    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.float32).eval()
    report = {"exporter": exporter, "opset": OPSET, "files": {}, "left_out": []}
    with publishing(out_dir, force) as tmp:
        log(f"[1/3] exporting model.onnx with {'optimum main_export' if exporter == 'optimum' else 'torch.onnx'}")
        if exporter == "optimum":
            optimum_export(model_dir, tmp / "optimum")
            shutil.move(str(tmp / "optimum" / "model.onnx"), str(tmp / FILES["model"]))
            shutil.rmtree(tmp / "optimum")
        else:
            torch_export(model, tmp / FILES["model"])
        if "fused" in variants or "fp16" in variants:
            log("[2/3] exporting model_fused.onnx (com.microsoft.MoE) and deriving fp16")
            torch_export(fused_copy(model), tmp / FILES["fused"])
            report["fusions"] = optimize_fused(tmp / FILES["fused"], model.config)
            if "fp16" in variants:
                to_fp16(tmp / FILES["fused"], tmp / FILES["fp16"])
        if "int8" in variants:
            log("      quantising model.onnx weights to int8 (MatMulNBits, blocks of 32)")
            to_int8(tmp / FILES["model"], tmp / FILES["int8"])
        log("[3/3] validating on shapes the export never saw (batch 1..8, length 1..512, left and right padding)")
        for which in ["model", *[v for v in ("fused", "fp16", "int8") if v in variants]]:
            path = tmp / FILES[which]
            try:
                report["files"][which] = validate(path, model, which)
            except UserError:
                raise
            except Exception as e:  # e.g. a provider without fp16 kernels for an operator
                report["files"][which] = {"file": path.name, "provider": "cpu", "ok": None, "error": f"{type(e).__name__}: {str(e)[:300]}"}
                log(f"      {path.name:<26} not runnable on the CPU provider: {type(e).__name__}: {str(e)[:160]}")
            report["files"][which]["ops"] = graph_ops(path)
        failed = [w for w, r in report["files"].items() if r.get("ok") is False]
        fatal = [w for w in failed if strict or w in REQUIRED_FILES]
        if fatal:
            raise UserError(f"validation failed for {', '.join(FILES[w] for w in fatal)}", "nothing was written; see the numbers above")
        for which in failed:
            (tmp / FILES[which]).unlink()
            report["left_out"].append(left_out_entry(which, report["files"][which]))
            log(f"      left out {FILES[which]}: {report['left_out'][-1]['measured']} ({report['files'][which]['bound']})")
        if "fused" not in variants and (tmp / FILES["fused"]).exists():
            (tmp / FILES["fused"]).unlink()  # written only to derive fp16
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    log(f"done in {time.time() - t0:.1f}s: {out_dir}" + (f" (left out: {', '.join(e['file'] for e in report['left_out'])})" if report["left_out"] else ""))
    return report

