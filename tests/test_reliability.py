"""Writers that race, files that are cut short, refusals that say what to do (files.publish, files.checks, the CLI)."""

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.publish import publishing

SHAPE = dict(num_experts=4, top_k=2, num_layers=2)


def _cli(*args, env=None, timeout=600):
    env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "nomic_moe_cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _leftovers(parent: Path, name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


# ------------------------------------------------------------------------------------------------
# publishing: two real processes racing for one folder
# ------------------------------------------------------------------------------------------------


def _publish_worker(out, force, tag, barrier, results):
    try:
        with publishing(Path(out), force) as tmp:
            (tmp / "who").write_text(tag)
            (tmp / "big").write_bytes(os.urandom(1 << 16))
            barrier.wait(timeout=600)  # both have built their folder; now both put it in place at once
        results.put((tag, "ok"))
    except UserError as e:
        results.put((tag, f"refused: {e.message}"))


@pytest.mark.parametrize("force", [False, True])
def test_two_processes_race_to_publish(tmp_path, force):
    ctx = mp.get_context("spawn")
    for attempt in range(3):
        out = tmp_path / f"out{attempt}"
        barrier, results = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_publish_worker, args=(str(out), force, tag, barrier, results)) for tag in "AB"]
        for p in procs:
            p.start()
        for p in procs:
            p.join(600)  # generous: spawned children import the package, slow on a loaded machine
        got = dict(results.get(timeout=60) for _ in procs)
        winners = [t for t, r in got.items() if r == "ok"]
        assert (out / "who").read_text() in winners
        assert sorted(p.name for p in out.iterdir()) == ["big", "who"]  # one whole folder, never a mix
        assert _leftovers(tmp_path, out.name) == []
        if force:
            assert sorted(winners) == ["A", "B"]  # both swap in; the last one stays
        else:
            assert len(winners) == 1, got  # the loser is refused and says why
            loser = next(r for t, r in got.items() if t not in winners)
            assert "appeared while this run was writing it" in loser


def test_two_converts_started_together(ckpts, tmp_path):
    """The issue's report: two `nomic-moe convert SRC OUT` at once both exited 0. Now one wins."""
    src, out = str(ckpts.source(**SHAPE)), str(tmp_path / "out")
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-m", "nomic_moe_cli", "convert", src, out], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [(p.wait(900), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 2], outs
    loser = next(err for code, err in outs if code == 2)
    assert "appeared while this run was writing it" in loser or "already exists" in loser
    assert "Traceback" not in loser
    assert (tmp_path / "out" / "model.safetensors").exists() and _leftovers(tmp_path, "out") == []


# ------------------------------------------------------------------------------------------------
# every input file: one clear line naming the file
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def source_copy(ckpts, tmp_path):
    dst = tmp_path / "src"
    shutil.copytree(ckpts.source(**SHAPE), dst)
    return dst


