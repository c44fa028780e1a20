"""The CPU table: ISA detection, what `auto` picks for each simulated ISA, the bf16 warning, doctor --cpu."""

import json
import subprocess
import sys
import warnings

import pytest
import torch

import nomic_moe_modeling.cpu_nomic_moe as cpu_mod
from nomic_moe_files.errors import UserError
from nomic_moe_inference.cpu import describe, resolve_dtype, runnable_dtypes
from nomic_moe_modeling.cpu_nomic_moe import classify, int8_engine, why_no_int8

ALL_ENGINES = ["qnnpack", "onednn", "x86", "fbgemm"]

# isa -> (auto dtype, bf16 native, int8 kernel)
TABLE = {
    "avx2": (torch.float32, False, "fbgemm"),
    "avx512": (torch.float32, False, "fbgemm"),
    "avx512_bf16": (torch.bfloat16, True, "fbgemm"),
    "amx": (torch.bfloat16, True, "onednn"),
}


@pytest.mark.parametrize("isa", list(TABLE))
def test_table_for_each_simulated_isa(isa):
    dtype, native, kernel = TABLE[isa]
    assert resolve_dtype("auto", "cpu", isa=isa) == dtype
    assert resolve_dtype("fastest", "cpu", isa=isa) == dtype
    assert resolve_dtype("float32", "cpu", isa=isa) == torch.float32  # the floor, everywhere
    assert int8_engine(isa, ALL_ENGINES) == kernel
    d = describe(isa)
    assert (d["isa"], d["dtype"], d["bf16_native"], d["simulated"]) == (isa, str(dtype).replace("torch.", ""), native, True)
    assert runnable_dtypes(isa)[0] == "float32" and ("bfloat16" in runnable_dtypes(isa)) == native


