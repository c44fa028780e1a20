"""`nomic-moe finetune`: a task the model cannot solve before training, solved after; the balance effect; resume; refusals."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("accelerate")

from nomic_moe_files.errors import UserError  # noqa: E402
from nomic_moe_training.finetune import finetune  # noqa: E402

SHAPE = dict(num_experts=4, top_k=2, num_layers=2)
FAST = dict(batch_size=16, lr=2e-3, epochs=6, matryoshka="64,32", logging_steps=20, save_steps=1000)


def synthetic_task(folder: Path, topics=16, train_per_topic=24, eval_per_topic=4, seed=0):
    """Each topic: one document of its own words, queries from a disjoint vocabulary. Lexical overlap
    says nothing (both are random letter strings), so only training can link a query to its document."""
    rng = random.Random(seed)
    used = set()

    def word():
        while True:
            w = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 7)))
            if w not in used:
                used.add(w)
                return w

    train, held = [], []
    for _ in range(topics):
        q_words, doc = [word() for _ in range(8)], " ".join(word() for _ in range(6))
        combos = set()
        while len(combos) < train_per_topic + eval_per_topic:
            combos.add(tuple(rng.sample(q_words, 3)))
        combos = sorted(combos)
        rng.shuffle(combos)
        train += [{"query": " ".join(c), "positive": doc} for c in combos[:train_per_topic]]
        held += [{"query": " ".join(c), "positive": doc} for c in combos[train_per_topic:]]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl", folder / "eval.jsonl"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return synthetic_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def trained(ckpts, task, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "model"
    report = finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(out), eval_file=str(task[1]), **FAST)
    return out, report


def test_finetuning_solves_a_task_the_model_could_not(trained):
    out, report = trained
    chance = 1 / report["eval_documents"]
    for dim in ("64", "32"):
        before, after = report["before"][dim], report["after"][dim]
        assert before["recall@1"] <= chance + 0.15, before
        assert after["recall@1"] >= before["recall@1"] + 0.5, (before, after)
        assert after["ndcg@10"] > before["ndcg@10"] and after["mrr@10"] > before["mrr@10"]
    assert (out / "training_report.json").exists() and not out.with_name(out.name + ".training").exists()


def test_output_loads_everywhere_and_release_accepts_it(trained, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    out, _ = trained
    assert json.loads((out / "config.json").read_text())["model_type"] == "nomic_moe"
    AutoModel.from_pretrained(str(out), trust_remote_code=True)
    st = SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert st.encode_query(["abcd efgh"]).shape == (1, 64)
    pytest.importorskip("onnxruntime")
    from nomic_moe_conversion.release import release

    result = release(str(out), str(tmp_path / "rel"), synthetic=True, exporter="torch")
    assert result.complete and (tmp_path / "rel" / "model.safetensors").exists()


def test_load_balancing_loss_evens_out_the_experts(ckpts, task, tmp_path, trained):
    """The same run with the aux-loss coefficient at 1 (the pretraining weight) instead of 0 (the fine-tuning default)."""
    _, without = trained
    with_aux = finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "aux"), eval_file=str(task[1]),
                        aux_loss_coef=1.0, **FAST)
    spread0, spread1 = without["load_spread"]["after"], with_aux["load_spread"]["after"]
    assert spread1 < 0.8 * spread0, (spread0, spread1)
    assert with_aux["after"]["64"]["recall@1"] >= 0.5  # balancing does not stop it from learning


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # background jobs of a shell without job control start with SIGINT ignored


def test_interrupted_run_continues_with_resume(ckpts, task, tmp_path):
    out = tmp_path / "m"
    args = [sys.executable, "-m", "nomic_moe_cli", "finetune", str(ckpts.converted(**SHAPE)), str(task[0]), str(out), "--eval",
            str(task[1]), "--batch-size", "16", "--lr", "2e-3", "--max-steps", "120", "--save-steps", "10", "--logging-steps", "5",
            "--matryoshka", "64,32"]
    # stderr to a file, not a pipe nobody reads while waiting: the progress bars of a slow (loaded) run
    # would fill the pipe's 64 KiB and block the trainer before it ever writes checkpoint-10
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err, text=True, preexec_fn=_default_sigint)
    workdir = out.with_name("m.training")
    deadline = time.monotonic() + 900
    while not (workdir / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # checkpoints appear whole (written as tmp-checkpoint-N, then renamed)
    proc.wait(600)
    assert not out.exists() and (workdir / "checkpoint-10").exists()
    (workdir / "checkpoint-1000").mkdir()  # as a Ctrl-C in the middle of saving leaves one
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)  # generous: a loaded machine starts slowly
    assert again.returncode == 2 and "--resume" in again.stderr  # not silently started over
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "passing over checkpoint-1000" in r.stderr and "resuming from checkpoint-" in r.stderr and "step 120/120" in r.stderr
    assert "expert load %" in r.stderr and "tok/s" in r.stderr
    assert json.loads((out / "training_report.json").read_text())["steps"] == 120


def test_bad_input_is_refused_before_training(ckpts, tmp_path):
    model = str(ckpts.converted(**SHAPE))
    cases = [
        ([{"query": "a", "document": "b"}], "no column 'positive'"),
        ([{"query": "a", "positive": ""}], "positive is empty"),
        ([{"query": 3, "positive": "b"}], "query is int"),
        ([{"query": "a", "positive": "b", "negatives": "c"}], "negatives must be a list"),
        ([{"query": "a", "positive": "b", "negatives": ["c"]}, {"query": "d", "positive": "e", "negatives": ["f", "g"]}],
         "2 negatives where earlier rows have 1"),
        ([], "TRAIN has no rows"),
    ]
    for i, (rows, message) in enumerate(cases):
        path = tmp_path / f"t{i}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(UserError, match=message):
            finetune(model, str(path), str(tmp_path / f"o{i}"), eval_file=str(path))
        assert not (tmp_path / f"o{i}").exists()
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"query": "a", "positive": "b"}) + "\n")
    with pytest.raises(UserError, match="not a Nomic Embed v2 MoE model"):
        finetune(str(tmp_path / "notmodel"), str(good), str(tmp_path / "o"))


def test_hard_negatives_bf16_and_gradient_checkpointing(ckpts, task, tmp_path):
    """The other switches of the recipe run: mined hard negatives, bf16 autocast, gradient checkpointing, GradCache."""
    report = finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "hn"), eval_file=str(task[1]),
                      hard_negatives=2, hard_negative_margin=0, bf16=True, gradient_checkpointing=True, max_steps=6, batch_size=4, lr=1e-3,
                      matryoshka="64", logging_steps=3, save_steps=1000)
    assert report["steps"] == 6 and report["args"]["hard_negatives"] == 2 and report["pairs"] > 0
    report = finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "cached"), eval_file=str(task[1]),
                      cached_batch=4, max_steps=4, batch_size=16, lr=1e-3, matryoshka="64,32", logging_steps=2, save_steps=1000)
    assert report["steps"] == 4
    with pytest.raises(UserError, match="cached"):
        finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "x"), eval_file=str(task[1]), cached_batch=4,
                 aux_loss_coef=1.0)
    with pytest.raises(UserError, match="ran no step"):  # 16 rows x 3 documents cannot be distinct among 16 documents
        finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "z"), eval_file=str(task[1]), hard_negatives=2,
                 hard_negative_margin=0, max_steps=2, batch_size=16)
    assert not (tmp_path / "z").exists()
    # a margin of 1 passes over every candidate scoring above 0, and an untrained model scores every document near 1:
    # none is left, whatever the random weights
    with pytest.raises(UserError, match="hard negatives"):
        finetune(str(ckpts.converted(**SHAPE)), str(task[0]), str(tmp_path / "y"), eval_file=str(task[1]), hard_negatives=2,
                 hard_negative_margin=1.0, max_steps=2)
