"""The release: one command to a verified Hub-ready folder whose model card's snippets all run."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("sentence_transformers")

from nomic_moe_card.render import count_parameters, python_snippets  # noqa: E402
from nomic_moe_files.errors import UserError  # noqa: E402
from nomic_moe_conversion.release import push_token  # noqa: E402
from nomic_moe_conversion.synthetic import published_config, real_size_shape  # noqa: E402
from test_convert import _fake_hub_cache  # noqa: E402

from conftest import RELEASE_REPO as REPO, RELEASE_SHAPE as SHAPE  # noqa: E402


@pytest.fixture(scope="module")
def released(released_both):
    return released_both["main"]


def test_release_folder_is_complete_and_verified(released):
    for f in ["README.md", "verification.json", "config.json", "model.safetensors", "modeling_nomic_moe.py",
              "onnx/model.onnx", "onnx/model_fused.onnx", "onnx/model_fp16.onnx", "onnx/model_qint8_avx512.onnx",
              "modules.json", "tokenizer.json"]:
        assert (released / f).exists(), f
    report = json.loads((released / "verification.json").read_text())
    assert report["ok"] and all(r["ok"] for r in report["paths"])
    names = " ".join(r["path"] for r in report["paths"])
    for path in ["AutoModel float32", "AutoModel bfloat16", "AutoModel float16", "batch invariance", "sentence-transformers", "model.onnx", "model_qint8"]:
        assert path in names, path


def test_card_is_rendered_from_measurements(released):
    card = (released / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n")
    assert "Synthetic weights" in card and REPO in card and "$" + "{" not in card
    total, active = count_parameters(released)
    assert f"{total:,}" in card and f"{active:,}" in card
    assert "| search_query" not in card or "`search_query: `" in card
    assert "52.86" in card  # the paper's table, cited as the paper's
    assert "real tokens/s" in card and "CPU" in card  # the speed section, taken from benchmarks/RESULTS.md


def test_parameter_count_of_the_published_shape():
    """The card's arithmetic on the real shape: 475,292,928 total, 305,423,616 active (SPEC §1)."""
    import torch
    from nomic_moe_conversion.layout import our_config_kwargs, published_shapes

    kw = our_config_kwargs(published_config(**real_size_shape()))
    shapes = published_shapes(kw)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    experts = sum(torch.Size(s).numel() for k, s in shapes.items() if "experts.mlp.w" in k)
    assert total == 475_292_928 and total - experts * 6 // 8 == 305_423_616


def test_every_card_snippet_runs_offline_from_the_hub_cache(released, tmp_path):
    home = tmp_path / "hf"
    _fake_hub_cache(home, REPO, released)
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    snippets = python_snippets((released / "README.md").read_text())
    assert len(snippets) >= 4
    ran = 0
    for requirement, code in snippets:
        if requirement:
            try:
                __import__(requirement)
            except ImportError:
                continue  # e.g. optimum.onnxruntime exists in the optimum world only, where this snippet runs
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, f"snippet failed:\n{code}\n{r.stderr[-3000:]}"
        ran += 1
    assert ran >= 3


def test_push_is_refused_offline_or_without_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        push_token()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(UserError, match="no Hugging Face token"):
        push_token()


def test_cli_dry_run_lists_files_and_push_refusal_comes_first(ckpts, tmp_path):
    src = str(ckpts.source(**SHAPE))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "release", src, str(tmp_path / "x"), "--push", "a/b"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "HF_HUB_OFFLINE" in r.stderr
    assert not (tmp_path / "x").exists()  # refused before any work
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "release", src, str(tmp_path / "y"), "--dry-run", "--synthetic"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "would upload to nomic-ai/nomic-embed-text-v2-moe (revision main)" in r.stdout and "onnx/model.onnx" in r.stdout
    assert r.stderr.strip().splitlines()[-1].startswith("release complete")


def test_both_layouts_share_the_weight_bytes_and_differ_in_config(released_both):
    main, pub = released_both["main"], released_both["published"]
    assert released_both["out"].is_dir() and sorted(p.name for p in released_both["out"].iterdir()) == ["main", "nomic-bert"]
    for name in ("model.safetensors", "onnx/model.onnx", "tokenizer.json", "modeling_nomic_moe.py"):
        assert (main / name).read_bytes() == (pub / name).read_bytes(), name
        assert (main / name).stat().st_ino == (pub / name).stat().st_ino, f"{name} is one file on disk (hard link)"
    assert json.loads((main / "config.json").read_text())["model_type"] == "nomic_moe"
    assert json.loads((pub / "config.json").read_text())["model_type"] == "nomic_bert"
    report = json.loads((pub / "verification.json").read_text())
    assert any(r["path"].startswith("published layout") and r["ok"] for r in report["paths"])
    for card in (main / "README.md", pub / "README.md"):
        text = card.read_text()
        assert "--revision nomic-bert" in text and "trust_remote_code=True" in text and "cosine 0.18" in text
