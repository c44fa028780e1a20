"""The CPU fast path beside the plain one: w2 packed once as [out, in] rows, same results."""

import pytest
import torch

from nomic_moe_modeling.experts_nomic_moe import BACKENDS, experts_sorted, pack_w2
from nomic_moe_modeling.modeling_nomic_moe import NomicMoELinear, NomicMoEModel
from test_experts import make_case


def set_cpu_pack(model, on: bool):
    for m in model.modules():
        if hasattr(m, "pack_cpu"):
            m.pack_cpu = on


def test_packed_w2_fp32_is_exact():
    for case in (dict(N=60), dict(N=1, k=1, E=4), dict(N=90, skew=True), dict(N=0)):
        x, routing, w1, w2 = make_case(**case)
        got = experts_sorted(x, routing, w1, w2, pack_w2(w2))
        ref = BACKENDS["eager"](x, routing, w1, w2)
        assert got.shape == ref.shape
        if ref.numel():
            assert (got - ref).abs().max().item() <= 1e-5


def test_packed_w2_bf16_matches_unpacked():
    x, routing, w1, w2 = make_case(N=120, dtype=torch.bfloat16)
    packed = experts_sorted(x, routing, w1, w2, pack_w2(w2)).float()
    plain = experts_sorted(x, routing, w1, w2).float()
    assert torch.nn.functional.cosine_similarity(packed, plain, dim=-1).min() > 0.9999


@pytest.mark.parametrize("native", [False, True])
def test_bf16_model_packs_once_and_repacks_after_a_weight_change(ckpts, monkeypatch, native):
    """bf16 on a CPU that emulates it keeps w2 transposed once (pack_w2); where the CPU computes bf16
    natively every matrix is prepacked in oneDNN's layout instead, as fp32 is (the same sums)."""
    import nomic_moe_modeling.experts_nomic_moe as ex

    if native and not (ex.packed_available() and ex.bf16_native()):
        pytest.skip("oneDNN's packed bf16 linear runs only where the CPU has AVX512_BF16 or AMX")
    monkeypatch.setattr(ex, "bf16_native", lambda isa=None: native)
    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=4, top_k=2, num_layers=2), dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 400, (2, 9))
    experts = next(l for l in model.encoder.layers if l.is_moe).mlp.experts
    if native:
        with torch.no_grad():
            packed = model(input_ids=ids).last_hidden_state.float()
            assert experts.last_used == "sorted (packed)" and experts._pack.value is not None
            assert all(m._pack.value is not None for m in model.modules() if isinstance(m, NomicMoELinear))
            set_cpu_pack(model, False)
            plain = model(input_ids=ids).last_hidden_state.float()
        assert torch.nn.functional.cosine_similarity(packed.flatten(0, 1), plain.flatten(0, 1), dim=-1).min() > 0.999
        return
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state.float()
        first = experts._w2_t.value
        again = model(input_ids=ids).last_hidden_state.float()
        assert experts._w2_t.value is first and torch.equal(ref, again)  # packed once, reused
        experts.mlp.w2.mul_(2.0)
        model(input_ids=ids)
        assert experts._w2_t.value is not first  # an in-place update is seen
        torch.testing.assert_close(experts._w2_t.value, pack_w2(experts.mlp.per_expert()[1]))


# --- fp32: every expert matrix prepacked in oneDNN's layout (experts_packed) ---------------------

@pytest.fixture(params=[False, True], ids=["intel-mkl", "slow-library-fp32"])
def slow_library(request, monkeypatch):
    """Both fp32 rules of use_packed: packed up to PACKED_MAX_ROWS (Intel, where MKL is fast), and
    packed at any size (a CPU where torch's fp32 GEMM is the slow one: MKL on AMD)."""
    import nomic_moe_modeling.experts_nomic_moe as ex

    monkeypatch.setattr(ex, "library_fp32_gemm_slow", lambda: request.param)
    return request.param


def test_the_library_fp32_gemm_counts_as_slow_on_non_intel_cpus_with_mkl(monkeypatch):
    import nomic_moe_modeling.cpu_nomic_moe as cpu

    for vendor, mkl, slow in (("AuthenticAMD", True, True), ("GenuineIntel", True, False), ("", True, False),
                              ("AuthenticAMD", False, False)):
        monkeypatch.setattr(cpu, "cpu_vendor", lambda: vendor)
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: mkl)
        cpu.library_fp32_gemm_slow.cache_clear()
        try:
            assert cpu.library_fp32_gemm_slow() is slow, (vendor, mkl)
        finally:
            cpu.library_fp32_gemm_slow.cache_clear()