@pytest.mark.parametrize("cap,flags,isa", [
    ("AVX2", {"avx2", "fma"}, "avx2"),
    ("AVX2", {"avx2", "avx_vnni"}, "avx2"),  # Alder Lake style: VNNI without AVX-512
    ("AVX512", {"avx512f", "avx512_vnni"}, "avx512"),
    ("AVX512", {"avx512f", "avx512_bf16", "avx512_vnni"}, "avx512_bf16"),  # Zen 4, Cooper Lake
    ("AVX512", {"avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "amx"),  # Sapphire Rapids
    ("AVX512", {"avx512f", "amx_tile"}, "avx512"),  # AMX tiles without the bf16 unit do not count
    ("DEFAULT", {"asimd"}, None),  # ARM
    ("NO AVX", set(), None),
])
def test_classify_from_capability_and_flags(cap, flags, isa):
    assert classify(cap, frozenset(flags)) == isa


def test_this_machine_is_classified():
    d = describe()
    assert d["simulated"] is False and d["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert d["isa"] in (*TABLE, "none (no AVX2)")


def test_bf16_warns_once_where_emulated(monkeypatch):
    monkeypatch.setattr(cpu_mod, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match=r"588 ms against 4.8 ms"):
        assert resolve_dtype("bfloat16", "cpu", isa="avx2") == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_dtype("bfloat16", "cpu", isa="avx2")  # once per process
        resolve_dtype("bfloat16", "cpu", isa="amx")  # native: no warning
        resolve_dtype("auto", "cpu", isa="avx2")  # auto never picks emulated bf16


def test_model_warns_for_emulated_bf16(ckpts, monkeypatch):
    from nomic_moe_modeling.modeling_nomic_moe import NomicMoEModel

    monkeypatch.setattr(cpu_mod, "_WARNED", set())
    monkeypatch.setattr(cpu_mod, "cpu_isa", lambda: "avx2")
    model = NomicMoEModel.from_pretrained(ckpts.converted(num_experts=4, top_k=2, num_layers=2), dtype=torch.bfloat16).eval()
    with pytest.warns(RuntimeWarning, match="emulated and very slow"), torch.no_grad():
        model(input_ids=torch.randint(3, 400, (1, 8)))


def test_int8_refused_where_no_kernel():
    assert why_no_int8("amx", ["qnnpack"]) and "no x86 int8 kernel" in why_no_int8("amx", ["qnnpack"])
    assert int8_engine("amx", ["fbgemm"]) == "fbgemm"  # the table's engine missing: another x86 one
    with pytest.raises(UserError, match="not on cuda"):
        resolve_dtype("int8", "cuda")
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("int4", "cpu")
    with pytest.raises(UserError, match="--cpu"):
        resolve_dtype("auto", "cpu", isa="sse2")


def test_int8_refused_on_a_cpu_without_avx2(monkeypatch):
    monkeypatch.setattr(cpu_mod, "cpu_isa", lambda: None)
    with pytest.raises(UserError, match="AVX2"):
        resolve_dtype("int8", "cpu")
    assert "int8" not in runnable_dtypes()


def test_doctor_cpu_flag():
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", "--cpu", "avx2", "--dtype", "bfloat16", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["cpu"]["isa"] == "avx2" and out["cpu"]["dtype"] == "float32" and out["cpu"]["int8_kernel"] == "fbgemm"
    assert any("588 ms" in n for n in out["notes"])
    fk = out["cpu"]["few_row_kernel"]  # the AVX2 build's kernel: fp32 products, attention, the one call
    assert fk["simulated"] and fk["dtypes"] == ["float32"] and fk["attention"] and fk["layers_in_one_call"]
    # the fp32 packing rule follows this machine's vendor and BLAS, whatever ISA is simulated
    assert out["cpu"]["fp32_packed_at_any_size"] is cpu_mod.library_fp32_gemm_slow()
    for args, dtype in ((["--cpu", "avx2"], "float32"), (["--cpu", "avx512_bf16"], "bfloat16"), (["--capability", "7.5"], "float16")):
        r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", *args, "--json"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and json.loads(r.stdout)["dtype"] == dtype  # no --dtype: what auto loads there
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "doctor", "--cpu", "amx"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "auto dtype bfloat16" in r.stdout and "int8 kernel onednn" in r.stdout
    assert "-march=sapphirerapids) on for float32, bfloat16, int8 products" in r.stdout
    assert ("fp32 products packed for oneDNN at every size" in r.stdout) is cpu_mod.library_fp32_gemm_slow()


@pytest.mark.parametrize("isa", cpu_mod.ISAS)
def test_the_kernel_table_is_what_each_build_has(isa, tmp_path, monkeypatch):
    """small_gemm.BUILDS (what doctor --cpu shows) against the library built for that ISA's -march:
    its exported calls, read without running its code (this CPU may lack the ISA), and where this CPU
    runs it (AVX2 here, and this CPU's own ISA) the kernel's own answers."""
    import ctypes

    from nomic_moe_kernels import small_gemm
    from nomic_moe_modeling.cpu_nomic_moe import cpu_isa

    if small_gemm.compiler() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("NOMIC_MOE_KERNEL_CACHE", str(tmp_path))
    march, dtypes = small_gemm.BUILDS[isa]
    path = small_gemm.build(march=march)
    lib = ctypes.CDLL(str(path))  # loading runs none of the kernel's code
    exported = {name: hasattr(lib, name) for name in ("nm_grouped_bf16", "nm_grouped_s8", "nm_encoder_layers")}
    assert exported == {"nm_grouped_bf16": "bfloat16" in dtypes, "nm_grouped_s8": "int8" in dtypes, "nm_encoder_layers": True}
    runs_here = isa == "avx2" or cpu_isa() == isa
    if runs_here and "avx2" in cpu_mod.cpu_flags():
        k = small_gemm.SmallGemm(path)
        assert [str(d).replace("torch.", "") for d in k.dtypes()] == list(dtypes)
        assert k.attention_ok and k.layers is not None
