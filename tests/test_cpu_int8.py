"""int8 on a tiny model: it runs, stays close to fp32, keeps router/LayerNorms/embeddings in float, refuses clearly."""

import pytest
import torch

import nomic_moe_modeling.cpu_nomic_moe as cpu_mod
from nomic_moe_modeling.int8_nomic_moe import Int8Linear
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

SHAPE = dict(num_experts=8, top_k=2, num_layers=4)

pytestmark = pytest.mark.skipif(cpu_mod.why_no_int8() is not None, reason=f"no int8 kernel here: {cpu_mod.why_no_int8()}")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 17, 3, 30, 1]
    ids = torch.ones(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(3, 400, (n,), generator=g)
        mask[b, :n] = 1
    return ids, mask


@pytest.fixture(scope="module")
def folder(ckpts):
    return ckpts.converted(**SHAPE)


def embed(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True)


@pytest.mark.parametrize("groups", [("experts",), ("experts", "attention", "mlp")])
def test_int8_close_to_fp32_and_float_parts_stay_float(folder, groups):
    ref_model = NomicMoEModel.from_pretrained(folder).eval()
    model = NomicMoEModel.from_pretrained(folder).eval()
    info = model.quantize_int8(groups)
    assert info["groups"] == list(groups) and info["engine"] in torch.backends.quantized.supported_engines
    ids, mask = batch()
    ref, out = embed(ref_model, ids, mask), embed(model, ids, mask)
    cos = (ref.sentence_embedding * out.sentence_embedding).sum(-1)
    # at hidden size 64 one activation scale per call is coarse: the real-size gate (>= 0.999) is measured
    # in RESULTS.md; here int8 must stay close, and the experts alone within the gate
    assert cos.min().item() >= (0.999 if groups == ("experts",) else 0.99), cos
    assert out.last_hidden_state[~mask.bool()].abs().max().item() == 0  # padding stays zero
    # what stays float: router, LayerNorms, embeddings (and they are the same tensors as before)
    for layer in model.encoder.layers:
        assert isinstance(layer.norm1, torch.nn.LayerNorm) and layer.norm1.weight.dtype == torch.float32
        if layer.is_moe:
            assert isinstance(layer.mlp.router.layer, torch.nn.Linear) and layer.mlp.router.layer.weight.dtype == torch.float32
            assert layer.mlp.experts.int8 is not None and layer.mlp.experts.mlp.w1 is None
        else:
            assert isinstance(layer.mlp.fc1, Int8Linear) == ("mlp" in groups)
        assert isinstance(layer.attn.Wqkv, Int8Linear) == ("attention" in groups)
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32 and isinstance(model.emb_ln, torch.nn.LayerNorm)
    assert "last used: int8" in repr(model)


@pytest.mark.parametrize("activations", ["per_token", "per_batch"])
def test_int8_batch_partners(folder, activations):
    """per_token: each token's activations get their own scale and a row's integer
    product is its own, so partners reach a text only through float rounding; per_batch: one scale
    over the call's tokens (the default), so partners move a text's vector by int8 rounding, no more."""
    model = NomicMoEModel.from_pretrained(folder).eval()
    info = model.quantize_int8(activations=activations)
    assert info["activations"] == activations == model.int8_activations
    ids, mask = batch(1)
    together = embed(model, ids, mask).sentence_embedding
    for b in range(len(ids)):
        n = int(mask[b].sum())
        alone = embed(model, ids[b : b + 1, :n], mask[b : b + 1, :n]).sentence_embedding[0]
        assert (alone @ together[b]).item() >= (0.99999 if activations == "per_token" else 0.995)


@pytest.mark.parametrize("activations", ["per_token", "per_batch"])
def test_int8_linear_matches_float_linear(activations):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96)
    q = Int8Linear.from_linear(lin, cpu_mod.int8_engine(), activations)
    x = torch.randn(3, 7, 64)
    ref = lin(x)
    got = q(x)
    assert got.shape == ref.shape
    assert torch.nn.functional.cosine_similarity(got.flatten(0, 1), ref.flatten(0, 1)).min() > 0.999
    assert q(torch.randn(0, 64)).shape == (0, 96)
    assert torch.equal(q(torch.zeros(2, 64)), lin.bias.detach().expand(2, 96))  # an all-zero row: bias only, no NaN
    with pytest.raises(ValueError, match="activations must be one of"):
        Int8Linear.from_linear(lin, cpu_mod.int8_engine(), "per_channel")


def test_int8_refusals(folder, monkeypatch):
    model = NomicMoEModel.from_pretrained(folder).eval()
    with pytest.raises(ValueError, match="unknown int8 group"):
        model.quantize_int8(("router",))
    monkeypatch.setattr(cpu_mod, "quantized_engines", lambda: ["qnnpack"])
    with pytest.raises(RuntimeError, match="int8 cannot run here: .*no x86 int8 kernel"):
        model.quantize_int8()
    monkeypatch.undo()
    model.quantize_int8()
    with pytest.raises(ValueError, match="quantize_int8"):
        model.save_pretrained("/nonexistent/never-written")


def test_encoder_int8(folder):
    from nomic_moe_inference.encoder import Encoder

    ref = Encoder(folder).encode(["search_query: What food did they eat?", "¡Hola!"])
    enc = Encoder(folder, dtype="int8")
    assert enc.model.int8_groups
    got = enc.encode(["search_query: What food did they eat?", "¡Hola!"])
    assert (ref * got).sum(-1).min().item() >= 0.999
