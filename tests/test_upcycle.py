"""Upcycling a dense model into a MoE (SPEC §5), with the exactness the recipe promises."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from nomic_moe_conversion.convert import convert
from nomic_moe_files.errors import UserError
from nomic_moe_conversion.synthetic import make_published_checkpoint
from nomic_moe_conversion.upcycle import upcycle
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

DENSE = dict(num_experts=0, top_k=1, moe_every=0, num_layers=4)


@pytest.fixture(scope="module")
def dense_src(tmp_path_factory):
    folder = make_published_checkpoint(tmp_path_factory.mktemp("dense") / "src", seed=3, **DENSE)
    w = load_file(str(folder / "model.safetensors"))
    for k in w:
        if k.endswith("mlp.fc1.bias"):
            w[k] = torch.zeros_like(w[k])  # exactness needs fc1's bias at zero (it has no place in experts)
    save_file(w, str(folder / "model.safetensors"))
    return folder


def _run(folder, ids, mask):
    model = NomicMoEModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model, model(input_ids=ids, attention_mask=mask).last_hidden_state


def test_renormalised_upcycle_reproduces_the_dense_model(dense_src, tmp_path):
    dense = convert(str(dense_src), str(tmp_path / "dense"))
    moe = upcycle(str(dense_src), str(tmp_path / "moe"), experts=8, top_k=2, renormalize=True, bias="dense")
    ids = torch.randint(3, 400, (3, 25))
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    _, a = _run(dense, ids, mask)
    model, b = _run(moe, ids, mask)
    assert sum(layer.is_moe for layer in model.encoder.layers) == 2
    assert (a - b).abs().max().item() <= 1e-5


def test_paper_defaults(dense_src, tmp_path):
    out = upcycle(str(dense_src), str(tmp_path / "moe"), experts=4, top_k=2)
    w = load_file(str(out / "model.safetensors"))
    src = load_file(str(dense_src / "model.safetensors"))
    I = src["encoder.layers.1.mlp.fc1.weight"].shape[0]
    w1, w2 = w["encoder.layers.1.mlp.experts.mlp.w1"], w["encoder.layers.1.mlp.experts.mlp.w2"]  # [E*I, H]
    assert w1.shape == (4 * I, src["encoder.layers.1.mlp.fc1.weight"].shape[1])
    assert torch.equal(w1[3 * I : 4 * I], src["encoder.layers.1.mlp.fc1.weight"])
    assert torch.equal(w2[0:I], src["encoder.layers.1.mlp.fc2.weight"].T)
    assert w["encoder.layers.1.mlp.experts.bias"].abs().max() == 0
    assert 0.01 < w["encoder.layers.1.mlp.router.layer.weight"].std().item() < 0.03
    assert "encoder.layers.0.mlp.fc1.weight" in w and "encoder.layers.1.mlp.fc1.weight" not in w
    # without renormalisation the experts' weights sum below 1: not the dense function, as the paper starts
    ids = torch.randint(3, 400, (1, 12))
    _, a = _run(convert(str(dense_src), str(tmp_path / "dense")), ids, None)
    _, b = _run(out, ids, None)
    assert (a - b).abs().max().item() > 1e-3


def test_moe_source_is_refused(ckpts, tmp_path):
    with pytest.raises(UserError, match="already has MoE layers"):
        upcycle(str(ckpts.source(num_experts=4, top_k=2, num_layers=2)), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
