"""The CUDA-graph path for short batches: model.embed_static (fixed shapes, every expert on every
row) against the plain reference and forward, and GraphedEmbedder's buckets. On the CPU the buckets
run eagerly; on CUDA the captured graphs are replayed and compared with the eager model."""

import numpy as np
import pytest
import torch

from plain_reference import embed_one
from test_model import ATOL, CONFIGS, models, random_batch, real_rows  # noqa: F401 (models: the shared fixture)

from nomic_moe_inference.cuda_graphs import GraphedEmbedder
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel


def forward_counts(model, ids, mask):
    """(pooled mean over real tokens, [moe layers, E] expert counts) from the ordinary forward pass."""
    counts = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: counts.append(o[1].counts.clone()))
             for layer in model.encoder.layers if layer.is_moe]
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    m = mask.unsqueeze(-1).float()
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), torch.stack(counts)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("lengths,pad_side", [([1], "right"), ([5, 17, 3, 9], "right"), ([12, 40, 7], "left")])
def test_embed_static_matches_the_reference_and_forward(models, name, lengths, pad_side):
    model, W, cfg = models(name)
    ids, mask = random_batch(lengths, cfg["vocab_size"], pad_side, seed=len(lengths))
    with torch.no_grad():
        pooled, counts = model.embed_static(ids, mask)
    want, want_counts = forward_counts(model, ids, mask)
    assert (pooled - want).abs().max().item() <= ATOL
    assert torch.equal(counts, want_counts)  # padding positions are routed too, but counted for no expert
    for b, row in enumerate(real_rows(ids, mask)):
        assert (pooled[b] - embed_one(W, cfg, row).mean(0)).abs().max().item() <= ATOL


def test_buckets():
    class Config:
        max_position_embeddings = 512

    class Model(torch.nn.Module):
        config = Config()

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    g = GraphedEmbedder(Model(), pad_id=1, max_tokens=4096, max_rows=64)
    assert g.bucket(1, 1) == (1, 16)
    assert g.bucket(1, 32) == (1, 32)
    assert g.bucket(3, 33) == (4, 64)
    assert g.bucket(64, 64) == (64, 64)
    assert g.bucket(8, 512) == (8, 512)
    assert g.bucket(65, 10) is None  # rows over max_rows
    assert g.bucket(16, 300) is None  # 16 x 512 over max_tokens: the sparse eager path
    assert g.bucket(1, 513) is None
    assert g.embed([]) is None


def test_graphed_embedder_is_batch_invariant_and_matches_forward(models):
    model, W, cfg = models("8x2")
    g = GraphedEmbedder(model, pad_id=1, max_tokens=1024, max_rows=8)
    ids, mask = random_batch([7, 30, 3, 19, 64], cfg["vocab_size"], seed=3)
    rows = real_rows(ids, mask)
    together, counts = g.embed(rows)
    assert together.shape == (5, model.config.hidden_size) and set(g.graphs) == {(8, 64)}
    want, want_counts = forward_counts(model, ids, mask)
    assert abs(together - want.numpy()).max() <= ATOL
    assert (counts == want_counts.numpy()).all()
    for i, row in enumerate(rows):  # alone, in its own smaller bucket: the same vector
        alone, _ = g.embed([row])
        assert abs(alone[0] - together[i]).max() <= ATOL
    assert (1, 64) in g.graphs and (1, 16) in g.graphs