def test_oneDNN_packed_experts_match_the_reference(slow_library):
    from nomic_moe_modeling.experts_nomic_moe import ONEDNN, experts_packed, pack_experts, packed_available, use_packed

    assert packed_available(), "this torch has no oneDNN: the CPU fast path would never run"
    assert use_packed(700, torch.float32) is slow_library
    for case in (dict(N=60), dict(N=1, k=1, E=4), dict(N=90, skew=True), dict(N=700), dict(N=0)):
        x, routing, w1, w2 = make_case(**case)
        # N=700: long segments, on the stored weights where MKL is fast, packed where it is slow
        got = experts_packed(x, routing, w1, w2, [(ONEDNN, lambda: pack_experts(w1, w2))])
        ref = BACKENDS["eager"](x, routing, w1, w2)
        assert got.shape == ref.shape
        if ref.numel():
            assert (got - ref).abs().max().item() <= 1e-5


def test_fp32_model_uses_packed_experts_once_and_repacks_after_a_weight_change(ckpts, monkeypatch):
    path = ckpts.converted(num_experts=4, top_k=2, num_layers=2)
    model = NomicMoEModel.from_pretrained(path).eval()
    ids = torch.randint(3, 400, (3, 11))
    experts = next(l for l in model.encoder.layers if l.is_moe).mlp.experts
    with torch.no_grad():
        packed_out = model(input_ids=ids).last_hidden_state
        assert experts.last_used == "sorted (packed)"
        first = experts._pack.value
        assert torch.equal(model(input_ids=ids).last_hidden_state, packed_out) and experts._pack.value is first
        set_cpu_pack(model, False)  # the stored weights, unpacked
        plain_out = model(input_ids=ids).last_hidden_state
        assert experts.last_used == "sorted"
        assert (packed_out - plain_out).abs().max().item() <= 1e-5
        set_cpu_pack(model, True)
        experts.mlp.w1.mul_(2.0)
        model(input_ids=ids)
        assert experts._pack.value is not first  # an in-place update is seen
    model.train()
    out = model(input_ids=ids).last_hidden_state  # autograd records: the differentiable path, not the packed one
    assert experts.last_used != "sorted (packed)" and out.requires_grad


# --- fp32: the attention and dense-MLP matrices prepacked too (NomicMoELinear) --------------------

def test_packed_linear_matches_F_linear(slow_library):
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoELinear

    torch.manual_seed(0)
    for bias in (True, False):
        lin = NomicMoELinear(96, 160, bias=bias)
        with torch.no_grad():
            for n in (1, 8, 33, 700):
                x = torch.randn(n, 96)
                ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
                assert (lin(x) - ref).abs().max().item() <= 1e-5
            assert lin._pack.value is not None and lin(torch.randn(0, 96)).shape == (0, 160)
            lin.weight.mul_(0.5)  # an in-place update is seen
            x = torch.randn(5, 96)
            assert (lin(x) - torch.nn.functional.linear(x, lin.weight, lin.bias)).abs().max().item() <= 1e-5
    x = torch.randn(4, 96, requires_grad=True)
    assert lin(x).requires_grad  # autograd records: F.linear, not the packed copy
    big = NomicMoELinear(96, 160)
    with torch.no_grad():
        x = torch.randn(700, 96)
        ref = torch.nn.functional.linear(x, big.weight, big.bias)
        if slow_library:  # batch-sized calls packed too, the same sums
            assert (big(x) - ref).abs().max().item() <= 1e-5 and big._pack.value is not None
        else:  # batch-sized calls keep the stored layout, and make no packed copy
            assert torch.equal(big(x), ref) and big._pack.value is None


def test_fp32_model_packed_everywhere_matches_unpacked_and_stays_copyable(ckpts):
    import copy
    import pickle

    from nomic_moe_modeling.modeling_nomic_moe import NomicMoELinear

    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=4, top_k=2, num_layers=4)).eval()
    keys = set(model.state_dict())
    ids = torch.randint(3, 400, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    linears = [m for m in model.modules() if isinstance(m, NomicMoELinear)]
    assert {type(l.attn.Wqkv) for l in model.encoder.layers} == {NomicMoELinear}
    assert any(not l.is_moe and isinstance(l.mlp.fc1, NomicMoELinear) for l in model.encoder.layers)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert all(l._pack.value is not None for l in linears)
        set_cpu_pack(model, False)
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
        set_cpu_pack(model, True)
        assert (packed - plain).abs().max().item() <= 1e-5
        # copies start without the opaque packed tensors and rebuild them
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert all(m._pack.value is None for m in clone.modules() if isinstance(m, NomicMoELinear))
            assert torch.equal(clone(input_ids=ids, attention_mask=mask).last_hidden_state, packed)
    assert set(model.state_dict()) == keys  # the packed copies are not state
    model.to(torch.bfloat16)
    assert all(l._pack.value is None for l in linears)  # a recast drops the stale copies
    assert next(l for l in model.encoder.layers if l.is_moe).mlp.experts._pack.value is None
