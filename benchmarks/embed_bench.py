"""Throughput of `nomic-moe embed` against calling the model in a loop, same workload, same batching.

    python benchmarks/embed_bench.py [--texts 256] [--dtype float32] [--engines local,ray] [--threads 2]

A random checkpoint at the real size (vocabulary cut to 512 rows: speed does not depend on it),
converted to our layout; a corpus of --texts texts whose token counts follow `nomic-moe bench`'s
mixed-length workload (log-normal, median ~100, max 512), in JSON lines. Paths, each timed on the
same texts with the same --batch-tokens batches (batching.token_batches):

  loop      tokenise, then the model on each batch in a Python loop: no reading, no writing
            (run before and after each job: this VM's speed drifts; the best loop is the baseline)
  local     `embed --engine local`: read and check every row, batch, embed, write parquet parts
  ray       `embed --engine ray`: the same on a local Ray instance (one replica, all cores)

"whole job" includes everything (imports, model load, row checks, Ray start-up, writing); the
"embedding phase" starts after the row checks (model load and Ray start-up inside); "inside the
parts" adds up the workers' own time per part (read, tokenise, embed, write parquet).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def make_corpus(path: Path, tokenizer, n: int, seed: int = 0):
    import random

    from nomic_moe_conversion.synthetic import CORPUS
    from nomic_moe_inference.bench import workload

    words = " ".join(CORPUS).split()
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i, target in enumerate(workload(n, seed=seed)):
            text = []
            while len(tokenizer(" ".join(text))["input_ids"]) < min(target, 510):
                text.extend(rng.choices(words, k=max(1, (target - len(text)) // 3)))
            f.write(json.dumps({"id": i, "text": " ".join(text)}) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--engines", default="local,ray")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir")
    a = p.parse_args()
    os.environ["NOMIC_MOE_NO_PROGRESS"] = "1"
    torch.set_num_threads(a.threads)
    from transformers import AutoModel, AutoTokenizer

    from nomic_moe_conversion.convert import convert
    from nomic_moe_conversion.synthetic import make_published_checkpoint, real_size_shape
    from nomic_moe_inference.corpus.job import embed_corpus
    from nomic_moe_inference.batching import pad_batch, token_batches

    work = Path(a.workdir or tempfile.mkdtemp(prefix="nomic-moe-embed-bench-"))
    model_dir = work / "model"
    if not model_dir.exists():
        src = make_published_checkpoint(work / "src", seed=0, weight_std=0.02, **real_size_shape(vocab_size=512))
        convert(str(src), str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    corpus = work / "corpus.jsonl"
    make_corpus(corpus, tok, a.texts)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    ids = tok(["search_document: " + t for t in texts], truncation=True, max_length=512)["input_ids"]
    lengths = [len(x) for x in ids]
    n_tokens = sum(lengths)
    log(f"workload: {len(texts)} texts, {n_tokens:,} real tokens (median {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)})")

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    part_rows = 64

    def loop():
        """The model on the job's batches (parts of part_rows texts, token batches inside each), no I/O."""
        model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=dtype).eval()
        t0 = time.time()
        with torch.inference_mode():
            for lo in range(0, len(ids), part_rows):
                part = ids[lo : lo + part_rows]
                for batch in token_batches([len(x) for x in part], a.batch_tokens):
                    t, m = (torch.from_numpy(a_) for a_ in pad_batch(part, batch))
                    model(input_ids=t, attention_mask=m, return_sentence_embedding=True)
        seconds = time.time() - t0
        return ("model in a loop (same batches, no I/O)", seconds, n_tokens / seconds, n_tokens / seconds, n_tokens / seconds)

    def job(engine):
        out = work / f"out-{engine}-{time.time_ns()}"
        t0 = time.time()
        manifest = embed_corpus(str(model_dir), str(corpus), str(out), engine=engine, dtype=a.dtype, batch_tokens=a.batch_tokens,
                                threads=a.threads, part_rows=part_rows)
        seconds = time.time() - t0
        run = manifest["last_run"]
        return (f"embed --engine {engine}", seconds, n_tokens / seconds, run["tokens_per_second"], run["worker_tokens_per_second"])

    # interleaved, the loop between the jobs: this VM's speed drifts, so each job has a loop run beside it
    rows = [loop()]
    for engine in a.engines.split(","):
        rows += [job(engine), loop()]
    base = max(r[2] for r in rows if r[0].startswith("model in a loop"))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} threads, {a.dtype}; "
          f"{len(texts)} texts, {n_tokens:,} real tokens, --batch-tokens {a.batch_tokens}, parts of 64 rows; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| path (in the order run) | seconds (whole job) | real tok/s: whole job | embedding phase | inside the parts | parts vs the best loop |")
    print("|---|---|---|---|---|---|")
    for name, s, tps, phase, worker in rows:
        print(f"| {name} | {s:.1f} | {tps:,.0f} | {phase:,.0f} | {worker:,.0f} | {worker / base:.2f}x |")


if __name__ == "__main__":
    main()
