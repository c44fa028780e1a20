"""The published checkpoint layout (SPEC §3) and its mapping onto ours.

The tensors are the same in both layouts: the published names and shapes (experts as [E*I, H]),
so a weights file is byte-identical whichever layout it ships in. Only config.json differs:
published GPT-2 style keys under model_type "nomic_bert", or ours under "nomic_moe".
"""

from typing import Dict, Tuple

from nomic_moe_files.errors import UserError

from nomic_moe_modeling.configuration_nomic_moe import PUBLISHED_FIXED, PUBLISHED_KEYS

# published config key -> default when absent (our attribute: PUBLISHED_KEYS, else the same name)
DEFAULTS = {
    "vocab_size": 250048,
    "n_embd": 768,
    "n_head": 12,
    "n_inner": None,
    "n_layer": 12,
    "n_positions": 2048,
    "layer_norm_epsilon": 1e-5,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "rotary_emb_base": 10000.0,
    "num_experts": 0,
    "moe_top_k": 1,
    "moe_every_n_layers": 0,
    "moe_normalize_expert_weights": False,
    "router_aux_loss_coef": 0.1,
    "initializer_range": 0.02,
}
CONFIG_KEYS = {theirs: (PUBLISHED_KEYS.get(theirs, theirs), default) for theirs, default in DEFAULTS.items()}

# published settings our implementation does not cover: the value each must have
REQUIRED = dict(PUBLISHED_FIXED, activation_function="gelu")


def is_published_config(cfg: dict) -> bool:
    return cfg.get("model_type") == "nomic_bert" or "n_embd" in cfg


def our_config_kwargs(published: dict) -> dict:
    """Published config.json dict -> NomicMoEConfig kwargs; refuses settings we do not implement."""
    bad = [
        f"{k}={published[k]!r} (need {v!r})"
        for k, v in REQUIRED.items()
        if k in published and published[k] != v and not (k == "rotary_emb_fraction" and published[k] == 1)
    ]
    if bad:
        raise UserError(
            "the source config uses settings this model does not implement: " + ", ".join(bad),
            "convert only nomic-embed-text-v2-moe-style checkpoints (post-LN, full RoPE, erf GELU, biases)",
        )
    kw = {ours: published.get(theirs, default) for theirs, (ours, default) in CONFIG_KEYS.items()}
    if kw["intermediate_size"] is None:
        kw["intermediate_size"] = 4 * kw["hidden_size"]
    if not kw["num_experts"] or not kw["moe_every_n_layers"]:  # a dense model of the same family
        kw.update(num_experts=1, num_experts_per_tok=1, moe_every_n_layers=0)
    kw["max_position_embeddings"] = max(kw["max_position_embeddings"], published.get("max_trained_positions", 0))
    return kw


def published_config(kw: dict, dtype: str = "float32") -> dict:
    """config.json of the published layout for our config kwargs: every key of the upstream file
    (SPEC §3), the keys TEI, vLLM and llama.cpp read (SPEC §8), and an auto_map to OUR code files.

    Also written, for vLLM under transformers 5 (whose own nomic_bert config would otherwise fill
    in RoPE base 1000 and 12 heads): rope_theta and num_attention_heads. Not written: id2label
    (llama.cpp's converter fails on its string keys) and hidden_size / num_hidden_layers (TEI's
    ONNX config rejects a key next to its alias).
    """
    cfg = {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "auto_map": {
            "AutoConfig": "configuration_nomic_moe.NomicBertConfig",
            "AutoModel": "modeling_nomic_moe.NomicBertModel",
        },
        "activation_function": "gelu",
    }
    for theirs, (ours, _) in CONFIG_KEYS.items():
        cfg[theirs] = kw[ours]
    cfg.update(
        max_trained_positions=kw["max_position_embeddings"],
        bos_token_id=kw.get("bos_token_id", 0),
        eos_token_id=kw.get("eos_token_id", 2),
        rope_theta=kw["rope_theta"],
        num_attention_heads=kw["num_attention_heads"],
        torch_dtype=dtype,
    )
    cfg.update(PUBLISHED_FIXED)
    return cfg


def published_shapes(kw: dict) -> Dict[str, Tuple[int, ...]]:
    """Every key of a published checkpoint with its shape, for our config kwargs ``kw``."""
    H, I, E, L = kw["hidden_size"], kw["intermediate_size"], kw["num_experts"], kw["num_hidden_layers"]
    shapes = {
        "embeddings.word_embeddings.weight": (kw["vocab_size"], H),
        "embeddings.token_type_embeddings.weight": (kw["type_vocab_size"], H),
        "emb_ln.weight": (H,),
        "emb_ln.bias": (H,),
    }
    for i in range(L):
        p = f"encoder.layers.{i}."
        shapes.update(
            {
                p + "attn.Wqkv.weight": (3 * H, H),
                p + "attn.Wqkv.bias": (3 * H,),
                p + "attn.out_proj.weight": (H, H),
                p + "attn.out_proj.bias": (H,),
                p + "norm1.weight": (H,),
                p + "norm1.bias": (H,),
                p + "norm2.weight": (H,),
                p + "norm2.bias": (H,),
            }
        )
        if is_moe(kw, i):
            shapes.update(
                {
                    p + "mlp.router.layer.weight": (E, H),
                    p + "mlp.experts.mlp.w1": (E * I, H),
                    p + "mlp.experts.mlp.w2": (E * I, H),
                    p + "mlp.experts.bias": (H,),
                }
            )
        else:
            shapes.update(
                {
                    p + "mlp.fc1.weight": (I, H),
                    p + "mlp.fc1.bias": (I,),
                    p + "mlp.fc2.weight": (H, I),
                    p + "mlp.fc2.bias": (H,),
                }
            )
    return shapes


def is_moe(kw: dict, i: int) -> bool:
    n = kw["moe_every_n_layers"]
    return n > 0 and i % n == 1


def check_keys(found: Dict[str, Tuple[int, ...]], expected: Dict[str, Tuple[int, ...]], what: str) -> None:
    """Names every missing, unexpected and mis-shaped key at once, or returns."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k}: {tuple(found[k])} (expected {tuple(expected[k])})"
        for k in sorted(set(found) & set(expected))
        if tuple(found[k]) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)):
            if items:
                shown = items[:8] + ([f"... and {len(items) - 8} more"] if len(items) > 8 else [])
                lines.append(f"{len(items)} {title}: " + "; ".join(shown))
        raise UserError(
            f"{what} does not match its config: " + " | ".join(lines),
            "check that config.json belongs to these weights and that the checkpoint is complete",
        )


OUR_FIELDS = [ours for ours, _ in CONFIG_KEYS.values()] + ["num_hidden_layers"]


def kwargs_from_ours(cfg: dict) -> dict:
    """Our config.json dict -> the config fields that define the weights' layout."""
    return {k: cfg[k] for k in OUR_FIELDS if k in cfg}
