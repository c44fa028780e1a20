"""The few-row CPU kernel (kernels/small_gemm.c) beside the plain product it replaces: F.linear, and
the whole model against the plain reference of SPEC §2."""

import copy
import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nomic_moe_kernels import small_gemm
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEAttention, NomicMoEExperts, NomicMoELinear
from plain_reference import embed_one
from test_model import ATOL, models, random_batch, real_rows  # noqa: F401 - models is a fixture

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def kernel():
    k = small_gemm.load()
    if k is None and small_gemm.compiler() is None:
        pytest.skip(f"no C compiler here: {small_gemm.why_unavailable()}")
    assert k is not None, f"a C compiler is here, yet the kernel did not build: {small_gemm.why_unavailable()}"
    return k


def test_doctor_reports_what_the_kernel_does(kernel):
    """`nomic-moe doctor --json` on this CPU: the kernel's dtypes, attention and the int8 GELU."""
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    fk = json.loads(r.stdout)["cpu"]["few_row_kernel"]
    assert fk["available"] and fk["attention"] == kernel.attention_ok and fk["int8_gelu"] == kernel.int8
    assert fk["layers_in_one_call"] == (kernel.layers is not None)
    assert ("int8" in fk["dtypes"]) == kernel.int8


class Counting:
    """The kernel, counting the rows it was given (to prove that the model really used it)."""

    def __init__(self, inner):
        self.inner, self.calls, self.rows = inner, 0, []

    def accepts(self, rows, dtype):
        return self.inner.accepts(rows, dtype)

    def pack(self, w):
        return self.inner.pack(w)

    def linear(self, x, packed, bias=None):
        self.calls += 1
        self.rows.append(x.shape[0])
        return self.inner.linear(x, packed, bias)

    attentions = 0

    def accepts_attention(self, dtype, head_dim):
        return self.inner.accepts_attention(dtype, head_dim)

    def attention(self, qkv, bounds, cos, sin):
        self.attentions += 1
        return self.inner.attention(qkv, bounds, cos, sin)



class CountingGrouped(Counting):
    """As Counting, with the kernel's grouped call (one call for a layer's experts)."""

    grouped = 0

    def linear_grouped(self, xs, bounds, packs):
        self.calls += 1
        self.grouped += 1
        self.rows.extend(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]))
        return self.inner.linear_grouped(xs, bounds, packs)


class Routed(CountingGrouped):
    """As CountingGrouped, with the kernel's own routing (moe_route, moe_combine) around the grouped calls."""

    routes = 0

    def moe_route(self, x, experts, num_experts):
        self.routes += 1
        return self.inner.moe_route(x, experts, num_experts)

    def moe_combine(self, ys, order, weights, bias=None):
        return self.inner.moe_combine(ys, order, weights, bias)


class Int8PerExpert:
    """The int8 side of the kernel without its grouped call: one call per expert segment."""

    def __init__(self, inner):
        self.inner = inner

    def accepts(self, rows, dtype):
        return self.inner.accepts(rows, dtype)

    def pack_int8(self, wq, scale):
        return self.inner.pack_int8(wq, scale)

    def linear_int8(self, x, packed, bias=None):
        return self.inner.linear_int8(x, packed, bias)


class Int8Grouped(Int8PerExpert):
    grouped = 0

    def linear_int8_grouped(self, xs, bounds, packs):
        self.grouped += 1
        return self.inner.linear_int8_grouped(xs, bounds, packs)


SHAPES = [(1, 96, 64), (3, 37, 33), (8, 768, 160), (9, 64, 100), (17, 200, 96), (130, 96, 70), (0, 64, 32)]