def test_int8_models_are_not_graphed(ckpts):
    model = NomicMoEModel.from_pretrained(ckpts.converted(**CONFIGS["8x2"]), dtype=torch.float32).eval()
    assert GraphedEmbedder.available(model)
    model.quantize_int8()
    assert not GraphedEmbedder.available(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (benchmarks/gpu_check.sh runs this on one)")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_replayed_graphs_match_the_eager_model_on_cuda(models, ckpts, dtype, tol):
    model, W, cfg = models("8x2")
    gpu = NomicMoEModel.from_pretrained(ckpts.converted(**CONFIGS["8x2"]), dtype=dtype).cuda().eval()
    g = GraphedEmbedder(gpu, pad_id=1, max_tokens=1024, max_rows=8)
    for seed, lengths in enumerate([[7, 30, 3], [12], [64, 2, 2, 9, 40], [7, 30, 3]]):  # buckets in any order, one reused
        ids, mask = random_batch(lengths, cfg["vocab_size"], seed=seed)
        got, counts = g.embed(real_rows(ids, mask))
        if tol:  # fp32: against the CPU model, exactly as forward
            want, want_counts = forward_counts(model, ids, mask)
            assert abs(got - want.numpy()).max() <= tol
            assert (counts == want_counts.numpy()).all()
        else:  # bf16: against the eager CUDA model in bf16 (a 64-wide model: rounding and the odd near-tie routing flip)
            want = forward_counts(gpu, ids.cuda(), mask.cuda())[0].float().cpu().numpy()
            cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cos.min() >= 0.995, cos
    assert all(v.graph is not None for v in g.graphs.values())


def test_encoder_short_batches_through_the_graphs_match(ckpts):
    """Encoder on CUDA sends batches that fit a bucket through the graphs; forced here on the CPU
    (eager buckets): the same unit vectors, with and without Matryoshka, as the packed path."""
    from nomic_moe_inference.encoder import Encoder

    texts = ["search_query: what is a mixture of experts", "a much longer document " * 12, "¡Hola!"]
    enc = Encoder(ckpts.converted(**CONFIGS["8x2"]))
    assert enc.graphs is None
    want, want32 = enc.encode(texts, prompt="query"), enc.encode(texts, prompt="query", dim=32)
    enc.graphs = GraphedEmbedder(enc.model, pad_id=1, max_tokens=1024)
    got, got32 = enc.encode(texts, prompt="query"), enc.encode(texts, prompt="query", dim=32)
    assert enc.graphs.graphs, "the batch did not take the graphs path"
    assert (got - want).abs().max().item() <= ATOL and (got32 - want32).abs().max().item() <= ATOL


def test_a_failed_capture_or_a_disagreeing_replay_turns_the_graphs_off(models, monkeypatch):
    """Graphs are a speed path: a capture the driver refuses, or a first replay that disagrees with
    forward, turns them off with one warning, and the callers' eager path gives the vectors."""
    model, W, cfg = models("8x2")
    ids, mask = random_batch([7, 30], cfg["vocab_size"], seed=5)
    rows = real_rows(ids, mask)

    g = GraphedEmbedder(model, pad_id=1)
    monkeypatch.setattr(g, "_build", lambda key: (_ for _ in ()).throw(RuntimeError("operation not permitted when stream is capturing")))
    with pytest.warns(RuntimeWarning, match="CUDA graphs turned off"):
        assert g.embed(rows) is None
    assert "stream is capturing" in g.broken and g.bucket(1, 8) is None
    monkeypatch.undo()

    g = GraphedEmbedder(model, pad_id=1)
    real = model.embed_static
    monkeypatch.setattr(model, "embed_static", lambda i, m: (lambda p, c: (p.flip(-1), c))(*real(i, m)))
    with pytest.warns(RuntimeWarning, match="disagrees with forward"):
        assert g.embed(rows) is None
    assert g.embed(rows) is None and not g.graphs


def test_the_server_backend_falls_back_when_the_graphs_turn_off(ckpts, monkeypatch):
    from test_serve_backend import reference, texts

    from nomic_moe_serving.backend import TorchBackend

    b = TorchBackend(ckpts.converted(), threads=1)
    b.graphs = GraphedEmbedder(b.model, b.pad_id)
    monkeypatch.setattr(b.graphs, "_build", lambda key: (_ for _ in ()).throw(RuntimeError("capture failed")))
    inputs = texts(np.random.default_rng(4), [9, 20])
    with pytest.warns(RuntimeWarning):
        got = b.embed(inputs)
    np.testing.assert_allclose(got, reference(b.model, inputs), atol=ATOL, rtol=0)
    assert (b.expert_pairs.sum(1) == 2 * sum(map(len, inputs))).all()  # counted once, by the eager path