def _cut(path: Path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda p: _cut(p / "model.safetensors"), r"model\.safetensors: truncated: the header declares"),
        (lambda p: _cut(p / "model.safetensors", 0.00001), r"model\.safetensors: .*(too short|truncated|not a safetensors)"),
        (lambda p: (p / "model.safetensors").write_bytes(len(b"{not json, no}").to_bytes(8, "little") + b"{not json, no}"), r"corrupt safetensors header"),
        (lambda p: (p / "model.safetensors").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>" + b" " * 64), r"an HTML page"),
        (lambda p: (p / "model.safetensors").write_bytes(b"PK\x03\x04" + b"\x00" * 200), r"a zip archive"),
        (lambda p: (p / "config.json").write_text('{"model_type": "nomic_bert",}'), r"config\.json: not valid JSON \(line 1"),
        (lambda p: (p / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    ],
    ids=["half", "stub", "bad-header", "html", "zip", "json-syntax", "json-list"],
)
def test_convert_names_the_broken_file(source_copy, tmp_path, damage, message):
    damage(source_copy)
    r = _cli("convert", str(source_copy), str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert __import__("re").search(message, r.stderr), r.stderr
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path, "out") == []


def test_model_folder_checks(ckpts, tmp_path):
    good = ckpts.converted(**SHAPE)
    folder = tmp_path / "m"
    shutil.copytree(good, folder)
    checks.model_folder(folder)  # the good one passes
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["hidden_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"config\.json: missing key\(s\) hidden_size"):
        checks.model_folder(folder)
    shutil.copy(good / "config.json", folder / "config.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    with pytest.raises(UserError, match=r"tokenizer\.json: not a loadable tokenizer"):
        checks.model_folder(folder)
    cfg["model_type"] = "bert"
    (folder / "config.json").write_text(json.dumps(dict(cfg, hidden_size=64)))
    with pytest.raises(UserError, match="is not a Nomic Embed v2 MoE model"):
        checks.model_folder(folder)


def test_encoders_refuse_broken_folders_with_one_line(ckpts, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(ckpts.converted(**SHAPE), folder)
    _cut(folder / "model.safetensors")
    r = _cli("encode", str(folder), "hello")
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


def test_broken_onnx_file_is_named(ckpts, tmp_path):
    pytest.importorskip("onnxruntime")
    folder = tmp_path / "m"
    shutil.copytree(ckpts.converted(**SHAPE), folder)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf graph" * 3)
    r = _cli("encode", str(folder), "--onnx", "model.onnx", "hello")
    assert r.returncode == 2 and "model.onnx" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]


# ------------------------------------------------------------------------------------------------
# optional files: left out with their number, or fatal with --strict
# ------------------------------------------------------------------------------------------------


def test_optional_onnx_variant_is_left_out_not_fatal(ckpts, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    import nomic_moe_conversion.onnx_export as ox

    folder = tmp_path / "m"
    shutil.copytree(ckpts.converted(**SHAPE), folder)
    monkeypatch.setitem(ox.BOUNDS, "int8", ("min_cosine_sentence_embedding", 1.5))  # a bar nothing can reach
    report = ox.export_onnx(folder, exporter="torch", variants=("model", "int8"))
    assert (folder / "onnx" / "model.onnx").exists() and not (folder / "onnx" / "model_qint8_avx512.onnx").exists()
    [entry] = report["left_out"]
    assert entry["file"] == "model_qint8_avx512.onnx" and entry["measured"].startswith("min cosine 0.9")
    with pytest.raises(UserError, match="validation failed for model_qint8_avx512.onnx"):
        ox.export_onnx(folder, exporter="torch", variants=("model", "int8"), force=True, strict=True)
    assert (folder / "onnx" / "model.onnx").exists()  # a refused --force run leaves the old folder as it was


def test_release_goes_on_without_a_variant_that_misses_its_bar(ckpts, tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("sentence_transformers")
    import nomic_moe_conversion.release as rel
    from nomic_moe_cli.main import EXIT_PARTIAL, main

    monkeypatch.setitem(rel.BOUNDS, "int8", (1.5, None))  # a bar the int8 graph cannot reach
    out = tmp_path / "rel"
    code = main(["release", str(ckpts.source(**SHAPE)), str(out), "--synthetic", "--exporter", "torch"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_PARTIAL and err[-1].startswith("release written WITHOUT optional file(s): onnx/model_qint8_avx512.onnx")
    assert not (out / "onnx" / "model_qint8_avx512.onnx").exists() and (out / "onnx" / "model.onnx").exists()
    report = json.loads((out / "verification.json").read_text())
    assert [e["file"] for e in report["left_out"]] == ["onnx/model_qint8_avx512.onnx"]
    assert "Left out of this release" in (out / "README.md").read_text()
    code = main(["release", str(ckpts.source(**SHAPE)), str(tmp_path / "strict"), "--synthetic", "--exporter", "torch", "--strict"])
    assert code == 2 and not (tmp_path / "strict").exists() and _leftovers(tmp_path, "strict") == []


# ------------------------------------------------------------------------------------------------
# the CLI as a user meets it
# ------------------------------------------------------------------------------------------------


def test_cli_refusals_say_what_to_do(ckpts, tmp_path):
    model = str(ckpts.converted(**SHAPE))
    (tmp_path / "exists").mkdir()
    cases = [
        ("convert", str(tmp_path / "nope"), str(tmp_path / "o")),
        ("convert", str(ckpts.source(**SHAPE)), str(tmp_path / "exists")),
        ("encode", model, "--prompt", "nosuchprompt", "x"),
        ("encode", model, "--dim", "5000", "x"),
        ("encode", str(tmp_path), "x"),
        ("export-onnx", str(tmp_path / "nope")),
        ("upcycle", str(ckpts.source(**SHAPE)), str(tmp_path / "u")),
        ("release", str(ckpts.source(**SHAPE)), str(tmp_path / "exists")),
        ("release", str(ckpts.source(**SHAPE)), str(tmp_path / "r"), "--layout", "both", "--published-revision", "main"),
        ("embed", model, str(tmp_path / "no-such-corpus.jsonl"), str(tmp_path / "e")),
        ("embed", model, str(tmp_path / "exists"), str(tmp_path / "e"), "--dim", "0"),
        ("finetune", model, str(tmp_path / "no-such-train.jsonl"), str(tmp_path / "f")),
        ("finetune", str(tmp_path / "exists"), str(tmp_path / "no-such-train.jsonl"), str(tmp_path / "f")),
        ("doctor", "--capability", "99"),
    ]
    for args in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr[-1500:])
        assert "Traceback" not in r.stderr and "error:" in r.stderr and "fix:" in r.stderr, (args, r.stderr[-1500:])


def test_cli_bug_gets_a_traceback_and_how_to_report(monkeypatch, capsys):
    import nomic_moe_cli.main as cli

    def boom(args):
        raise ZeroDivisionError("an internal mistake")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), boom))
    assert cli.main(["synth", "x"]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback" in err and "This is a bug in nomic-moe" in err and "torch" in err


def _with_func(parser, func):
    parser.set_defaults(func=func)
    for action in parser._subparsers._group_actions:
        for sub in action.choices.values():
            sub.set_defaults(func=func)
    return parser