@pytest.mark.parametrize("rows,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_product_matches_F_linear(kernel, rows, k, n, with_bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    w = torch.randn(n, k, generator=g) * k**-0.5
    b = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(rows, k, generator=g)
    got = kernel.linear(x, kernel.pack(w), b)
    ref = F.linear(x, w, b)
    assert got.shape == ref.shape == (rows, n) and got.dtype == torch.float32
    if rows:
        assert (got - ref).abs().max().item() <= 1e-5


def test_fp32_product_takes_strided_rows(kernel):
    """Rows with a stride (a slice of a wider matrix) and a packed weight reused across calls."""
    g = torch.Generator().manual_seed(1)
    w, wide = torch.randn(48, 64, generator=g) / 8, torch.randn(5, 100, generator=g)
    packed = kernel.pack(w)
    x = wide[:, 10:74]  # row stride 100
    assert x.stride() == (100, 1)
    for _ in range(2):
        assert (kernel.linear(x, packed) - F.linear(x, w)).abs().max().item() <= 1e-5
    xt = torch.randn(64, 5, generator=g).T  # column-major rows are copied first
    assert (kernel.linear(xt, packed) - F.linear(xt, w)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rows,k,n", [(1, 96, 64), (8, 768, 160), (9, 64, 100), (17, 200, 33)])
def test_bf16_product_matches_F_linear_to_one_rounding(kernel, rows, k, n):
    if not kernel.bf16:
        pytest.skip("this CPU has no AVX512_BF16: bf16 stays with oneDNN, and the kernel says so (accepts)")
    g = torch.Generator().manual_seed(rows + n)
    w = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    x = torch.randn(rows, k, generator=g).bfloat16()
    got = kernel.linear(x, kernel.pack(w), b)
    exact = F.linear(x.float(), w.float(), b.float())  # fp32 sums of the same bf16 numbers
    assert got.dtype == torch.bfloat16
    # one bf16 rounding of the output (2^-8 relative) plus fp32 summation order
    assert ((got.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-4).all()


def test_packed_weights_are_cut_from_the_arena_and_compute_the_same(kernel):
    """Packed weights live in the kernel's arena (2 MiB-aligned blocks advised into huge pages): each
    piece page-aligned, none overlapping, and the products bit for bit those of ordinary memory."""
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(n, 96, generator=g) / 10 for n in (64, 100, 33)]
    x = torch.randn(9, 96, generator=g)
    packs = [kernel.pack(w) for w in ws]
    spans = sorted((p.panels.data_ptr(), p.panels.data_ptr() + p.panels.numel() * 4) for p in packs)
    assert all(lo % small_gemm.Arena.ALIGN == 0 for lo, _ in spans)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans[:-1], spans[1:])), "two packed weights share memory"
    assert kernel.arena.huge is not None  # the arena, not torch.empty, gave the memory
    kernel.arena.enabled = False
    try:
        plain = [kernel.pack(w) for w in ws]
    finally:
        kernel.arena.enabled = True
    for p, q, w in zip(packs, plain, ws):
        assert torch.equal(p.panels, q.panels)
        assert torch.equal(kernel.linear(x, p), kernel.linear(x, q))


def test_an_arena_block_lives_while_a_tensor_on_it_does(kernel):
    import gc
    import weakref

    arena = small_gemm.Arena(ctypes_lib(kernel))
    arena.BLOCK = 1 << 21
    t = arena.empty((1000, 100), torch.float32)  # 400 KB: the first block
    block = weakref.ref(arena._block[0])
    t.fill_(3.0)
    view = t[10:20]
    del t
    arena.empty((600, 1000), torch.float32)  # does not fit what is left: a second block
    gc.collect()
    assert block() is not None and view.sum().item() == 3.0 * 10 * 100  # still held by the view
    del view
    gc.collect()
    assert block() is None, "the first block was not freed once nothing used it"
    assert arena.empty((0, 5), torch.float32).shape == (0, 5)


def ctypes_lib(kernel):
    import ctypes

    return ctypes.CDLL(str(kernel.path))


def rope_then_attention(qkv, lengths, dtype):
    """The plain version of the attention kernel: apply_rope, then one SDPA per text, in ``dtype``."""
    from nomic_moe_modeling.modeling_nomic_moe import Packing, apply_rope, attend_per_text

    mask = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    packing = Packing.from_mask(mask)
    cos, sin = packing.rope(qkv.shape[-1], 10000.0, dtype)
    q, k = apply_rope(qkv[:, :2].to(dtype), cos[:, None], sin[:, None]).unbind(1)
    return attend_per_text(q, k, qkv[:, 2].to(dtype), packing), packing


@pytest.mark.parametrize("heads,D", [(3, 16), (12, 64), (2, 128)])
def test_attention_kernel_is_rope_then_sdpa_per_text(any_kernel, heads, D):
    kernel = any_kernel
    if not kernel.attention_ok:
        pytest.skip("the attention kernel needs AVX-512 or AVX2")
    lengths = [1, 5, 17, 40, 2, 70]  # one token, tails of every size against the 16- and 64-wide blocks
    g = torch.Generator().manual_seed(heads * D)
    qkv = torch.randn(sum(lengths), 3, heads, D, generator=g) * 2  # scores of std ~4: peaked softmax rows
    ref, packing = rope_then_attention(qkv, lengths, torch.float32)
    cos, sin = packing.rope(D, 10000.0, torch.float32)
    got = kernel.attention(qkv, packing.text_bounds(), cos, sin)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert ((got - ref).abs() <= 1e-5 + 3e-6 * ref.abs()).all()  # fp32 sums in another order, nothing more
    # rows with a stride (the view of a wider Wqkv output) and an empty text
    wide = torch.cat([qkv.flatten(1), torch.randn(qkv.shape[0], 7, generator=g)], 1)[:, :-7].view_as(qkv)
    bounds = packing.text_bounds()
    assert torch.equal(kernel.attention(wide, bounds[:2] + bounds[1:], cos, sin), got)


