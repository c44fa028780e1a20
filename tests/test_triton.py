"""The triton kernel pair against eager (on the CPU under TRITON_INTERPRET=1, small sizes)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is installed in the latest world only (the optimum world pins an older stack)")

from test_experts import make_case  # noqa: E402

from nomic_moe_modeling.experts_nomic_moe import BACKENDS  # noqa: E402
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on(device, *ts):
    return [t.to(device) for t in ts]


@pytest.mark.parametrize("case", [dict(), dict(k=1, E=4), dict(N=1), dict(N=70, skew=True), dict(N=33, H=48, I=80)])
def test_fp32_triton_matches_eager(case):
    x, routing, w1, w2 = make_case(**case)
    ref = BACKENDS["eager"](x, routing, w1, w2)
    routing = type(routing)(*_on(DEVICE, routing.logits, routing.weights, routing.experts, routing.order, routing.counts, routing.offsets))
    got = BACKENDS["triton"](*_on(DEVICE, x), routing, *_on(DEVICE, w1, w2)).cpu()
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_triton_close_to_eager(dtype):
    x, routing, w1, w2 = make_case(N=40, dtype=dtype)
    ref = BACKENDS["eager"](x.float(), routing, w1.float(), w2.float())
    routing = type(routing)(*_on(DEVICE, routing.logits, routing.weights, routing.experts, routing.order, routing.counts, routing.offsets))
    got = BACKENDS["triton"](*_on(DEVICE, x), routing, *_on(DEVICE, w1, w2)).float().cpu()
    assert F.cosine_similarity(got, ref, dim=-1).min().item() >= 0.999


def test_whole_model_with_triton_backend(ckpts):
    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=4, top_k=2, num_layers=2)).to(DEVICE).eval()
    ids = torch.randint(3, 400, (2, 9), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        model.set_moe_implementation("triton")
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert "last used: triton" in repr(model)
    assert (got - ref).abs().max().item() <= 1e-5
