"""GPU paths without a GPU: the dispatch per compute capability and dtype, the kernels compiled for each
architecture, the first-use fallback, and `nomic-moe doctor`."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import nomic_moe_modeling.experts_nomic_moe as ex
import nomic_moe_modeling.modeling_nomic_moe as mm
from nomic_moe_modeling.experts_nomic_moe import Target, auto_candidates
from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel, attention_candidates

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
NO_FLASH = {"flash_attn": False, "torch_varlen": True}
WITH_FLASH = {"flash_attn": True, "torch_varlen": True}


@pytest.mark.parametrize(
    "cap,dtype,packages,triton,attention,experts",
    [
        ((7, 5), F16, NO_FLASH, True, "sdpa_padded", "sorted"),  # T4: no FlashAttention, no mma in Triton
        ((7, 5), BF16, NO_FLASH, True, "sdpa_padded", "sorted"),
        ((7, 5), F16, WITH_FLASH, True, "sdpa_padded", "sorted"),  # flash-attn installed still cannot run on sm_75
        ((8, 0), F16, NO_FLASH, True, "torch_varlen", "triton"),
        ((8, 0), BF16, WITH_FLASH, True, "flash_attn_varlen", "triton"),
        ((8, 6), BF16, NO_FLASH, True, "torch_varlen", "triton"),
        ((8, 9), F16, NO_FLASH, True, "torch_varlen", "triton"),
        ((9, 0), BF16, NO_FLASH, True, "torch_varlen", "triton"),
        ((9, 0), BF16, NO_FLASH, False, "torch_varlen", "grouped_mm"),  # no triton: the other no-sync path
        ((8, 0), BF16, NO_FLASH, False, "torch_varlen", "sorted"),
        ((9, 0), F32, NO_FLASH, True, "sdpa_padded", "sorted"),
        ((9, 0), BF16, {"flash_attn": False, "torch_varlen": False}, True, "sdpa_padded", "triton"),
    ],
)
def test_dispatch_per_capability_and_dtype(cap, dtype, packages, triton, attention, experts):
    target = Target("cuda", cap, dtype)
    assert attention_candidates(target, 64, "sdpa", packages=packages)[0][0] == attention
    plan = auto_candidates(target, training=False, triton_present=triton)
    assert plan[0][0] == experts and plan[-1][0] == "sorted"  # every plan ends on the floor


def test_dispatch_on_cpu_training_and_explicit_requests():
    assert attention_candidates(Target("cpu", None, F32), 64, "sdpa")[0][0] == "sdpa_per_text"
    assert auto_candidates(Target("cpu", None, BF16), training=False)[0][0] == "sorted"
    assert [n for n, _ in auto_candidates(Target("cuda", (9, 0), BF16), training=True, triton_present=True)] == ["grouped_mm", "sorted"]
    assert attention_candidates(Target("cuda", (7, 5), F16), 64, "eager")[0][0] == "eager_padded"
    with pytest.raises(ValueError, match="sm_80"):
        attention_candidates(Target("cuda", (7, 5), F16), 64, "flash_attention_2", packages=WITH_FLASH)
    with pytest.raises(ValueError, match="flash-attn"):
        attention_candidates(Target("cuda", (9, 0), F16), 64, "flash_attention_2", packages=NO_FLASH)


# ------------------------------------------------------------------------------------------------
# every kernel compiled for every architecture, on this CPU
# ------------------------------------------------------------------------------------------------

SHARED_LIMIT = {"sm_75": 64 << 10, "sm_80": 163 << 10, "sm_86": 99 << 10, "sm_89": 99 << 10, "sm_90": 227 << 10,
                "sm_100": 227 << 10, "sm_120": 99 << 10}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton", reason="triton is installed in the latest world only (the optimum world pins an older stack)")
    from nomic_moe_inference.kernel_compile import KNOWN_ARCHS, compile_in_subprocess

    rows = compile_in_subprocess(KNOWN_ARCHS, ["float16", "bfloat16"])
    rows += compile_in_subprocess([80, 90], ["float32"])  # an explicit moe_implementation="triton" in fp32
    return rows


def test_every_kernel_compiles_for_every_architecture(compiled):
    for r in compiled:
        newer = r["arch"] in ("sm_100", "sm_120")
        if not r["ok"]:
            # an architecture newer than the installed Triton knows may be refused; the ones we dispatch to may not
            assert newer and "arch" in r["error"].lower(), r
            continue
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
    archs = {r["arch"] for r in compiled if r["ok"]}
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= archs
    assert len(compiled) == 2 * 2 * 7 + 2 * 2


def test_tensor_cores_where_auto_uses_triton(compiled):
    """auto takes triton from sm_80 on, where its PTX uses mma/wgmma; on sm_75 it has none, hence cuBLAS there."""
    for r in compiled:
        if r["ok"] and r["dtype"] != "float32":
            assert r["tensor_cores"] == (r["arch"] != "sm_75"), r


# ------------------------------------------------------------------------------------------------
# first-use failures fall back, correctly, with one warning
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_model(ckpts):
    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=4, top_k=2, num_layers=2)).eval()
    ids = torch.randint(3, 200, (3, 17))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ex._BROKEN.clear()
    yield model, ids, mask, ref
    ex._BROKEN.clear()


def _failures():
    out = [("compile", RuntimeError("PTXAS error: Internal Triton PTX codegen error"))]
    try:
        from triton.runtime.errors import OutOfResources

        out.append(("launch", OutOfResources(262144, 232448, "shared memory")))
    except ImportError:
        pass
    out.append(("no C compiler", RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")))
    return out


@pytest.mark.parametrize("stage,error", _failures(), ids=[s for s, _ in _failures()])
def test_expert_kernel_failing_at_first_use_falls_back(small_model, monkeypatch, stage, error):
    model, ids, mask, ref = small_model

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(ex, "auto_candidates", lambda target, training, triton_present=None: [("triton", "test"), ("sorted", "floor")])
    monkeypatch.setitem(ex.BACKENDS, "triton", failing)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        first = model(input_ids=ids, attention_mask=mask).last_hidden_state
        second = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = [w for w in caught if "NomicMoE" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "'triton' expert kernel failed at first use" in str(ours[0].message) and "'sorted'" in str(ours[0].message)
    # ref ran the prepacked CPU path, the fallback runs the stored weights: the fp32 bar, 1e-5
    assert torch.allclose(first, ref, atol=1e-5) and torch.allclose(first, second, atol=1e-5)
    assert "last used: sorted" in repr(model)


def test_attention_kernel_failing_at_first_use_falls_back(small_model, monkeypatch):
    model, ids, mask, ref = small_model

    def failing(q, k, v, packing):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(mm, "attention_candidates", lambda *a, **k: [("torch_varlen", "test"), ("sdpa_per_text", "floor")])
    monkeypatch.setitem(mm.ATTENTION_KERNELS, "torch_varlen", failing)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = [model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(2)]
    ours = [w for w in caught if "NomicMoE" in str(w.message)]
    assert len(ours) == 1 and "'torch_varlen' attention kernel" in str(ours[0].message)
    assert torch.allclose(out[0], ref, atol=1e-6) and torch.equal(out[0], out[1])


def test_explicit_choice_still_raises(small_model, monkeypatch):
    model, ids, mask, _ = small_model

    def failing(*args, **kwargs):
        raise RuntimeError("PTXAS error")

    monkeypatch.setitem(ex.BACKENDS, "sorted", failing)
    model.set_moe_implementation("sorted")
    try:
        with pytest.raises(RuntimeError, match="PTXAS error"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        model.set_moe_implementation("auto")
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="flash"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        model.config._attn_implementation = "sdpa"


def test_t4_plan_computes_the_right_embeddings(small_model, monkeypatch):
    """The paths a T4 in fp16 gets (padded SDPA, cuBLAS-style sorted experts) give the reference output."""
    model, ids, mask, ref = small_model
    t4 = Target("cuda", (7, 5), F16)
    monkeypatch.setattr(ex.Target, "of", classmethod(lambda cls, device, dtype: t4))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    layer = model.encoder.layers[1]
    assert layer.attn.last_used == "sdpa_padded" and layer.mlp.experts.last_used == "sorted"
    assert torch.allclose(out, ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# nomic-moe doctor
# ------------------------------------------------------------------------------------------------


def _doctor(*args):
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", *args, "--json"], capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def test_doctor_on_a_simulated_t4_in_fp16():
    d = _doctor("--capability", "7.5", "--dtype", "float16", *(["--compile"] if _has_triton() else []))
    assert d["capability"] == "7.5" and d["dtype"] == "float16"
    assert "flash" not in d["attention"]["kernel"] and "varlen" not in d["attention"]["kernel"]
    assert d["experts"]["backend"] == "sorted" and "sm_75" in d["experts"]["why"]
    if _has_triton():
        assert [c["arch"] for c in d["compiled"]] == ["sm_75", "sm_75"] and all(c["ok"] for c in d["compiled"])


def test_doctor_on_a_simulated_h100_in_bf16():
    d = _doctor("--capability", "9.0", "--dtype", "bfloat16")
    assert d["attention"]["kernel"] in ("flash_attn_varlen", "torch_varlen")
    assert d["experts"]["backend"] in ("triton", "grouped_mm") and "no host sync" in d["experts"]["why"]


def test_doctor_refuses_nonsense_capability():
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", "--capability", "seven"], capture_output=True, text=True)
    assert r.returncode == 2 and "MAJOR.MINOR" in r.stderr


def _has_triton():
    import importlib.util

    return importlib.util.find_spec("triton") is not None