def test_attention_kernel_in_bf16_is_as_close_to_fp32_as_torchs_own(kernel):
    """bf16 in and out; with AVX512_BF16 the products take bf16 q, k, v and softmax weights (as torch's
    bf16 RoPE leaves q and k) with fp32 sums: no further from the fp32 result than torch's own bf16
    path (RoPE rounded after every elementwise op, then SDPA)."""
    if not (kernel.attention_ok and kernel.bf16):
        pytest.skip("needs AVX-512 with AVX512_BF16")
    lengths = [32, 3, 70, 1]
    g = torch.Generator().manual_seed(7)
    qkv = (torch.randn(sum(lengths), 3, 12, 64, generator=g) * 2).bfloat16()
    ref, packing = rope_then_attention(qkv.float(), lengths, torch.float32)
    own, _ = rope_then_attention(qkv, lengths, torch.bfloat16)
    cos, sin = packing.rope(64, 10000.0, torch.float32)
    got = kernel.attention(qkv, packing.text_bounds(), cos, sin)
    assert got.dtype == torch.bfloat16
    err, own_err = (got.float() - ref).abs(), (own.float() - ref).abs()
    assert err.max() <= own_err.max() and err.mean() <= own_err.mean()


def test_attention_kernel_refuses_what_it_cannot_take(kernel):
    if not kernel.attention_ok:
        pytest.skip("the attention kernel needs AVX-512 or AVX2")
    cos = sin = torch.zeros(4, 16)
    assert not kernel.accepts_attention(torch.float32, 24) and not kernel.accepts_attention(torch.float32, 144)
    assert not kernel.accepts_attention(torch.float16, 64)
    with pytest.raises(ValueError, match="multiple of 16"):
        kernel.attention(torch.zeros(4, 3, 2, 24), [0, 4], cos, sin)
    with pytest.raises(ValueError, match="do not split 4 tokens"):
        kernel.attention(torch.zeros(4, 3, 2, 16), [0, 3], cos, sin)
    with pytest.raises(ValueError, match="do not split 4 tokens"):
        kernel.attention(torch.zeros(4, 3, 2, 16), [0, 3, 2, 4], cos, sin)


def test_what_the_kernel_accepts_and_refuses(kernel):
    assert kernel.accepts(8, torch.float32) and kernel.accepts(small_gemm.MAX_ROWS[torch.float32], torch.float32)
    assert not kernel.accepts(small_gemm.MAX_ROWS[torch.float32] + 1, torch.float32)
    assert not kernel.accepts(8, torch.float16)
    assert kernel.accepts(8, torch.bfloat16) == kernel.bf16
    with pytest.raises(ValueError, match="packs 2-d CPU weights"):
        kernel.pack(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        kernel.linear(torch.randn(2, 5), kernel.pack(torch.randn(3, 4)))
    if kernel.bf16:
        with pytest.raises(ValueError, match="even input width"):
            kernel.pack(torch.randn(4, 5).bfloat16())


def test_model_with_the_kernel_matches_the_plain_reference(kernel, models):
    model, W, cfg = models("8x2")
    spy = CountingGrouped(kernel)
    model.set_cpu_kernel(spy)
    try:
        for lengths in ([1], [5, 17, 3, 9], [40, 2]):
            ids, mask = random_batch(lengths, cfg["vocab_size"], seed=len(lengths))
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, row in enumerate(real_rows(ids, mask)):
                assert (out[b][mask[b].bool()] - embed_one(W, cfg, row)).abs().max().item() <= ATOL
        # it took every product here: attention, dense MLP and each MoE layer's experts, all at once
        assert spy.calls > 0 and spy.grouped > 0 and max(spy.rows) <= small_gemm.MAX_ROWS[torch.float32]
        # and RoPE + attention, where this CPU has the attention kernel (AVX-512, or AVX2 with FMA)
        assert spy.attentions == (3 * len(model.encoder.layers) if kernel.attention_ok else 0)
        assert model.encoder.layers[0].attn.last_used == ("cpu kernel (RoPE + attention)" if kernel.attention_ok else "sdpa_per_text")
        experts = next(l for l in model.encoder.layers if l.is_moe).mlp.experts
        assert experts._kernel_pack.value is not None and experts._pack.value is None  # no oneDNN copy was made
    finally:
        model.set_cpu_kernel(None)


def test_batch_invariance_with_the_kernel(kernel, models):
    """Batch partners change how many rows reach each product (and so which tile a row is in)."""
    model, _, cfg = models("8x2")
    model.set_cpu_kernel(kernel)
    try:
        lengths = [3, 11, 30, 7, 60]
        ids, mask = random_batch(lengths, cfg["vocab_size"], seed=5)
        with torch.no_grad():
            together = model(input_ids=ids, attention_mask=mask).last_hidden_state
            for b, n in enumerate(lengths):
                alone = model(input_ids=ids[b : b + 1, :n], attention_mask=mask[b : b + 1, :n]).last_hidden_state[0]
                assert (together[b, :n] - alone).abs().max().item() <= ATOL
    finally:
        model.set_cpu_kernel(None)


def test_kernel_repacks_after_a_weight_change_and_survives_copies(kernel, models):
    model, _, cfg = models("8x2")
    model.set_cpu_kernel(kernel)
    try:
        ids, mask = random_batch([6, 9], cfg["vocab_size"], seed=2)
        experts = next(l for l in model.encoder.layers if l.is_moe).mlp.experts
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).last_hidden_state
            for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
                assert all(m.cpu_kernel is not None for m in clone.modules() if isinstance(m, (NomicMoELinear, NomicMoEExperts)))
                assert torch.equal(clone(input_ids=ids, attention_mask=mask).last_hidden_state, before)
            first = experts._kernel_pack.value
            experts.mlp.w2.mul_(2.0)
            changed = model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert experts._kernel_pack.value is not first  # an in-place update is seen
            model.set_cpu_kernel(None)
            plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
            experts.mlp.w2.div_(2.0)
        assert not torch.allclose(changed, before) and (changed - plain).abs().max().item() <= 1e-5
    finally:
        model.set_cpu_kernel(None)


