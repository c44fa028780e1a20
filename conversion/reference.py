"""A plain implementation of SPEC §2 on the published layout, for verifying converted models.

Deliberately naive and independent of modeling/: padded batches, every expert computed for every
token (dense), standard attention with an additive mask. Slow, obviously right.
"""

import math

import torch
import torch.nn.functional as F

from .layout import is_moe


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _rope(x, base):
    # x: [B, heads, S, D]; positions 0..S-1 (right padding)
    S, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.arange(S, dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


@torch.no_grad()
def reference_forward(weights: dict, kw: dict, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      gelu: str = "none") -> torch.Tensor:
    """weights: published keys -> tensors; kw: our config fields (layout.our_config_kwargs).

    Returns last_hidden_state [B, S, H] in fp32 (values at padding positions are meaningless).
    gelu="tanh" computes every GELU with the tanh approximation, as TEI does (SPEC §8).
    """
    H, nh, E, k = kw["hidden_size"], kw["num_attention_heads"], kw["num_experts"], kw["num_experts_per_tok"]
    eps, D = kw["layer_norm_eps"], kw["hidden_size"] // kw["num_attention_heads"]
    W = {name: t.float() for name, t in weights.items()}
    B, S = input_ids.shape

    h = W["embeddings.word_embeddings.weight"][input_ids] + W["embeddings.token_type_embeddings.weight"][0]
    h = _ln(h, W["emb_ln.weight"], W["emb_ln.bias"], eps)
    additive = (1.0 - attention_mask.float())[:, None, None, :] * -1e9  # [B,1,1,S]

    for i in range(kw["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        qkv = h @ W[p + "attn.Wqkv.weight"].T + W[p + "attn.Wqkv.bias"]  # [B,S,3H]
        q, kk, v = qkv.split(H, dim=-1)
        q, kk, v = (t.view(B, S, nh, D).transpose(1, 2) for t in (q, kk, v))  # [B,nh,S,D]
        q, kk = _rope(q, kw["rope_theta"]), _rope(kk, kw["rope_theta"])
        att = (q @ kk.transpose(-1, -2) / math.sqrt(D) + additive).softmax(-1)
        ctx = (att @ v).transpose(1, 2).reshape(B, S, H)
        a = ctx @ W[p + "attn.out_proj.weight"].T + W[p + "attn.out_proj.bias"]
        h = _ln(h + a, W[p + "norm1.weight"], W[p + "norm1.bias"], eps)

        if is_moe(kw, i):
            probs = (h @ W[p + "mlp.router.layer.weight"].T).softmax(-1)  # [B,S,E]
            top_w, top_e = probs.topk(k, dim=-1)
            if kw["norm_topk_prob"]:
                top_w = top_w / top_w.sum(-1, keepdim=True)
            gate = torch.zeros_like(probs).scatter(-1, top_e, top_w)  # [B,S,E], zero off the top-k
            w1 = W[p + "mlp.experts.mlp.w1"].view(E, -1, H)
            w2 = W[p + "mlp.experts.mlp.w2"].view(E, -1, H)
            m = torch.zeros_like(h)
            for e in range(E):  # every expert on every token, weighted by its (possibly zero) gate
                m = m + gate[..., e : e + 1] * (F.gelu(h @ w1[e].T, approximate=gelu) @ w2[e])
            m = m + W[p + "mlp.experts.bias"]
        else:
            m = F.gelu(h @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"], approximate=gelu) @ W[p + "mlp.fc2.weight"].T
            m = m + W[p + "mlp.fc2.bias"]
        h = _ln(h + m, W[p + "norm2.weight"], W[p + "norm2.bias"], eps)
    return h


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Masked mean over tokens, optional Matryoshka truncation, L2 normalisation."""
    m = attention_mask.to(hidden.dtype)[..., None]
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if dim is not None:
        emb = emb[:, :dim]
    return F.normalize(emb, dim=-1)
