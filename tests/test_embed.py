"""`nomic-moe embed`: a corpus into parquet parts, on both engines, resumable, exactly once, nothing lost silently."""

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nomic_moe_files.errors import UserError
from nomic_moe_inference.corpus.job import embed_corpus, read_output

SHAPE = dict(num_experts=4, top_k=2, num_layers=2)
WORDS = "alpha beta gamma delta bread fish winter storm plains movie earnings settlers berries thunder".split()
os.environ["NOMIC_MOE_NO_PROGRESS"] = "1"


def write_corpus(folder: Path, n_jsonl=1200, n_csv=500, n_parquet=400, seed=0):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {}

    def text():
        return " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))

    with open(folder / "a.jsonl", "w") as f:
        for i in range(n_jsonl):
            texts[f"j{i}"] = text()
            f.write(json.dumps({"id": f"j{i}", "text": texts[f"j{i}"], "extra": i}) + "\n")
            if i % 300 == 0:
                f.write("\n")  # blank lines are not rows
    with open(folder / "b.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "id"])
        for i in range(n_csv):
            texts[f"c{i}"] = text() + ("\nsecond line" if i % 50 == 0 else "")
            w.writerow([texts[f"c{i}"], f"c{i}"])
    ids = [f"p{i}" for i in range(n_parquet)]
    for i in ids:
        texts[i] = text()
    pq.write_table(pa.table({"id": ids, "text": [texts[i] for i in ids]}), str(folder / "c.parquet"), row_group_size=150)
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus") / "in"
    return folder, write_corpus(folder)


@pytest.fixture(scope="module")
def model(ckpts):
    return str(ckpts.converted(**SHAPE))


@pytest.fixture(scope="module")
def local_run(model, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "local"
    embed_corpus(model, str(corpus[0]), str(out), part_rows=250, batch_tokens=2048)
    return out


def test_local_engine_matches_the_encoder_and_has_every_id_once(local_run, corpus, model):
    from nomic_moe_inference.encoder import Encoder

    folder, texts = corpus
    got = read_output(local_run)  # raises if an id appears twice
    assert sorted(got) == sorted(texts)
    manifest = json.loads((local_run / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == {"input": 2100, "bad": 0, "embedded": 2100, "truncated": 0}
    assert manifest["settings"]["prompt"] == "document" and manifest["settings"]["dim"] == 64
    schema = pq.read_schema(str(local_run / "part-00000.parquet"))
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[64]"
    sample = sorted(texts)[::97]
    ref = Encoder(model).encode([texts[i] for i in sample], prompt="document").numpy()
    ours = np.array([got[i] for i in sample])
    assert np.abs(ours - ref).max() <= 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_ray_engine_gives_the_same_rows_and_numbers(local_run, corpus, model, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    embed_corpus(model, str(corpus[0]), str(out), engine="ray", part_rows=250, batch_tokens=2048)
    a, b = read_output(local_run), read_output(out)
    assert a.keys() == b.keys()
    assert max(np.abs(np.array(a[k]) - np.array(b[k])).max() for k in a) <= 1e-5


def test_matryoshka_dim_and_query_prompt(corpus, model, tmp_path):
    from nomic_moe_inference.encoder import Encoder

    folder, texts = corpus
    out = tmp_path / "q"
    embed_corpus(model, str(folder / "c.parquet"), str(out), prompt="query", dim=32)
    got = read_output(out)
    some = sorted(got)[:5]
    ref = Encoder(model).encode([texts[i] for i in some], prompt="query", dim=32).numpy()
    assert np.abs(np.array([got[i] for i in some]) - ref).max() <= 1e-5


def _default_sigint():
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that;
    # Ctrl-C must reach the job as it does in a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# The CLI, whose part worker stops after PARTS parts: it writes PAUSED and waits there until a signal
# ends it (or until the file GO exists, then it goes on). The interrupt then lands mid-job however loaded the machine is; no race with a job that
# would otherwise finish before the test's signal arrives.
_PAUSING_CLI = """
import os, sys, time
from pathlib import Path
from nomic_moe_inference.corpus import worker
PARTS, PAUSED = int(os.environ["NOMIC_MOE_TEST_PARTS"]), Path(os.environ["NOMIC_MOE_TEST_PAUSED"])
GO = Path(os.environ["NOMIC_MOE_TEST_GO"]) if os.environ.get("NOMIC_MOE_TEST_GO") else None
embed_part, done = worker.PartEmbedder.embed_part, []
def pausing(self, part):
    if len(done) == PARTS and not PAUSED.exists():
        PAUSED.touch()
        while not (GO and GO.exists()):
            time.sleep(0.05)
    result = embed_part(self, part)
    done.append(result)
    return result
worker.PartEmbedder.embed_part = pausing
from nomic_moe_cli.main import main
sys.exit(main(["embed", *sys.argv[1:]]))
"""


def _pausing_cli(paused: Path, parts: int, *args, go: Path = None):
    env = dict(os.environ, NOMIC_MOE_TEST_PARTS=str(parts), NOMIC_MOE_TEST_PAUSED=str(paused), NOMIC_MOE_TEST_GO=str(go or ""))
    # output to files, not pipes nobody reads while waiting (a full pipe would block the job)
    with open(paused.with_name(paused.name + ".stdout"), "w") as out, open(paused.with_name(paused.name + ".stderr"), "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _PAUSING_CLI, *args], stdout=out, stderr=err, text=True,
                                preexec_fn=_default_sigint, env=env)
    proc.stderr_file = paused.with_name(paused.name + ".stderr")
    return proc


def _wait_for(path: Path, proc, seconds=600):
    """Until ``path`` exists: the child's own progress decides, the deadline only catches a hung child."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended ({proc.returncode}) before {path.name}: {proc.stderr_file.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name} after {seconds}s"
        time.sleep(0.02)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_interrupted_run_resumes_to_the_same_output(local_run, corpus, model, tmp_path, how):
    out = tmp_path / "resumed"
    paused = tmp_path / "paused"
    proc = _pausing_cli(paused, 3, model, str(corpus[0]), str(out), "--part-rows", "100", "--batch-tokens", "2048")
    _wait_for(paused, proc)  # three parts written, the fourth waiting: the job is mid-way, whatever the load
    proc.send_signal(getattr(signal, how))
    code = proc.wait(300)
    err = proc.stderr_file.read_text()
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert code != 0 and 0 < len(parts) < 21, (code, parts)
    if how == "SIGINT":
        assert code == 130 and "rerun the same command to finish" in err and "Traceback" not in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "embed", model, str(corpus[0]), str(out), "--part-rows", "100",
                        "--batch-tokens", "2048"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already written" in r.stderr
    resumed, whole = read_output(out), read_output(local_run)
    assert resumed.keys() == whole.keys()
    assert max(np.abs(np.array(resumed[k]) - np.array(whole[k])).max() for k in whole) <= 1e-5
    assert not list(out.glob(".part-*"))  # no half-written part left behind


def test_changed_settings_are_refused(local_run, corpus, model):
    for kwargs, what in ((dict(prompt="query"), "prompt"), (dict(dim=32), "dim"), (dict(dtype="bfloat16"), "dtype")):
        with pytest.raises(UserError, match=f"other settings.*{what}"):
            embed_corpus(model, str(corpus[0]), str(local_run), part_rows=250, **kwargs)
    with pytest.raises(UserError, match="part-rows"):
        embed_corpus(model, str(corpus[0]), str(local_run), part_rows=100)


def test_other_model_and_changed_input_are_refused(local_run, corpus, ckpts, tmp_path):
    other = str(ckpts.converted(num_experts=4, top_k=1, num_layers=2))
    with pytest.raises(UserError, match="other settings.*model"):
        embed_corpus(other, str(corpus[0]), str(local_run), part_rows=250)
    folder = tmp_path / "in"
    write_corpus(folder, 50, 10, 10)
    out = tmp_path / "out"
    embed_corpus(str(ckpts.converted(**SHAPE)), str(folder), str(out))
    with open(folder / "a.jsonl", "a") as f:
        f.write(json.dumps({"id": "new", "text": "a new row"}) + "\n")
    with pytest.raises(UserError, match="input files changed"):
        embed_corpus(str(ckpts.converted(**SHAPE)), str(folder), str(out))


def _bad_corpus(folder: Path):
    folder.mkdir(parents=True)
    rows = [{"id": "1", "text": "fine"}, {"id": "2", "text": ""}, {"id": "3"}, {"id": "1", "text": "again"},
            {"id": "4", "text": 17}, {"text": "no id"}, {"id": "5", "text": "   "}, {"id": "6", "text": "fine too"}]
    lines = [json.dumps(r) for r in rows] + ["{not json", json.dumps(["a", "list"])]
    (folder / "x.jsonl").write_text("\n".join(lines) + "\n")


def test_bad_rows_are_refused_by_default_with_their_rows(model, tmp_path):
    _bad_corpus(tmp_path / "in")
    with pytest.raises(UserError) as e:
        embed_corpus(model, str(tmp_path / "in"), str(tmp_path / "out"))
    msg = str(e.value)
    assert "nothing was embedded: 8 bad row(s)" in msg
    for expected in ("x.jsonl:2 (id '2'): empty text", "x.jsonl:3 (id '3'): missing text", "x.jsonl:4 (id '1'): duplicate id",
                     "x.jsonl:5 (id '4'): text of type int", "x.jsonl:6 (id None): missing id", "x.jsonl:9 (id None): invalid JSON"):
        assert expected in msg, (expected, msg)
    assert "--on-bad-rows skip" in msg and not (tmp_path / "out").exists()


def test_bad_rows_skipped_go_to_the_errors_file_and_the_manifest(model, tmp_path):
    _bad_corpus(tmp_path / "in")
    out = tmp_path / "out"
    manifest = embed_corpus(model, str(tmp_path / "in"), str(out), on_bad_rows="skip")
    assert sorted(read_output(out)) == ["1", "6"]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 8 and manifest["rows"] == {"input": 10, "bad": 8, "embedded": 2, "truncated": 0}
    assert {e["row"] for e in errors} == {2, 3, 4, 5, 6, 7, 9, 10} and manifest["errors_file"] == "errors.jsonl"


def test_input_refusals(model, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text(json.dumps({"id": 1, "body": "text under another name"}) + "\n")
    with pytest.raises(UserError, match="no column 'text'.*\n.*--text-column"):
        embed_corpus(model, str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(UserError, match="holds no .jsonl"):
        embed_corpus(model, str(tmp_path / "nothing*.txt"), str(tmp_path / "out"))
    (tmp_path / "c.parquet").write_bytes(b"PAR1 but not really")
    with pytest.raises(UserError, match="not a readable parquet file"):
        embed_corpus(model, str(tmp_path / "c.parquet"), str(tmp_path / "out"))
    manifest = embed_corpus(model, str(tmp_path / "in"), str(tmp_path / "out"), text_column="body")
    assert manifest["settings"]["id_type"] == "int" and read_output(tmp_path / "out").keys() == {1}


def test_a_second_job_on_the_same_output_is_refused(model, corpus, tmp_path):
    out = tmp_path / "out"
    paused = tmp_path / "paused"
    proc = _pausing_cli(paused, 1, model, str(corpus[0]), str(out), "--part-rows", "100", go=tmp_path / "go")
    _wait_for(paused, proc)  # the first job holds OUTPUT, and cannot finish before the second one asks
    r = subprocess.run([sys.executable, "-m", "nomic_moe_cli", "embed", model, str(corpus[0]), str(out), "--part-rows", "100"],
                       capture_output=True, text=True, timeout=600)
    (tmp_path / "go").touch()  # now the first job finishes
    proc.wait(600)
    assert r.returncode == 2 and "another embed job is writing" in r.stderr, r.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr_file.read_text()[-2000:]


def test_onnx_runtime_engine_matches_pytorch(released_both, tmp_path):
    """--onnx: the same job through ONNX Runtime (onnx/model.onnx, exact fp32 graph)."""
    pytest.importorskip("onnxruntime")
    model = str(released_both["main"])
    folder = tmp_path / "in"
    write_corpus(folder, 60, 20, 20)
    embed_corpus(model, str(folder), str(tmp_path / "torch"))
    manifest = embed_corpus(model, str(folder), str(tmp_path / "onnx"), onnx="model.onnx")
    assert manifest["settings"]["onnx"] == "onnx/model.onnx" and manifest["settings"]["dtype"] == "onnx"
    a, b = read_output(tmp_path / "torch"), read_output(tmp_path / "onnx")
    assert a.keys() == b.keys() and max(np.abs(np.array(a[k]) - np.array(b[k])).max() for k in a) <= 1e-4
