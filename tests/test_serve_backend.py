"""The server's PyTorch backend: a bulk batch run half a layer at a time, with a query batch run in
between, gives the vectors of the model's own forward pass (so preemption changes no vector)."""

import numpy as np
import pytest
import torch

from nomic_moe_serving.backend import TorchBackend


def texts(rng, lengths):
    return [[0] + rng.integers(5, 200, n - 2).tolist() + [2] for n in lengths]


def reference(model, inputs):
    """The model's forward, then a plain mean over each text's tokens."""
    out = []
    with torch.no_grad():
        for ids in inputs:
            t = torch.tensor([ids])
            hidden = model(input_ids=t, attention_mask=torch.ones_like(t)).last_hidden_state[0]
            out.append(hidden.mean(0).numpy())
    return np.stack(out)


def test_layer_steps_with_a_query_batch_in_between_match_the_model(ckpts):
    b = TorchBackend(ckpts.converted(), threads=1)
    rng = np.random.default_rng(0)
    bulk, queries = texts(rng, [40, 7, 90, 23]), texts(rng, [9, 12])
    steps = b.embed_steps(bulk)
    halves = 0
    q = None
    while True:
        try:
            next(steps)
        except StopIteration as done:
            bulk_vectors = done.value
            break
        halves += 1
        if halves in (1, 4):
            q = b.embed(queries)  # the query lane preempts after the first layer's attention, and after the second layer
    assert halves == 2 * len(b.model.encoder.layers)
    np.testing.assert_allclose(bulk_vectors, reference(b.model, bulk), atol=1e-5, rtol=0)
    np.testing.assert_allclose(q, reference(b.model, queries), atol=1e-5, rtol=0)
    # each batch's routing counts land once: every MoE layer saw 2 slots per real token of both batches
    tokens = sum(len(x) for x in bulk + 2 * queries)
    assert (b.expert_pairs.sum(1) == 2 * tokens).all(), b.expert_pairs.sum(1)


def whole_layer(self, x, packing):
    """NomicMoELayer.forward as the model files had it before the two halves"""
    x = self.norm1(x + self.attn(x, packing))
    m, routing = self.mlp(x, packing)
    return self.norm2(x + m), routing


def test_model_files_without_layer_halves_step_whole_layers(ckpts, monkeypatch):
    """A folder whose model code predates attention_block / mlp_block steps a layer at a time: the same vectors."""
    b = TorchBackend(ckpts.converted(), threads=1)
    bulk = texts(np.random.default_rng(4), [60, 150])
    halved = b.embed_eager(bulk)
    layer_class = type(b.model.encoder.layers[0])
    monkeypatch.delattr(layer_class, "mlp_block")
    monkeypatch.setattr(layer_class, "forward", whole_layer)
    assert sum(1 for _ in b.embed_steps(bulk)) == len(b.model.encoder.layers)
    np.testing.assert_allclose(b.embed_eager(bulk), halved, atol=1e-6, rtol=0)


def test_model_files_without_embed_packed_run_whole(ckpts, monkeypatch):
    """A folder whose model code predates embed_packed (an older Hub revision) is served whole, not stepped."""
    b = TorchBackend(ckpts.converted(), threads=1)
    inputs = texts(np.random.default_rng(1), [30, 8])
    stepped = b.embed(inputs)
    assert b.can_step
    monkeypatch.setattr(TorchBackend, "can_step", property(lambda self: False))  # as hasattr says for old model files
    np.testing.assert_allclose(b.embed(inputs), stepped, atol=1e-6, rtol=0)


def test_short_batches_through_the_graphs_path_match_the_model(ckpts):
    """On CUDA short batches replay captured graphs (GraphedEmbedder); here its buckets run eagerly on
    the CPU: the same vectors and routing counts as the packed path, and long batches still step."""
    from nomic_moe_inference.cuda_graphs import GraphedEmbedder

    b = TorchBackend(ckpts.converted(), threads=1)
    assert b.graphs is None  # CPU: no graphs unless given
    b.graphs = GraphedEmbedder(b.model, b.pad_id, max_tokens=256, max_rows=4)
    rng = np.random.default_rng(2)
    short, long = texts(rng, [9, 30, 4]), texts(rng, [200, 100])
    np.testing.assert_allclose(b.embed(short), reference(b.model, short), atol=1e-5, rtol=0)
    assert set(b.graphs.graphs) == {(4, 32)}
    assert (b.expert_pairs.sum(1) == 2 * sum(map(len, short))).all()
    halves = sum(1 for _ in b.embed_steps(long))
    assert halves == 2 * len(b.model.encoder.layers)  # over the graphs' budget: stepped half a layer at a time
    np.testing.assert_allclose(b.embed(long), reference(b.model, long), atol=1e-5, rtol=0)


def test_a_short_batch_runs_its_layers_in_one_kernel_call(ckpts):
    """Where the CPU kernel runs every layer in one call (AVX-512, or AVX2 with FMA), a short batch takes it: no steps to
    preempt, the model's vectors, and the routing counts the metrics read come from the call."""
    b = TorchBackend(ckpts.converted(), threads=1)
    kernel = b.model.cpu_kernel if hasattr(b.model, "cpu_kernel") else None
    one_call = kernel is not None and getattr(kernel, "layers", None) is not None
    short = texts(np.random.default_rng(3), [9, 30, 4])
    steps = b.embed_steps(short)
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            vectors = done.value
            break
        yields += 1
    assert yields == (0 if one_call else 2 * len(b.model.encoder.layers))
    assert b.short_batch_tokens == (128 if one_call else None)  # the server's query batches: at most this
    np.testing.assert_allclose(vectors, reference(b.model, short), atol=1e-5, rtol=0)
    assert (b.expert_pairs.sum(1) == 2 * sum(map(len, short))).all()


def test_the_engine_refuses_a_model_nice_outside_0_to_19(ckpts):
    from nomic_moe_files.errors import UserError
    from nomic_moe_serving.engine import Engine
    from nomic_moe_serving.settings import Settings

    with pytest.raises(UserError, match="--model-nice 20"):
        Engine(Settings(model=str(ckpts.converted()), model_nice=20))
