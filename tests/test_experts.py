"""Every expert backend against the plain per-expert loop (eager), and the backend switch."""

import os

import pytest
import torch

from nomic_moe_modeling.configuration_nomic_moe import NomicMoEConfig
from nomic_moe_modeling.experts_nomic_moe import BACKENDS, Target, auto_choice, triton_available, why_unavailable
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel, NomicMoERouter


def make_case(N=37, H=64, I=96, E=8, k=2, dtype=torch.float32, seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    cfg = NomicMoEConfig(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=k, num_attention_heads=4)
    router = NomicMoERouter(cfg)
    with torch.no_grad():
        router.layer.weight.copy_(torch.randn(E, H, generator=g) * H**-0.5)
        if skew:  # most tokens to expert 0, some experts get nothing
            router.layer.weight[0] += 3.0
            router.layer.weight[E // 2 :] -= 5.0
    x = torch.randn(N, H, generator=g).to(dtype)
    w1 = (torch.randn(E, I, H, generator=g) * H**-0.5).to(dtype)
    w2 = (torch.randn(E, I, H, generator=g) * I**-0.5).to(dtype)
    return x, router(x), w1, w2


@pytest.mark.parametrize("name", ["sorted", "grouped_mm"])
@pytest.mark.parametrize("case", [dict(), dict(k=1, E=4), dict(N=1), dict(N=200, skew=True), dict(N=0)])
def test_fp32_backends_match_eager(name, case):
    x, routing, w1, w2 = make_case(**case)
    ref = BACKENDS["eager"](x, routing, w1, w2)
    got = BACKENDS[name](x, routing, w1, w2)
    assert got.shape == ref.shape
    if ref.numel():
        assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["sorted", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_backends_close_to_eager(name, dtype):
    x, routing, w1, w2 = make_case(N=120, dtype=dtype)
    ref = BACKENDS["eager"](x.float(), routing, w1.float(), w2.float())
    got = BACKENDS[name](x, routing, w1, w2).float()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    assert cos.min().item() >= 0.999


def test_routing_segments():
    x, r, _, _ = make_case(N=50, skew=True)
    assert r.counts.sum().item() == 50 * 2 and r.offsets[-1].item() == 100
    experts_in_order = r.experts.flatten()[r.order]
    assert torch.all(experts_in_order[1:] >= experts_in_order[:-1])  # grouped by expert
    for e in range(8):
        seg = experts_in_order[r.offsets[e] : r.offsets[e + 1]]
        assert torch.all(seg == e)
    assert r.logits.dtype == torch.float32
    # weights are the raw top-k probabilities: not renormalised
    probs = r.logits.softmax(-1)
    assert torch.allclose(r.weights, probs.gather(1, r.experts))
    assert (r.weights.sum(-1) <= 1 + 1e-6).all() and (r.weights.sum(-1) < 0.99).any()


def test_backend_switch_and_refusals(ckpts):
    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=8, top_k=2)).eval()
    assert "implementation=auto" in repr(model)
    ids = torch.randint(3, 400, (3, 20))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
        assert "last used: sorted" in repr(model)  # auto on the CPU
        for name in ["eager", "sorted", "grouped_mm"]:
            model.set_moe_implementation(name)
            assert (model(input_ids=ids).last_hidden_state - base).abs().max().item() <= 1e-5
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton.*(CUDA|not installed)"):
            model.set_moe_implementation("triton")
    with pytest.raises(ValueError, match="unknown MoE implementation"):
        model.set_moe_implementation("magic")
    model.set_moe_implementation("auto")


def test_auto_choice_rules():
    assert auto_choice(Target("cpu", None, torch.float32), False) == "sorted"
    assert auto_choice(Target("cpu", None, torch.bfloat16), False) == "sorted"
    assert why_unavailable("sorted", Target("cpu", None, torch.float32), True) is None
    why = why_unavailable("triton", Target("cuda", (9, 0), torch.bfloat16), True)
    assert ("backward" if triton_available() else "not installed") in why


def test_graph_backend_matches_eager():
    from nomic_moe_modeling.experts_nomic_moe import experts_graph

    for case in (dict(N=60), dict(N=1, k=1, E=4), dict(N=90, skew=True)):
        x, routing, w1, w2 = make_case(**case)
        assert (experts_graph(x, routing, w1, w2) - BACKENDS["eager"](x, routing, w1, w2)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["eager", "sorted", "grouped_mm"])
def test_backends_under_bf16_autocast(name):
    """Fine-tuning with --bf16 runs the experts under autocast: fp32 activations, bf16 GEMMs."""
    x, routing, w1, w2 = make_case(N=40)
    x.requires_grad_(True)
    ref = BACKENDS["eager"](x.detach(), routing, w1, w2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = BACKENDS[name](x, routing, w1, w2)
    out.float().sum().backward()
    assert torch.nn.functional.cosine_similarity(out.float(), ref, dim=-1).min() > 0.99 and x.grad is not None


def scatter_combine(y_sorted, routing, n_tokens):
    """The combine as it was: weight in expert order, scatter to (token, slot) order, sum over slots."""
    weighted = y_sorted * routing.sorted_weights()[:, None]
    y = torch.empty_like(weighted)
    y[routing.order] = weighted
    return y.view(n_tokens, routing.top_k, y.shape[-1]).sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 1, 3])
def test_combine_gathers_slot_by_slot_with_the_scatters_sums(dtype, k):
    from nomic_moe_modeling.experts_nomic_moe import combine

    x, routing, _, _ = make_case(N=300, k=k, dtype=dtype, seed=k)
    y_sorted = torch.randn(300 * k, x.shape[1]).to(dtype)
    with torch.inference_mode():
        got, ref = combine(y_sorted, routing, 300), scatter_combine(y_sorted, routing, 300)
    assert got.dtype == ref.dtype == dtype
    if k <= 2:
        assert torch.equal(got, ref)  # the same products, the slots added in the same order: the same bits
    else:
        torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0)
    # training: out of place, and the gradients of the scatter's sums
    y1 = y_sorted.float().requires_grad_(True)
    w1 = routing.weights.detach().float().requires_grad_(True)
    y2 = y1.detach().clone().requires_grad_(True)
    w2 = w1.detach().clone().requires_grad_(True)
    r1 = type(routing)(routing.logits, w1, routing.experts, routing.order, routing.counts, routing.offsets)
    r2 = type(routing)(routing.logits, w2, routing.experts, routing.order, routing.counts, routing.offsets)
    g = torch.randn(300, x.shape[1])
    (combine(y1, r1, 300) * g).sum().backward()
    (scatter_combine(y2, r2, 300) * g).sum().backward()
    torch.testing.assert_close(y1.grad, y2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-4, rtol=1e-5)


def test_gelu_runs_in_place_only_where_nothing_records(monkeypatch):
    import torch.nn.functional as F

    from nomic_moe_modeling.experts_nomic_moe import gelu_

    h = torch.randn(5, 7)
    with torch.inference_mode():
        g = h.clone()
        out = gelu_(g)
        assert out.data_ptr() == g.data_ptr() and torch.equal(out, F.gelu(h))  # the same bits, no second tensor
    leaf = h.clone().requires_grad_(True)
    out = gelu_(leaf * 1.0)  # autograd records: out of place, and it differentiates
    out.sum().backward()
    assert leaf.grad is not None and torch.equal(out.detach(), F.gelu(h))
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    with torch.no_grad():  # an exporter traces it: out of place
        g = h.clone()
        assert gelu_(g).data_ptr() != g.data_ptr() and torch.equal(g, h)
