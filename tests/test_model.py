"""The model against the tests' own implementation of SPEC §2, and its behaviour as a transformers model."""

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import published
from plain_reference import embed_one

from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

ATOL = 1e-5

CONFIGS = {
    "8x2": dict(num_experts=8, top_k=2),
    "4x1": dict(num_experts=4, top_k=1),
    "4x2-renorm": dict(num_experts=4, top_k=2, normalize=True),
    "8x2-every3": dict(num_experts=8, top_k=2, moe_every=3, num_layers=5),
}


def random_batch(lengths, vocab, pad_side="right", seed=0):
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.ones(len(lengths), S, dtype=torch.long)  # pad id 1
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(3, vocab, (n,), generator=g)
        row[0], row[-1] = 0, 2
        sl = slice(0, n) if pad_side == "right" else slice(S - n, S)
        ids[b, sl], mask[b, sl] = row, 1
    return ids, mask


def real_rows(ids, mask):
    return [ids[b][mask[b].bool()].tolist() for b in range(len(ids))]


@pytest.fixture(scope="module")
def models(ckpts):
    cache = {}

    def get(name):
        if name not in cache:
            folder = ckpts.converted(**CONFIGS[name])
            cache[name] = (NomicMoEModel.from_pretrained(folder, dtype=torch.float32).eval(), *published(ckpts.source(**CONFIGS[name])))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths,pad_side", [([1], "right"), ([5, 17, 3, 9], "right"), ([12, 40, 7], "left"), ([2, 2, 2], "right")])
def test_matches_plain_reference(models, name, lengths, pad_side):
    model, W, cfg = models(name)
    ids, mask = random_batch(lengths, cfg["vocab_size"], pad_side, seed=len(lengths))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, row in enumerate(real_rows(ids, mask)):
        ref = embed_one(W, cfg, row)
        got = out[b][mask[b].bool()]
        assert (got - ref).abs().max().item() <= ATOL
        assert out[b][~mask[b].bool()].abs().max().item() == 0 if (~mask[b].bool()).any() else True


def test_long_sequences_match_reference(models):
    model, W, cfg = models("8x2")
    ids, mask = random_batch([512, 300, 1], cfg["vocab_size"], seed=7)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    for b, row in enumerate(real_rows(ids, mask)):
        assert (out[b][mask[b].bool()] - embed_one(W, cfg, row)).abs().max().item() <= ATOL


def test_batch_invariance(models):
    """A text's output does not depend on its batch partners or on the amount or side of padding."""
    model, _, cfg = models("8x2")
    rng = random.Random(0)
    lengths = [rng.randint(1, 120) for _ in range(9)]
    ids, mask = random_batch(lengths, cfg["vocab_size"], seed=3)
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for b, n in enumerate(lengths):
            alone = model(input_ids=ids[b : b + 1, :n], attention_mask=mask[b : b + 1, :n]).last_hidden_state[0]
            assert (together[b, :n] - alone).abs().max().item() <= ATOL
            # the same text padded far out on the left, next to a different partner
            left = torch.cat([torch.ones(1, 200 - n, dtype=torch.long), ids[b : b + 1, :n]], 1)
            lmask = torch.cat([torch.zeros(1, 200 - n, dtype=torch.long), mask[b : b + 1, :n]], 1)
            partner_ids, partner_mask = random_batch([200], cfg["vocab_size"], seed=b + 100)
            both = model(
                input_ids=torch.cat([left, partner_ids]), attention_mask=torch.cat([lmask, partner_mask])
            ).last_hidden_state
            assert (both[0, 200 - n :] - alone).abs().max().item() <= ATOL


def test_missing_attention_mask_means_all_real(models):
    model, _, cfg = models("8x2")
    ids, mask = random_batch([6, 6], cfg["vocab_size"])
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(input_ids=ids, attention_mask=mask).last_hidden_state
        c = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    assert torch.equal(a, b) and torch.equal(b, c)


