"""The converter: checks before writing, atomic output, bit-identical weights, clear refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nomic_moe_conversion.convert import convert
from nomic_moe_files.errors import UserError
from nomic_moe_conversion.synthetic import make_published_checkpoint

SHAPE = dict(num_experts=4, top_k=2, num_layers=2)


def _copy_source(ckpts, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "src"
    shutil.copytree(ckpts.source(**SHAPE), dst)
    return dst


def _no_leftovers(parent: Path, name: str):
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_weights_are_bit_identical_and_folder_complete(ckpts):
    src, out = ckpts.source(**SHAPE), ckpts.converted(**SHAPE)
    before = load_file(str(src / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()  # one tensor layout for both config layouts: the published names and shapes
    for key, t in before.items():
        assert after[key].shape == t.shape and torch.equal(after[key], t), key
    for f in ["config.json", "configuration_nomic_moe.py", "modeling_nomic_moe.py", "tokenizer.json", "modules.json",
              "sentence_bert_config.json", "config_sentence_transformers.json", "1_Pooling/config.json"]:
        assert (out / f).exists(), f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nomic_moe"
    assert cfg["auto_map"]["AutoModel"] == "modeling_nomic_moe.NomicMoEModel"
    st = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st["prompts"]["query"] == "search_query: " and st["prompts"]["document"] == "search_document: "
    assert st["default_prompt_name"] == "document"
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 512
    assert json.loads((out / "1_Pooling/config.json").read_text())["include_prompt"] is True


def test_dtype_cast_and_reconvert_from_our_format(ckpts, tmp_path):
    out = convert(str(ckpts.converted(**SHAPE)), str(tmp_path / "bf16"), dtype="bfloat16")
    w = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def _mutate(src: Path, fn):
    w = load_file(str(src / "model.safetensors"))
    fn(w)
    save_file(w, str(src / "model.safetensors"))


@pytest.mark.parametrize(
    "mutation,match",
    [
        (lambda w: w.pop("encoder.layers.1.mlp.experts.bias"), r"1 missing: encoder\.layers\.1\.mlp\.experts\.bias"),
        (lambda w: w.update({"encoder.layers.0.attn.extra": torch.zeros(2)}), r"1 unexpected: encoder\.layers\.0\.attn\.extra"),
        (lambda w: w.update({"encoder.layers.1.mlp.experts.mlp.w2": torch.zeros(7, 64)}), r"wrong shape: encoder\.layers\.1\.mlp\.experts\.mlp\.w2: \(7, 64\)"),
    ],
)
def test_bad_checkpoint_is_refused_before_writing(ckpts, tmp_path, mutation, match):
    src = _copy_source(ckpts, tmp_path)
    _mutate(src, mutation)
    with pytest.raises(UserError, match=match):
        convert(str(src), str(tmp_path / "out"))
    _no_leftovers(tmp_path, "out")


def test_pickle_checkpoint_is_refused(ckpts, tmp_path):
    src = _copy_source(ckpts, tmp_path)
    os.remove(src / "model.safetensors")
    (src / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(UserError, match="pickle weights .*pytorch_model.bin.* never loaded"):
        convert(str(src), str(tmp_path / "out"))
    _no_leftovers(tmp_path, "out")


def test_unknown_layout_is_refused(ckpts, tmp_path):
    src = _copy_source(ckpts, tmp_path)
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(UserError, match="unknown checkpoint layout"):
        convert(str(src), str(tmp_path / "out"))


def test_unsupported_setting_is_refused(ckpts, tmp_path):
    src = _copy_source(ckpts, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["prenorm"] = True
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="prenorm=True"):
        convert(str(src), str(tmp_path / "out"))


def test_existing_output_needs_force_and_is_replaced_atomically(ckpts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert(str(ckpts.source(**SHAPE)), str(out))
    assert (out / "keep.txt").read_text() == "mine"
    convert(str(ckpts.source(**SHAPE)), str(out), force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_verification_leaves_nothing(ckpts, tmp_path, monkeypatch):
    import nomic_moe_conversion.convert as conv

    monkeypatch.setattr(conv, "VERIFY_ATOL", 0.0)  # any rounding difference now counts as failure
    monkeypatch.setattr(conv, "VERIFY_TEXTS", ["search_query: a b c d e f g h i j k l m n o p"])
    with pytest.raises(UserError, match="verification failed"):
        conv.convert(str(ckpts.source(**SHAPE)), str(tmp_path / "out"))
    _no_leftovers(tmp_path, "out")


def test_missing_tokenizer_is_refused(tmp_path):
    src = make_published_checkpoint(tmp_path / "src", tokenizer=False, **SHAPE)
    with pytest.raises(UserError, match="no tokenizer files"):
        convert(str(src), str(tmp_path / "out"))
    _no_leftovers(tmp_path, "out")


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "nomic_moe_cli", *args], capture_output=True, text=True, env=env)


def test_cli_errors_are_one_line_plus_fix(tmp_path):
    r = _cli("convert", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "fix:" in r.stderr and "Traceback" not in r.stderr


def test_cli_encode_prints_json_lines_and_similarity(ckpts):
    out = ckpts.converted(**SHAPE)
    r = _cli("encode", str(out), "--prompt", "query", "--dim", "32", "first text", "second text")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["first text", "second text"]
    for row in rows:
        v = torch.tensor(row["embedding"])
        assert v.shape == (32,) and abs(v.norm().item() - 1) < 1e-4
    assert "cosine similarity" in r.stderr
    bad = _cli("encode", str(out), "--prompt", "nonsense", "x")
    assert bad.returncode == 2 and "unknown prompt" in bad.stderr


def _fake_hub_cache(home: Path, repo: str, folder: Path):
    """Lays ``folder`` out as a downloaded snapshot of ``repo`` in a Hub cache under ``home``."""
    import shutil

    base = home / "hub" / ("models--" + repo.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, base / "snapshots" / sha)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)


def test_load_by_repo_id_from_local_hub_cache_offline(ckpts, tmp_path):
    """A fresh process with HF_HUB_OFFLINE=1 loads by repo id, and convert resolves a repo id too."""
    home = tmp_path / "hf"
    _fake_hub_cache(home, "someorg/tiny-moe", ckpts.converted(**SHAPE))
    _fake_hub_cache(home, "someorg/tiny-moe-published", ckpts.source(**SHAPE))
    env = dict(os.environ, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    code = (
        "import torch\n"
        "from transformers import AutoModel, AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained('someorg/tiny-moe', trust_remote_code=True)\n"
        "m = AutoModel.from_pretrained('someorg/tiny-moe', trust_remote_code=True).eval()\n"
        "b = tok(['search_query: hello'], return_tensors='pt')\n"
        "print(type(m).__name__, m(**b).last_hidden_state.shape[-1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["NomicMoEModel", "64"]
    r = _cli("convert", "someorg/tiny-moe-published", str(tmp_path / "out"), env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    r = _cli("convert", "someorg/not-cached", str(tmp_path / "out2"), env=env)
    assert r.returncode == 2 and "local cache" in r.stderr