def test_without_a_compiler_the_model_keeps_onednn_and_says_why(kernel, models, monkeypatch, tmp_path):
    from nomic_moe_inference.cpu import use_cpu_kernels

    model, _, cfg = models("8x2")
    ids, mask = random_batch([4, 12], cfg["vocab_size"], seed=9)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    monkeypatch.setenv("NOMIC_MOE_KERNEL_CACHE", str(tmp_path / "empty-cache"))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    small_gemm._load.cache_clear()
    try:
        assert small_gemm.load() is None and "no C compiler" in small_gemm.why_unavailable()
        assert use_cpu_kernels(model) == "few-row kernel off: no C compiler (set CC, or install gcc or clang)"
        monkeypatch.setenv("NOMIC_MOE_SMALL_GEMM", "0")
        small_gemm._load.cache_clear()
        assert small_gemm.load() is None and "NOMIC_MOE_SMALL_GEMM=0" in small_gemm.why_unavailable()
        assert all(m.cpu_kernel is None for m in model.modules() if isinstance(m, NomicMoELinear))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, ref)
    finally:
        small_gemm._load.cache_clear()


def test_build_is_cached_and_atomic(kernel, monkeypatch, tmp_path):
    """A fresh cache folder gets one library and no temporary leftovers; a second build finds it."""
    monkeypatch.setenv("NOMIC_MOE_KERNEL_CACHE", str(tmp_path))
    first = small_gemm.build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert small_gemm.build() == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    lib = small_gemm.SmallGemm(first)
    w, x = torch.randn(40, 24), torch.randn(3, 24)
    assert (lib.linear(x, lib.pack(w)) - F.linear(x, w)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("rows,k,n", [(1, 96, 64), (8, 768, 160), (9, 64, 100), (31, 200, 33), (0, 64, 32), (128, 96, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_product_has_the_per_token_sums(kernel, rows, k, n, with_bias):
    """The same s8 numbers, s32 sums and float epilogue as int8_matmul_per_token (torch._int_mm): equal."""
    from nomic_moe_modeling.int8_nomic_moe import int8_matmul_per_token, quantize_weight

    if not kernel.int8:
        pytest.skip("this CPU has no AVX512_VNNI: int8 stays with torch's kernels, and the kernel says so (accepts)")
    g = torch.Generator().manual_seed(rows + k + n)
    q = quantize_weight(torch.randn(n, k, generator=g) * k**-0.5)
    wq, scale = q.int_repr().contiguous(), q.q_per_channel_scales().float()
    b = torch.randn(n, generator=g) if with_bias else None
    x = torch.randn(rows, k, generator=g) * 3
    x[:, 0] = 0.0 if rows < 2 else x[:, 0]  # a row may hold exact zeros; an all-zero row gets the 1e-12 scale floor
    got = kernel.linear_int8(x, kernel.pack_int8(wq, scale), b)
    ref = int8_matmul_per_token(x, wq, scale, b)
    assert got.shape == ref.shape == (rows, n)
    if rows:
        assert torch.equal(got, ref)
        zero = kernel.linear_int8(torch.zeros(2, k), kernel.pack_int8(wq, scale), b)
        assert torch.equal(zero, int8_matmul_per_token(torch.zeros(2, k), wq, scale, b))


class WithoutGeluFusion:
    """The kernel as it is, except that its int8 calls are not asked to take the GELU themselves."""

    fuses_gelu_int8 = False

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_int8_model_takes_the_kernel_and_keeps_its_numbers(kernel, ckpts):
    """quantize_int8 hands the model's kernel to the int8 matrices it makes; per_token activations
    through the kernel give the vectors of torch._int_mm's path, exactly (a last-bit difference would
    be amplified by the next layer's int8 rounding) with F.gelu between the products, and within int8's
    own noise with the GELU inside the down products' calls."""
    from nomic_moe_inference.loading import int8_activations
    from nomic_moe_modeling.int8_nomic_moe import Int8Experts, Int8Linear
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

    if not kernel.int8:
        pytest.skip("this CPU has no AVX512_VNNI")
    folder = ckpts.converted(num_experts=4, top_k=2, num_layers=4)
    model = NomicMoEModel.from_pretrained(folder).eval()
    model.set_cpu_kernel(kernel)
    assert int8_activations(model) == "per_token"
    model.quantize_int8(activations="per_token")
    int8s = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert int8s and all(m.cpu_kernel is kernel for m in int8s)
    ids, mask = random_batch([7, 19, 3], model.config.vocab_size, seed=4)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
        model.set_cpu_kernel(WithoutGeluFusion(kernel))
        fast = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
        in_experts = {id(m) for ex in model.modules() if isinstance(ex, Int8Experts) for m in (*ex.ups, *ex.downs)}
        # every attention and dense product took the kernel at these sizes, and so did every expert that was chosen
        assert all(m._kernel_pack.value is not None for m in int8s if id(m) not in in_experts)
        assert sum(m._kernel_pack.value is not None for m in int8s if id(m) in in_experts) > len(in_experts) // 2
        model.set_cpu_kernel(None)
        for m in model.modules():  # the products are under test: both runs keep the kernel's attention
            if isinstance(m, NomicMoEAttention):
                m.cpu_kernel = kernel
        slow = model(input_ids=ids, attention_mask=mask, return_sentence_embedding=True).sentence_embedding
    assert torch.equal(fast, slow)
    assert F.cosine_similarity(fused, slow).min() > 0.99999
    plain = NomicMoEModel.from_pretrained(folder).eval()
    assert int8_activations(plain) == "per_batch"  # no kernel: FBGEMM's per-batch kernel stays the default


BOUNDS = [0, 3, 3, 20, 21, 29, 29]  # 6 experts: empty ones, one row, more rows than a tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_products_are_the_per_expert_products(kernel, dtype):
    """One call for a layer's experts gives each segment the sums of its own call, bit for bit."""
    if dtype not in kernel.dtypes():
        pytest.skip("this CPU has no AVX512_BF16")
    g = torch.Generator().manual_seed(11)
    k, n, E = 64, 100, len(BOUNDS) - 1  # n: a ragged last panel
    packs = [kernel.pack((torch.randn(n, k, generator=g) * k**-0.5).to(dtype)) for _ in range(E)]
    xs = torch.randn(BOUNDS[-1], k, generator=g).to(dtype)
    got = kernel.linear_grouped(xs, BOUNDS, packs)
    assert got.shape == (BOUNDS[-1], n) and got.dtype == dtype
    for e in range(E):
        lo, hi = BOUNDS[e], BOUNDS[e + 1]
        assert torch.equal(got[lo:hi], kernel.linear(xs[lo:hi], packs[e]))
    assert kernel.linear_grouped(xs[:0], [0] * (E + 1), packs).shape == (0, n)
    for bad in ([0, 3, 2, 20, 21, 29, 29], [0, 3, 3, 20, 21, 29], [1, 3, 3, 20, 21, 29, 29]):
        with pytest.raises(ValueError, match="do not split"):
            kernel.linear_grouped(xs, bad, packs)
    with pytest.raises(ValueError, match="one shape"):
        kernel.linear_grouped(xs, [0, 10, 29], [packs[0], kernel.pack(torch.randn(n + 1, k).to(dtype))])
    group = kernel.group(packs)  # the addresses gathered once: the same call, the same bits
    assert len(group) == E and group[2] is packs[2] and list(group) == packs
    assert torch.equal(kernel.linear_grouped(xs, BOUNDS, group), got)
    with pytest.raises(ValueError, match="do not split"):
        kernel.linear_grouped(xs, BOUNDS[:-1], group)
    with pytest.raises(ValueError, match="PackedInt8"):
        kernel.linear_int8_grouped(xs.float(), BOUNDS, group)  # a float group on the int8 call


@pytest.mark.parametrize("build,dtype", [("native", torch.float32), ("native", torch.bfloat16), ("avx2", torch.float32)])
def test_grouped_products_take_the_gelu_as_they_write(request, build, dtype):
    """gelu=True (an MLP's up product in the encoder-layers call): F.gelu of the products' outputs,
    within gelu_ps's 1.5e-6 in fp32; in bf16 F.gelu of the fp32 sum, rounded once (within one bf16
    step of F.gelu of fp32 products of the same numbers)."""
    kernel = request.getfixturevalue("kernel" if build == "native" else "avx2_kernel")
    if dtype not in kernel.dtypes():
        pytest.skip("this CPU has no AVX512_BF16")
    if not kernel.fuses_gelu_float:
        with pytest.raises(ValueError, match="AVX-512 or AVX2"):
            kernel.linear_grouped(torch.randn(4, 8), [0, 4], [kernel.pack(torch.randn(8, 8))], gelu=True)
        return
    g = torch.Generator().manual_seed(12)
    k, n, E = 64, 100, len(BOUNDS) - 1
    ws = [(torch.randn(n, k, generator=g) * 2 * k**-0.5).to(dtype) for _ in range(E)]
    xs = torch.randn(BOUNDS[-1], k, generator=g).to(dtype)
    got = kernel.linear_grouped(xs, BOUNDS, [kernel.pack(w) for w in ws], gelu=True).float()
    want = torch.cat([F.gelu(F.linear(xs[lo:hi].float(), w.float())) for lo, hi, w in zip(BOUNDS[:-1], BOUNDS[1:], ws)])
    if dtype == torch.float32:  # against F.gelu of the same sums
        plain = F.gelu(kernel.linear_grouped(xs, BOUNDS, [kernel.pack(w) for w in ws]))
        assert (got - plain).abs().max().item() <= 2e-6 and (got - want).abs().max().item() <= 1e-5
    else:
        assert ((got - want).abs() <= want.abs() * 2**-7 + 1e-6).all()


def test_int8_gelu_is_torchs_gelu(kernel):
    """The GELU the int8 calls take on the way in (gelu=True) against F.gelu, over the range a hidden
    activation takes and past it, and the products with it against F.gelu then the product."""
    from nomic_moe_modeling.int8_nomic_moe import int8_matmul_per_token, quantize_weight

    if not kernel.int8:
        pytest.skip("this CPU has no AVX512_VNNI")
    x = torch.cat([torch.linspace(-12, 12, 240_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 100.0, -100.0])])
    err = (kernel.gelu(x) - F.gelu(x)).abs()
    assert err.max() < 1.5e-6
    pos = x > 0
    assert (err[pos] / F.gelu(x[pos])).max() < 1e-6
    assert kernel.gelu(x[:7]).shape == (7,)  # a length that is not a multiple of 16
    with pytest.raises(ValueError, match="fp32"):
        kernel.gelu(x.double())
    g = torch.Generator().manual_seed(13)
    k, n = 100, 40  # k not a multiple of 16: the masked tail
    q = quantize_weight(torch.randn(n, k, generator=g) * k**-0.5)
    wq, s = q.int_repr().contiguous(), q.q_per_channel_scales().float()
    xs = torch.randn(BOUNDS[-1], k, generator=g) * 3
    bias = torch.randn(n, generator=g)
    packed = kernel.pack_int8(wq, s)
    want = int8_matmul_per_token(F.gelu(xs), wq, s, bias)
    got = kernel.linear_int8(xs, packed, bias, gelu=True)
    # the same s8 numbers unless an input lay within 1.5e-6 of a half step: then one step, one weight's worth
    assert (got == want).float().mean() > 0.99 and (got - want).abs().max() < 0.05
    grouped = kernel.linear_int8_grouped(xs, BOUNDS, [packed] * (len(BOUNDS) - 1), gelu=True)
    assert torch.equal(grouped, kernel.linear_int8(xs, packed, None, gelu=True))  # one row at a time either way


def test_int8_grouped_products_are_the_per_token_products(kernel):
    from nomic_moe_modeling.int8_nomic_moe import int8_matmul_per_token, quantize_weight

    if not kernel.int8:
        pytest.skip("this CPU has no AVX512_VNNI")
    g = torch.Generator().manual_seed(12)
    k, n, E = 96, 40, len(BOUNDS) - 1
    qs = [quantize_weight(torch.randn(n, k, generator=g) * k**-0.5) for _ in range(E)]
    ws = [(q.int_repr().contiguous(), q.q_per_channel_scales().float()) for q in qs]
    xs = torch.randn(BOUNDS[-1], k, generator=g) * 3
    packs = [kernel.pack_int8(wq, s) for wq, s in ws]
    got = kernel.linear_int8_grouped(xs, BOUNDS, packs)
    for e in range(E):
        lo, hi = BOUNDS[e], BOUNDS[e + 1]
        if hi > lo:
            assert torch.equal(got[lo:hi], int8_matmul_per_token(xs[lo:hi], *ws[e], None))
    assert torch.equal(kernel.linear_int8_grouped(xs, BOUNDS, kernel.group(packs)), got)
    with pytest.raises(ValueError, match="one shape"):
        kernel.group([packs[0], kernel.pack(torch.randn(n, k))])  # int8 and fp32 packs do not mix


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_model_gives_the_same_vectors_grouped_or_per_expert(kernel, models, dtype):
    model, _, cfg = models("8x2")
    model = copy.deepcopy(model)
    if dtype == "int8":
        if not kernel.int8:
            pytest.skip("this CPU has no AVX512_VNNI")
        model.set_cpu_kernel(kernel)
        model.quantize_int8(activations="per_token")
        grouped, per_expert = Int8Grouped(kernel), Int8PerExpert(kernel)
    else:
        grouped, per_expert = CountingGrouped(kernel), Counting(kernel)
    ids, mask = random_batch([5, 17, 3, 9], cfg["vocab_size"], seed=8)
    out = {}
    for spy in (grouped, per_expert):
        model.set_cpu_kernel(spy)
        with torch.no_grad():
            out[type(spy).__name__] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert grouped.grouped > 0  # the layers' experts took the grouped call, and the vectors did not move
    assert torch.equal(*out.values())


def test_int8_expert_groups_are_made_once_per_kernel(kernel, models):
    """The grouped calls' copies (the kernel's Groups) are made at the first forward pass, kept for the
    next ones, and dropped when the model is given another kernel."""
    from nomic_moe_kernels.small_gemm import Group

    if not kernel.int8:
        pytest.skip("this CPU has no AVX512_VNNI")
    model, _, cfg = models("8x2")
    model = copy.deepcopy(model)
    model.set_cpu_kernel(kernel)
    model.quantize_int8(activations="per_token")
    experts = [layer.mlp.experts.int8 for layer in model.encoder.layers if layer.is_moe]
    ids, mask = random_batch([5, 17, 3, 9], cfg["vocab_size"], seed=8)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        made = [ex._groups.value for ex in experts]
        assert all(m is not None and m[0] is kernel and isinstance(m[1], Group) and isinstance(m[2], Group) for m in made)
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, first)
        assert all(ex._groups.value is m for ex, m in zip(experts, made))  # kept, not rebuilt
        spy = Int8Grouped(kernel)  # no group(): lists
        model.set_cpu_kernel(spy)
        assert all(ex._groups.value is None for ex in experts)  # dropped with the old kernel
        model(input_ids=ids, attention_mask=mask)  # (the spy has no attention kernel: torch's, other last bits)
        assert spy.grouped > 0 and all(isinstance(ex._groups.value[1], list) for ex in experts)


class Int8Routed(Int8Grouped):
    routes = 0

    def moe_route(self, x, experts, num_experts):
        self.routes += 1
        return self.inner.moe_route(x, experts, num_experts)

    def moe_combine(self, ys, order, weights, bias=None):
        return self.inner.moe_combine(ys, order, weights, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_kernel_routing_is_the_routers_sort_and_combine(kernel, dtype, top_k):
    """moe_route and moe_combine against the operators they replace: the router's sort, the gather of
    dispatch_sorted, combine + bias; equal, not close."""
    from nomic_moe_modeling.configuration_nomic_moe import NomicMoEConfig
    from nomic_moe_modeling.experts_nomic_moe import combine
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoERouter

    if dtype == torch.bfloat16 and not kernel.bf16:
        pytest.skip("this CPU has no AVX512_BF16")
    E, H, N = 6, 40, 23
    g = torch.Generator().manual_seed(top_k)
    router = NomicMoERouter(NomicMoEConfig(hidden_size=H, num_attention_heads=4, num_experts=E, num_experts_per_tok=top_k))
    with torch.no_grad():
        router.layer.weight.copy_(torch.randn(E, H, generator=g))
        router.layer.weight[5] = -100.0  # one expert nobody picks (x > 0 below): an empty segment
    x = (torch.randn(N, H, generator=g).abs() + 0.1).to(dtype)
    sorted_ = router(x)
    plain = router(x, sort=False)
    assert plain.order is None
    xs, order, counts, bounds = kernel.moe_route(x, plain.experts, E)
    assert torch.equal(order, sorted_.order) and torch.equal(counts, sorted_.counts) and torch.equal(bounds, sorted_.offsets)
    assert counts[5] == 0 and torch.equal(xs, x[sorted_.sorted_tokens()])
    ys = torch.randn(N * top_k, H, generator=g).to(dtype)
    bias = torch.randn(H, generator=g).to(dtype)
    assert torch.equal(kernel.moe_combine(ys, order, plain.weights, bias), combine(ys, sorted_, N) + bias)
    assert torch.equal(kernel.moe_combine(ys, order, plain.weights), combine(ys, sorted_, N))
    with pytest.raises(ValueError, match="expert index outside"):
        kernel.moe_route(x, plain.experts + E, E)
    with pytest.raises(ValueError, match="moe_combine takes"):
        kernel.moe_combine(ys, order, plain.weights.float() if dtype == torch.bfloat16 else plain.weights.double())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_model_gives_the_same_vectors_when_the_kernel_routes(kernel, models, dtype):
    """The router leaves the pairs unsorted and the kernel orders, gathers and combines them: the same
    vectors and the same routing (order, counts, offsets: the server's expert metrics read counts)."""
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoESparseBlock

    model, _, cfg = models("8x2")
    model = copy.deepcopy(model)
    if dtype == "int8":
        if not kernel.int8:
            pytest.skip("this CPU has no AVX512_VNNI")
        model.set_cpu_kernel(kernel)
        model.quantize_int8(activations="per_token")
        routed, plain = Int8Routed(kernel), Int8Grouped(kernel)
    else:
        if dtype == "bfloat16":
            if not kernel.bf16:
                pytest.skip("this CPU has no AVX512_BF16")
            model = model.to(torch.bfloat16)
        routed, plain = Routed(kernel), CountingGrouped(kernel)
    routings = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: routings.setdefault(current, []).append(out[1]))
             for m in model.modules() if isinstance(m, NomicMoESparseBlock)]
    ids, mask = random_batch([5, 17, 3, 9], cfg["vocab_size"], seed=8)
    out = {}
    try:
        for current, spy in (("routed", routed), ("plain", plain)):
            model.set_cpu_kernel(spy)
            with torch.no_grad():
                out[current] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    assert routed.routes == len(hooks) > 0 and plain.grouped > 0
    assert torch.equal(out["routed"], out["plain"])
    for a, b in zip(routings["routed"], routings["plain"]):
        assert torch.equal(a.order, b.order) and torch.equal(a.counts, b.counts) and torch.equal(a.offsets, b.offsets)


def test_the_avx2_build_computes_the_same_products(avx2_kernel):
    """The kernel built for an AVX2-only CPU (8-float vectors, 6-row tiles, no bf16 or int8), run here."""
    avx2 = avx2_kernel
    assert avx2.width == 16 and avx2.dtypes() == (torch.float32,) and not avx2.accepts(4, torch.bfloat16)
    assert not avx2.accepts_attention(torch.bfloat16, 64) and avx2.accepts_attention(torch.float32, 64)
    g = torch.Generator().manual_seed(3)
    for rows, k, n in SHAPES:
        w, b, x = torch.randn(n, k, generator=g) * k**-0.5, torch.randn(n, generator=g), torch.randn(rows, k, generator=g)
        got = avx2.linear(x, avx2.pack(w), b)
        assert got.shape == (rows, n) and (rows == 0 or (got - F.linear(x, w, b)).abs().max().item() <= 1e-5)
    packs = [avx2.pack(torch.randn(50, 37, generator=g)) for _ in range(len(BOUNDS) - 1)]
    xs = torch.randn(BOUNDS[-1], 37, generator=g)
    grouped = avx2.linear_grouped(xs, BOUNDS, packs)
    for e, p in enumerate(packs):
        assert torch.equal(grouped[BOUNDS[e]:BOUNDS[e + 1]], avx2.linear(xs[BOUNDS[e]:BOUNDS[e + 1]], p))


def test_the_latency_floor_takes_the_fastest_gemm(kernel):
    """`bench --latency`'s floor: the fastest of the library's GEMM, oneDNN's packed product and this
    kernel's at the most rows it takes (on VNNI CPUs the kernel's int8 is faster, on AMD CPUs oneDNN's
    fp32; a floor must stay a lower bound)."""
    from nomic_moe_inference.latency import gemm_rate, gemm_rates
    from nomic_moe_modeling.experts_nomic_moe import packed_available

    rates = gemm_rates("int8", M=256, H=64, I=128)
    assert set(rates) == ({"library", "few-row kernel"} if kernel.int8 else {"library"})
    assert all(r > 0 for r in rates.values())
    rates = gemm_rates("float32", M=256, H=64, I=128)
    assert set(rates) == {"library", "few-row kernel"} | ({"oneDNN packed"} if packed_available() else set())
    assert all(r > 0 for r in rates.values())
    assert gemm_rate("float32", M=256, H=64, I=128) > 0
