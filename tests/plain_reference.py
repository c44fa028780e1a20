"""The tests' own implementation of SPEC §2, written from the spec and nothing else.

One text at a time (no padding exists), one token at a time through the MoE, straight from the
published checkpoint's flat keys and GPT-2 style config. Slow and obvious on purpose.
"""

import math

import torch


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def rotate(x, base):
    # x: [heads, S, D], positions 0..S-1, "rotate half" pairs (i, i + D/2)
    S, D = x.shape[1], x.shape[2]
    half = D // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64) * 2 / D)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * freq[None, :]  # [S, half]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.no_grad()
def embed_one(W: dict, cfg: dict, ids: list) -> torch.Tensor:
    """last_hidden_state [S, H] of one unpadded text. W: published keys; cfg: published config."""
    H, nh, eps = cfg["n_embd"], cfg["n_head"], cfg["layer_norm_epsilon"]
    D = H // nh
    E, k, every = cfg["num_experts"], cfg["moe_top_k"], cfg["moe_every_n_layers"]
    W = {n: t.double() for n, t in W.items()}  # float64: the oracle's own rounding is negligible
    ids = torch.tensor(ids)
    S = len(ids)

    h = W["embeddings.word_embeddings.weight"][ids] + W["embeddings.token_type_embeddings.weight"][0]
    h = layer_norm(h, W["emb_ln.weight"], W["emb_ln.bias"], eps)
    for i in range(cfg["n_layer"]):
        p = f"encoder.layers.{i}."
        qkv = h @ W[p + "attn.Wqkv.weight"].T + W[p + "attn.Wqkv.bias"]
        q = qkv[:, :H].reshape(S, nh, D).transpose(0, 1)
        kk = qkv[:, H : 2 * H].reshape(S, nh, D).transpose(0, 1)
        v = qkv[:, 2 * H :].reshape(S, nh, D).transpose(0, 1)
        q, kk = rotate(q, cfg["rotary_emb_base"]), rotate(kk, cfg["rotary_emb_base"])
        att = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(D), dim=-1)
        ctx = (att @ v).transpose(0, 1).reshape(S, H)
        h = layer_norm(h + ctx @ W[p + "attn.out_proj.weight"].T + W[p + "attn.out_proj.bias"], W[p + "norm1.weight"], W[p + "norm1.bias"], eps)

        if every and i % every == 1:
            I = W[p + "mlp.experts.mlp.w1"].shape[0] // E
            w1 = W[p + "mlp.experts.mlp.w1"].view(E, I, H)
            w2 = W[p + "mlp.experts.mlp.w2"].view(E, I, H)
            m = torch.zeros_like(h)
            for t in range(S):
                probs = torch.softmax(W[p + "mlp.router.layer.weight"] @ h[t], dim=-1)
                chosen = sorted(range(E), key=lambda e: -probs[e].item())[:k]
                total = sum(probs[e] for e in chosen) if cfg.get("moe_normalize_expert_weights") else 1.0
                for e in chosen:
                    m[t] += (probs[e] / total) * (gelu(w1[e] @ h[t]) @ w2[e])
                m[t] += W[p + "mlp.experts.bias"]
        else:
            m = gelu(h @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"]) @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
        h = layer_norm(h + m, W[p + "norm2.weight"], W[p + "norm2.bias"], eps)
    return h.float()
