"""The encoder's layers in one kernel call (kernels/encoder_layers.c) against the plain reference and
against the model's own loop over its layers, and when the call must leave the layers to that loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

from nomic_moe_kernels import small_gemm
from plain_reference import embed_one
from test_model import ATOL, CONFIGS, models, random_batch, real_rows  # noqa: F401 - models is a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def kernel():
    k = small_gemm.load()
    if k is None and small_gemm.compiler() is None:
        pytest.skip(f"no C compiler here: {small_gemm.why_unavailable()}")
    assert k is not None, f"a C compiler is here, yet the kernel did not build: {small_gemm.why_unavailable()}"
    if k.layers is None:
        pytest.skip("the encoder-layers call needs AVX-512, or AVX2 with FMA (this CPU's kernel runs the model's loop)")
    return k


class CountRuns:
    """Counts the encoder-layers calls that ran (a result, not None)."""

    def __init__(self, runner, monkeypatch):
        self.ran, self.declined, inner = 0, 0, runner.run

        def run(model, x, packing, hooks=True):
            out = inner(model, x, packing, hooks)
            self.ran += out is not None
            self.declined += out is None
            return out

        monkeypatch.setattr(runner, "run", run)


def with_kernel(models, name, kernel, dtype="float32"):
    model, W, cfg = models(name)
    model = copy.deepcopy(model)
    if dtype == "int8":
        if not kernel.int8:
            pytest.skip("this CPU has no AVX512_VNNI")
        model.set_cpu_kernel(kernel)
        model.quantize_int8(activations="per_token")
    else:
        if dtype == "bfloat16":
            if not kernel.bf16:
                pytest.skip("this CPU has no AVX512_BF16")
            model = model.to(torch.bfloat16)
        model.set_cpu_kernel(kernel)
    return model, W, cfg


def looped(model, **inputs):
    """The model's own loop: a hook on a layer makes the kernel call leave the layers to it."""
    handle = model.encoder.layers[0].register_forward_hook(lambda *a: None)
    try:
        return model(**inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_call_matches_the_plain_reference(any_kernel, models, name, monkeypatch):
    kernel = any_kernel
    model, W, cfg = with_kernel(models, name, kernel)
    runs = CountRuns(kernel.layers, monkeypatch)
    for lengths in ([1], [5, 17, 3, 9], [40, 2, 70]):
        ids, mask = random_batch(lengths, cfg["vocab_size"], seed=len(lengths))
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            loop = looped(model, input_ids=ids, attention_mask=mask).last_hidden_state
        for b, row in enumerate(real_rows(ids, mask)):
            assert (out[b][mask[b].bool()] - embed_one(W, cfg, row)).abs().max().item() <= ATOL
        assert (out - loop).abs().max().item() <= ATOL
    assert runs.ran == 3 and runs.declined == 3  # the looped() calls


def test_batch_invariance_in_one_call(any_kernel, models, monkeypatch):
    kernel = any_kernel
    model, _, cfg = with_kernel(models, "8x2", kernel)
    runs = CountRuns(kernel.layers, monkeypatch)
    lengths = [3, 11, 30, 7, 60]
    ids, mask = random_batch(lengths, cfg["vocab_size"], seed=5)
    with torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for b, n in enumerate(lengths):
            alone = model(input_ids=ids[b : b + 1, :n], attention_mask=mask[b : b + 1, :n]).last_hidden_state[0]
            assert (together[b, :n] - alone).abs().max().item() <= ATOL
    assert runs.ran == 1 + len(lengths)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_bf16_and_int8_in_one_call_stay_with_the_loop(kernel, models, dtype, monkeypatch):
    """bf16 rounds every step as torch does, int8 takes the same s8 products: against the fp32 model
    the one call is as close as the loop (their own difference is a rounding, or an int8 step, apart)."""
    fp32, _, cfg = models("8x2")
    model, _, _ = with_kernel(models, "8x2", kernel, dtype)
    runs = CountRuns(kernel.layers, monkeypatch)
    ids, mask = random_batch([5, 17, 3, 30], cfg["vocab_size"], seed=8)
    with torch.no_grad():
        ref = fp32(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
        one = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding.float()
        loop = looped(model, input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding.float()
    assert runs.ran == 1 and runs.declined == 1
    to_ref_one, to_ref_loop = F.cosine_similarity(one, ref), F.cosine_similarity(loop, ref)
    assert to_ref_loop.min() > 0.99 and (to_ref_one - to_ref_loop).abs().max().item() < 2e-4
    assert F.cosine_similarity(one, loop).min().item() > 0.9999


def test_a_vnni_cpu_without_bf16_runs_int8_in_one_call(vnni_kernel, kernel, models, monkeypatch):
    """Cascade Lake / Ice Lake: the int8 model takes the one call with the VNNI products (nothing of
    AVX512_BF16 in their path), and gives this CPU's build's vectors; a bf16 model is left to the loop."""
    if not kernel.int8:
        pytest.skip("this CPU's own build has no int8 products to compare with")
    _, _, cfg = models("8x2")
    ours, _, _ = with_kernel(models, "8x2", kernel, "int8")
    vnni, _, _ = with_kernel(models, "8x2", vnni_kernel, "int8")
    runs = CountRuns(vnni_kernel.layers, monkeypatch)
    ids, mask = random_batch([5, 17, 3, 30], cfg["vocab_size"], seed=9)
    with torch.no_grad():
        want = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        got = vnni(input_ids=ids, attention_mask=mask).last_hidden_state
        bf16 = copy.deepcopy(models("8x2")[0]).to(torch.bfloat16)
        bf16.set_cpu_kernel(vnni_kernel)
        bf16(input_ids=ids, attention_mask=mask)
    assert runs.ran == 1 and runs.declined == 1
    assert (got - want).abs().max().item() <= ATOL


def test_expert_counts_are_the_routers(kernel, models):
    """The call returns each MoE layer's (token, slot) pairs per expert: the routing's counts, which
    the server's expert metrics read."""
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoESparseBlock

    model, _, cfg = with_kernel(models, "8x2", kernel)
    ids, mask = random_batch([5, 17, 3, 9], cfg["vocab_size"], seed=4)
    counts = []
    hooks = [m.register_forward_hook(lambda mod, args, out: counts.append(out[1].counts))
             for m in model.modules() if isinstance(m, NomicMoESparseBlock)]
    with torch.no_grad():
        try:
            loop = model(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        packing, x = model.embed_packed(ids, mask.bool())
        out, got = kernel.run_layers(model, x, packing)
    assert torch.equal(got, torch.stack(counts)) and got.sum().item() == len(hooks) * int(mask.sum()) * 2
    assert (packing.unpack(out) - loop).abs().max().item() <= ATOL


def test_the_loop_runs_where_the_call_does_not_take_the_inputs(kernel, models, monkeypatch):
    model, _, cfg = with_kernel(models, "8x2", kernel)
    runs = CountRuns(kernel.layers, monkeypatch)
    ids, mask = random_batch([9, 4], cfg["vocab_size"], seed=1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert runs.ran == 1
        # asked for what only the loop gives: each layer's output, the router logits
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_router_logits=True)
        assert len(out.hidden_states) == len(model.encoder.layers) + 1 and out.router_logits
        assert runs.ran == 1 and (out.last_hidden_state - plain).abs().max().item() <= ATOL
        # a hook on any module inside a layer: it must see its calls
        seen = []
        handle = model.encoder.layers[1].mlp.router.register_forward_hook(lambda *a: seen.append(1))
        try:
            model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()
        assert seen and runs.ran == 1 and runs.declined == 1
        # more rows than the kernel's products take: the loop (and oneDNN for the long products)
        long_ids, long_mask = random_batch([100, 60], cfg["vocab_size"], seed=2)
        model(input_ids=long_ids, attention_mask=long_mask)
        assert runs.ran == 1 and runs.declined == 2
    # with autograd recording (fine-tuning), the loop
    model(input_ids=ids, attention_mask=mask)
    assert runs.ran == 1 and runs.declined == 3


def test_one_call_follows_the_weights_as_they_change(kernel, models, monkeypatch):
    """The call's structs point into the modules' packed copies and parameters: an update in place
    (a LayerNorm's, read where it lies; a matrix's, repacked by its module) is seen at the next call."""
    model, _, cfg = with_kernel(models, "8x2", kernel)
    runs = CountRuns(kernel.layers, monkeypatch)
    ids, mask = random_batch([6, 9], cfg["vocab_size"], seed=2)
    layer = model.encoder.layers[1]
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        plan = kernel.layers._plans[model]
        layer.norm1.weight.mul_(1.5)
        layer.attn.Wqkv.weight.mul_(0.5)
        layer.mlp.experts.mlp.w1.mul_(2.0)
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert kernel.layers._plans[model] is not plan  # rebuilt on the new packed copies
        loop = looped(model, input_ids=ids, attention_mask=mask).last_hidden_state
    assert runs.ran == 2
    assert not torch.allclose(after, before) and (after - loop).abs().max().item() <= ATOL
    # a module replaced: the new one's parameters are read
    norm = torch.nn.LayerNorm(cfg["n_embd"], eps=layer.norm2.eps)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        layer.norm2 = norm
        replaced = model(input_ids=ids, attention_mask=mask).last_hidden_state
        loop = looped(model, input_ids=ids, attention_mask=mask).last_hidden_state
    assert runs.ran == 3 and not torch.allclose(replaced, after) and (replaced - loop).abs().max().item() <= ATOL
    clone = copy.deepcopy(model)  # a copy (sentence-transformers makes one) gets a plan of its own
    with torch.no_grad():
        assert (clone(input_ids=ids, attention_mask=mask).last_hidden_state - replaced).abs().max().item() <= ATOL
    assert runs.ran == 4 and kernel.layers._plans[clone] is not kernel.layers._plans[model]


def test_a_model_the_call_does_not_take_is_refused_fast_until_it_changes(kernel, models, monkeypatch):
    """A refusal is kept with what decided it: the next calls refuse without gathering the parts
    again, and a change (here a matrix given the kernel) is seen at the next call."""
    from nomic_moe_kernels.encoder_layers import LayerRunner

    model, _, cfg = with_kernel(models, "8x2", kernel)
    wqkv = model.encoder.layers[0].attn.Wqkv
    wqkv.set_cpu_kernel(None)  # one matrix without the kernel: the call does not take this model
    gathered = []
    inner = LayerRunner._gather
    monkeypatch.setattr(LayerRunner, "_gather", lambda self, *a: gathered.append(1) or inner(self, *a))
    runs = CountRuns(kernel.layers, monkeypatch)
    ids, mask = random_batch([6, 9], cfg["vocab_size"], seed=3)
    with torch.no_grad():
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
        assert runs.declined == 3 and runs.ran == 0 and len(gathered) == 1
        wqkv.set_cpu_kernel(kernel)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert runs.ran == 1 and len(gathered) == 2
        loop = looped(model, input_ids=ids, attention_mask=mask).last_hidden_state
    assert (out - loop).abs().max().item() <= ATOL


def test_the_avx2_build_leaves_bf16_and_int8_models_to_the_loop(avx2_kernel, kernel, models, monkeypatch):
    """Without bf16 or int8 products (AVX2), a bf16 model or an int8 one is refused by the call and
    runs the model's own loop (torch's bf16, the library's int8), as it did before the AVX2 call."""
    runs = CountRuns(avx2_kernel.layers, monkeypatch)
    _, _, cfg = models("8x2")
    ids, mask = random_batch([5, 17], cfg["vocab_size"], seed=9)
    bf16, _, _ = with_kernel(models, "8x2", avx2_kernel)
    bf16 = bf16.to(torch.bfloat16)
    int8, _, _ = with_kernel(models, "8x2", avx2_kernel)
    int8.quantize_int8(activations="per_token")
    with torch.no_grad():
        for model in (bf16, int8):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert torch.isfinite(out.float()).all()
    assert runs.ran == 0 and runs.declined == 2
