"""ONNX export: validated files in both worlds, sparse graphs, the fused operator, the runtime encoder."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from nomic_moe_inference.encoder import Encoder  # noqa: E402
from nomic_moe_files.errors import UserError  # noqa: E402
from nomic_moe_conversion.onnx_export import FILES, export_onnx, graph_ops, optimum_available  # noqa: E402
from nomic_moe_inference.onnx_encoder import OnnxEncoder  # noqa: E402

SHAPE = dict(num_experts=4, top_k=2, num_layers=4)
TEXTS = ["What food did they eat?", "", "¡Hola!", "thunderstorms " * 300]


@pytest.fixture(scope="module")
def exported(ckpts, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(ckpts.converted(**SHAPE), folder)
    report = export_onnx(folder)
    return folder, report


def test_every_file_validated(exported):
    folder, report = exported
    assert report["exporter"] == ("optimum" if optimum_available() else "torch")
    for which, name in FILES.items():
        assert (folder / "onnx" / name).exists(), name
        r = report["files"][which]
        if which == "fp16" and r.get("ok") is None:
            assert "error" in r  # the CPU provider lacks an fp16 kernel: said, not hidden
            continue
        assert r["ok"] is True, r
    assert report["files"]["model"]["max_abs_last_hidden_state"] <= 1e-4
    assert report["files"]["fused"]["min_cosine_sentence_embedding"] >= 0.9999
    assert report["files"]["int8"]["min_cosine_sentence_embedding"] >= 0.999
    saved = json.loads((folder / "onnx" / "export_report.json").read_text())
    assert saved["files"]["model"]["ok"] is True


def test_graphs_are_sparse_and_fused(exported):
    folder, _ = exported
    n_moe = SHAPE["num_layers"] // 2
    exact = graph_ops(folder / "onnx" / FILES["model"])
    # one NonZero packs the real tokens; one per (MoE layer, expert) gathers each expert's own tokens
    assert exact.get("NonZero", 0) == 1 + n_moe * SHAPE["num_experts"]
    assert "com.microsoft.MoE" not in exact
    fused = graph_ops(folder / "onnx" / FILES["fused"])
    assert fused.get("com.microsoft.MoE") == n_moe
    assert fused.get("NonZero", 0) == 1


def test_onnx_encoder_matches_pytorch(exported):
    folder, _ = exported
    ref = Encoder(folder).encode(TEXTS, prompt="query").numpy()
    for name, bound in [("onnx/model.onnx", 0.99999), ("onnx/model_fused.onnx", 0.9999), ("onnx/model_qint8_avx512.onnx", 0.999)]:
        got = OnnxEncoder(folder, name, provider="cpu").encode(TEXTS, prompt="query")
        cos = (got * ref).sum(-1)
        assert got.shape == ref.shape and cos.min() >= bound, (name, cos)
    small = OnnxEncoder(folder, provider="cpu").encode(TEXTS, prompt="query", dim=32)
    assert small.shape == (4, 32) and np.allclose(np.linalg.norm(small, axis=1), 1, atol=1e-5)


def test_cuda_provider_refused_when_absent(exported):
    import onnxruntime as ort

    folder, _ = exported
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA; the refusal is for CPU-only installs")
    with pytest.raises(UserError, match="CUDAExecutionProvider is not available"):
        OnnxEncoder(folder, provider="cuda")


def test_failed_validation_writes_nothing(ckpts, tmp_path, monkeypatch):
    import nomic_moe_conversion.onnx_export as ox

    folder = tmp_path / "model"
    shutil.copytree(ckpts.converted(**SHAPE), folder)
    monkeypatch.setitem(ox.BOUNDS, "model", ("max_abs_last_hidden_state", 0.0))
    with pytest.raises(UserError, match="validation failed for model.onnx"):
        ox.export_onnx(folder, exporter="torch", variants=("model",))
    assert not (folder / "onnx").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".onnx.partial")]


def test_sentence_transformers_and_optimum_load_the_files(exported):
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx lives in the optimum world only")
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    folder, _ = exported
    ref = Encoder(folder).encode(TEXTS, prompt="document").numpy()
    for name in ["model.onnx", "model_qint8_avx512.onnx"]:  # sentence-transformers looks in onnx/ itself
        st = SentenceTransformer(str(folder), backend="onnx", trust_remote_code=True, model_kwargs={"file_name": name, "provider": "CPUExecutionProvider"})
        got = st.encode(TEXTS)  # the default prompt is "document"
        assert (got * ref).sum(-1).min() >= 0.999, name
    ort_model = ORTModelForFeatureExtraction.from_pretrained(
        str(folder), subfolder="onnx", file_name="model.onnx", provider="CPUExecutionProvider", trust_remote_code=True
    )
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    batch = tok(["search_document: hello"], return_tensors="pt")
    h = ort_model(**batch).last_hidden_state
    assert h.shape[-1] == 64


def test_cli_encode_with_onnx(exported):
    import subprocess
    import sys

    folder, _ = exported
    args = [sys.executable, "-m", "nomic_moe_cli", "encode", str(folder), "--prompt", "query", "first", "second"]
    torch_run = subprocess.run(args, capture_output=True, text=True)
    onnx_run = subprocess.run(args[:5] + ["--onnx", "model_qint8_avx512.onnx"] + args[5:], capture_output=True, text=True)
    assert torch_run.returncode == 0 and onnx_run.returncode == 0, onnx_run.stderr
    assert "ONNX Runtime: onnx/model_qint8_avx512.onnx on CPUExecutionProvider" in onnx_run.stderr
    a = np.array([json.loads(line)["embedding"] for line in torch_run.stdout.splitlines()])
    b = np.array([json.loads(line)["embedding"] for line in onnx_run.stdout.splitlines()])
    assert (a * b).sum(-1).min() >= 0.999