def test_eager_attention_matches_sdpa(models):
    model, _, cfg = models("8x2")
    ids, mask = random_batch([9, 30, 4], cfg["vocab_size"])
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.config._attn_implementation = "eager"
        try:
            eager = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            model.config._attn_implementation = "sdpa"
    assert (sdpa - eager).abs().max().item() <= ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_embeddings_close_to_fp32(ckpts, models, dtype):
    model, _, cfg = models("8x2")
    half = NomicMoEModel.from_pretrained(ckpts.converted(**CONFIGS["8x2"]), dtype=dtype).eval()
    ids, mask = random_batch([20, 64, 3, 100], cfg["vocab_size"], seed=5)
    with torch.no_grad():
        out32 = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
        out16 = half(input_ids=ids, attention_mask=mask, output_router_logits=True)
    full, low = out32.last_hidden_state, out16.last_hidden_state
    assert low.dtype == dtype and torch.isfinite(low).all()
    # near-tie routing flips: tokens whose chosen expert set differs from fp32's, counted and bounded
    k = cfg["moe_top_k"]
    flips = sum(
        int((a.topk(k).indices.sort().values != b.topk(k).indices.sort().values).any(-1).sum())
        for a, b in zip(out32.router_logits, out16.router_logits)
    )
    routed = sum(a.shape[0] for a in out32.router_logits)
    assert flips <= 0.05 * routed, f"{flips} of {routed} routing decisions flipped"
    m = mask[..., None].float()
    e32 = F.normalize((full * m).sum(1) / m.sum(1), dim=-1)
    e16 = F.normalize((low.float() * m).sum(1) / m.sum(1), dim=-1)
    assert (e32 * e16).sum(-1).min().item() >= 0.999


def test_router_outputs_and_training_step(models):
    model, _, cfg = models("8x2")
    ids, mask = random_batch([10, 4], cfg["vocab_size"])
    model.train()
    try:
        out = model(input_ids=ids, attention_mask=mask, output_router_logits=True, output_hidden_states=True)
        n_moe = sum(layer.is_moe for layer in model.encoder.layers)
        assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (14, cfg["num_experts"])
        assert len(out.hidden_states) == cfg["n_layer"] + 1
        # balanced routing gives exactly 1; any routing gives >= 1 up to top-k effects, never 0
        assert out.aux_loss.item() > 0.5
        loss = out.last_hidden_state.pow(2).mean() + cfg["router_aux_loss_coef"] * out.aux_loss
        loss.backward()
        moe = next(layer.mlp for layer in model.encoder.layers if layer.is_moe)
        assert moe.router.layer.weight.grad is not None and moe.router.layer.weight.grad.abs().sum() > 0
        assert moe.experts.mlp.w1.grad.abs().sum() > 0 and moe.experts.bias.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_gradient_checkpointing_gives_same_gradients(ckpts):
    folder = ckpts.converted(**CONFIGS["4x1"])
    grads = []
    for ckpt in (False, True):
        model = NomicMoEModel.from_pretrained(folder, dtype=torch.float32).train()
        if ckpt:
            model.gradient_checkpointing_enable()
        ids, mask = random_batch([7, 3], model.config.vocab_size)
        model(input_ids=ids, attention_mask=mask).last_hidden_state.sum().backward()
        grads.append(model.encoder.layers[1].mlp.experts.mlp.w1.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_save_pretrained_round_trip(models, tmp_path):
    model, _, cfg = models("8x2")
    model.save_pretrained(tmp_path)
    again = NomicMoEModel.from_pretrained(tmp_path).eval()
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    ids, mask = random_batch([5, 8], cfg["vocab_size"])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask)[0], again(input_ids=ids, attention_mask=mask)[0])


def test_input_embeddings_accessors(models):
    model, _, _ = models("8x2")
    emb = model.get_input_embeddings()
    assert emb is model.embeddings.word_embeddings
    model.set_input_embeddings(emb)
    assert model.get_input_embeddings() is emb


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(input_ids=torch.ones(2, 3)), TypeError, "integer token ids"),
        (dict(input_ids=torch.ones(3, dtype=torch.long)), ValueError, r"\[batch, seq_len\]"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.zeros(1, 1, 3, 3)), ValueError, "0/1 mask"),
        (dict(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0.0, -1e9, 0.0]])), ValueError, "additive"),
        (dict(input_ids=torch.ones(1, 3000, dtype=torch.long)), ValueError, "truncate"),
        (dict(input_ids=torch.full((1, 3), 10**6)), ValueError, "tokenizer"),
    ],
)
def test_bad_input_is_refused_with_a_fix(models, kwargs, error, match):
    model, _, _ = models("8x2")
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_all_padding_row_is_zero_and_finite(models):
    model, _, cfg = models("8x2")
    ids, mask = random_batch([5, 1], cfg["vocab_size"])
    mask[1] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all() and out[1].abs().max() == 0


def test_graph_export_path_matches(models, monkeypatch):
    """The path a graph exporter sees (padded layout, unrolled sparse experts) gives the same outputs."""
    import nomic_moe_modeling.modeling_nomic_moe as mm

    model, _, cfg = models("8x2")
    ids, mask = random_batch([30, 4, 17], cfg["vocab_size"], pad_side="left", seed=11)
    mask[1] = 0  # a row with no real token at all
    with torch.no_grad():
        normal = model(input_ids=ids, attention_mask=mask).last_hidden_state
        monkeypatch.setattr(mm, "is_exporting", lambda: True)
        graph = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(graph).all()
    assert (normal - graph).abs().max().item() <= ATOL
