"""Load against embedding servers on 127.0.0.1: ours, and the anchors, same folder, same workload.

    python benchmarks/serve_bench.py MODEL_DIR [--servers ours:float32,ours:bfloat16,infinity,infinity:bfloat16,llama.cpp:f32] [--seconds 20]
        [--scenarios mixed,paced,queries,documents] [--rounds N] [--query-rate R]

A server spec may carry extra flags for our server after an @, one per @: `ours:float32@--bulk-share=0.5`,
`ours:bfloat16@--device=cuda`, `ours:float32@--onnx=model_fp16.onnx@--provider=cuda`. NOMIC_MOE_CLI
names the command that starts our server (default: this checkout's .venv/bin/nomic-moe).
`--rounds N` runs the whole list N times, servers interleaved, so a VM whose speed drifts by the
minute treats every server alike.

Scenarios (each client sends a request, waits for the answer, sends the next; paced queries do not wait):
  mixed      2 document clients (8 documents of 100-400 tokens per request) + 6 query clients (one
             12-40 token query each): ingestion and search at once, the RAG endpoint's real day
  queries    C query clients, C = 1, 4, 16, 64
  documents  C document clients, C = 1, 4
  paced      --query-rate R: the mixed load's 2 document clients, with queries that arrive at R a second
             (Poisson), each sent when it arrives, whether or not the ones before it were answered, as
             users' searches do. In the closed loop, a server that answers queries sooner is sent more of
             them, and the documents pay for the extra queries; here every server gets the same queries,
             so the documents' rate shows what the query lane itself costs ingestion.
Per scenario and kind: texts/s, tokens/s (the model's tokenizer, prompts not counted) and
p50/p95/p99 latency; errors counted. Servers run one after the other, each alone on the machine.
infinity and llama.cpp get the raw texts (they have no prompts); ours gets prompt_name query / document.
llama.cpp: `llama-server --embedding` on a GGUF (f32, f16 or q8_0) of MODEL_DIR in the published
layout, made here once (benchmarks/llama_cpp.py builds llama-server; its GGUF lacks the expert bias,
so its vectors differ, but the work per token is the same).
"""

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
WORDS = ("river market winter station garden engine paper window history music science village doctor "
         "language mountain coffee energy network ocean harvest school planet bridge forest camera").split()


def log(msg):
    print(f"[serve-bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Texts:
    """Random texts whose token counts (this model's tokenizer, specials included) fall in a range."""

    def __init__(self, model_dir, seed=0):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.rng = random.Random(seed)
        per_word = len(self.tok(" ".join(WORDS))["input_ids"]) / len(WORDS)
        self.per_word = max(per_word, 0.5)

    def make(self, lo, hi):
        target = self.rng.randint(lo, hi)
        words = [self.rng.choice(WORDS) for _ in range(max(1, int(target / self.per_word)))]
        text = " ".join(words)
        return text, len(self.tok(text)["input_ids"])

    def pool(self, n, lo, hi):
        return [self.make(lo, hi) for _ in range(n)]


def start(kind, model_dir, dtype, port, logfile, extra=()):
    env = dict(os.environ, OMP_NUM_THREADS="2", DO_NOT_TRACK="1", INFINITY_ANONYMOUS_USAGE_STATS="0")
    if kind == "ours":
        cli = os.environ.get("NOMIC_MOE_CLI", "").split() or [str(HERE.parent / ".venv/bin/nomic-moe")]
        cmd = [*cli, "serve", str(model_dir), "--port", str(port), "--threads", "2",
               "--dtype", dtype, "--served-model-name", "bench", *extra]
    elif kind == "infinity":
        venv = Path(os.environ.get("INFINITY_VENV", Path.home() / ".cache/nomic-moe/infinity-venv"))
        cmd = [str(venv / "bin/infinity_emb"), "v2", "--model-id", str(model_dir), "--served-model-name", "bench", "--port", str(port),
               "--host", "127.0.0.1", "--engine", "torch", "--device", "cpu", "--batch-size", "32", "--no-bettertransformer",
               *(["--dtype", dtype] if dtype else [])]  # infinity:bfloat16 (no dtype: its auto, fp32 on a CPU)
    elif kind == "llama.cpp":
        import llama_cpp as harness  # benchmarks/llama_cpp.py

        tools = harness.prepare(server=True)
        gguf = llama_gguf(tools, model_dir, dtype, Path(logfile).parent)
        # every slot holds one text of up to 512 tokens; a step batches the texts of all busy slots
        slots = 16
        cmd = [str(tools.server), "-m", str(gguf), "--embedding", "--pooling", "mean", "--host", "127.0.0.1", "--port", str(port),
               "-t", "2", "-np", str(slots), "-c", str(512 * slots), "-b", "4096", "-ub", "4096", "-lm", "none"]
    else:
        raise SystemExit(f"unknown server {kind}")
    proc = subprocess.Popen(cmd, stdout=open(logfile, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{kind} exited: see {logfile}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{kind} not healthy in time: see {logfile}")


def llama_gguf(tools, model_dir, outtype, folder):
    """MODEL_DIR -> the published layout -> GGUF of ``outtype``, made once in ``folder``."""
    import llama_cpp as harness
    from nomic_moe_conversion.convert import convert

    gguf = folder / f"llama-{outtype}.gguf"
    if not gguf.exists():
        published = folder / "published"
        if not published.exists():
            convert(str(model_dir), str(published), layout_name="published", check=False)
        harness.to_gguf(tools, published, gguf.with_suffix(".tmp"), outtype)
        gguf.with_suffix(".tmp").rename(gguf)
    return gguf


def route(kind):
    return {"ours": "/v1/embeddings", "llama.cpp": "/v1/embeddings"}.get(kind, "/embeddings")


def send(c, kind, url, batch, prompt, out):
    """One request of ``batch`` [(text, tokens)]; its (kind, seconds, ok, texts, tokens, start) lands in ``out``."""
    body = {"model": "bench", "input": [t for t, _ in batch]}
    if kind == "ours":
        body["prompt_name"] = prompt
    t0 = time.monotonic()
    try:
        ok = c.post(url + route(kind), json=body).status_code == 200
    except httpx.HTTPError:
        ok = False
    out.append((prompt, time.monotonic() - t0, ok, len(batch), sum(n for _, n in batch), t0))


def client_loop(kind, url, texts, per_request, prompt, until, out, rng):
    with httpx.Client(timeout=600) as c:
        while time.monotonic() < until:
            send(c, kind, url, [texts[rng.randrange(len(texts))] for _ in range(per_request)], prompt, out)


def paced_queries(kind, url, texts, rate, until, out, rng):
    """Queries arriving at ``rate`` a second (Poisson), each sent at its arrival on a thread of its own."""
    sent = []
    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=256)) as c:
        next_t = time.monotonic()
        while True:
            next_t += rng.expovariate(rate)
            if next_t >= until:
                break
            time.sleep(max(0.0, next_t - time.monotonic()))
            sent.append(threading.Thread(target=send, args=(c, kind, url, [texts[rng.randrange(len(texts))]], "query", out)))
            sent[-1].start()
        for th in sent:
            th.join()


def scenario(kind, url, name, clients, seconds, queries, docs, query_rate=None):
    out = []
    start_t = time.monotonic()
    until = start_t + seconds
    threads = []
    for i, (what, n) in enumerate(clients):
        pool, per = (queries, 1) if what == "query" else (docs, 8)
        th = threading.Thread(target=client_loop, args=(kind, url, pool, per, what, until, out, random.Random(i)))
        th.start()
        threads.append(th)
    if query_rate:
        threads.append(threading.Thread(target=paced_queries, args=(kind, url, queries, query_rate, until, out, random.Random(99))))
        threads[-1].start()
    for th in threads:
        th.join()
    wall = time.monotonic() - start_t
    rows = []
    for what in ("query", "document"):
        got = [r for r in out if r[0] == what]
        if not got:
            continue
        lat = np.array([r[1] for r in got if r[2]]) * 1000
        rows.append({"server": kind, "scenario": name, "kind": what, "requests": len(got), "errors": sum(not r[2] for r in got),
                     "texts_per_s": sum(r[3] for r in got if r[2]) / wall, "tokens_per_s": sum(r[4] for r in got if r[2]) / wall,
                     "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                     "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None,
                     "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None})
    for r in rows:
        log(f"{kind:>14} {name:<14} {r['kind']:<8} {r['texts_per_s']:7.2f} texts/s {r['tokens_per_s']:8.0f} tok/s "
            f"p50 {r['p50_ms'] or 0:8.1f} p95 {r['p95_ms'] or 0:8.1f} p99 {r['p99_ms'] or 0:8.1f} ms  errors {r['errors']}")
    return rows


def bench_server(a, spec, round_, chosen, queries, docs):
    """Start one server (a --servers entry), run the chosen scenarios against it, stop it."""
    spec, _, extra = spec.partition("@")
    kind, _, dtype = spec.partition(":")
    extra = extra.replace("@", ",")  # flags after the first @ are separated by @ (a comma would split --servers)
    label = (f"{kind}:{dtype}" if dtype else kind) + (f" {extra.replace(',', ' ')}" if extra else "")
    logfile = Path(a.out).with_name(f"{label.replace(':', '-').replace(' ', '_')}.log")
    logfile.parent.mkdir(parents=True, exist_ok=True)
    log(f"round {round_}: starting {label} (log {logfile})")
    flags = [f for part in extra.split(",") if part for f in part.split("=", 1)]
    proc, url = start(kind, a.model_dir, dtype or {"llama.cpp": "f32", "infinity": ""}.get(kind, "float32"), free_port(), logfile, flags)
    rows = []
    try:
        scenario(kind, url, "warm-up", [("query", 1), ("document", 1)], 5, queries, docs)
        plan = [("mixed", [("document", 1)] * 2 + [("query", 1)] * 6, 3 * a.seconds)] if "mixed" in chosen else []
        if "queries" in chosen:
            plan += [(f"queries x{c}", [("query", 1)] * int(c), a.seconds) for c in a.query_clients.split(",") if c]
        if "documents" in chosen:
            plan += [(f"documents x{c}", [("document", 1)] * int(c), a.seconds) for c in a.doc_clients.split(",") if c]
        if "paced" in chosen:
            plan += [(f"paced {a.query_rate:g} q/s", [("document", 1)] * 2, 3 * a.seconds)]
        for name, clients, seconds in plan:
            for r in scenario(kind, url, name, clients, seconds, queries, docs, a.query_rate if name.startswith("paced") else None):
                r["server"] = label
                r["round"] = round_
                rows.append(r)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--servers", default="ours:float32,infinity",
                   help="comma list of ours:DTYPE, infinity[:DTYPE] and llama.cpp:f32|f16|q8_0")
    p.add_argument("--seconds", type=float, default=20, help="per scenario (mixed runs 3x this)")
    p.add_argument("--query-clients", default="1,4,16,64")
    p.add_argument("--doc-clients", default="1,4")
    p.add_argument("--scenarios", default="mixed,paced,queries,documents", help="which of mixed, paced, queries, documents to run")
    p.add_argument("--query-rate", type=float, default=1.0, help="queries a second in the paced scenario (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="run the server list this many times, interleaved")
    p.add_argument("--out", default=str(HERE / "out/serve_bench.json"))
    a = p.parse_args()
    chosen = set(a.scenarios.split(","))
    if chosen - {"mixed", "queries", "documents", "paced"}:
        raise SystemExit(f"unknown scenario in --scenarios {a.scenarios}: use mixed, queries, documents, paced")
    if a.query_rate <= 0:
        raise SystemExit(f"--query-rate {a.query_rate}: give queries a second above 0")
    texts = Texts(a.model_dir)
    queries, docs = texts.pool(400, 12, 40), texts.pool(400, 100, 400)
    rows = []
    for round_ in range(1, a.rounds + 1):
        for spec in a.servers.split(","):
            rows += bench_server(a, spec, round_, chosen, queries, docs)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print("| round | server | scenario | kind | texts/s | tokens/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['server']} | {r['scenario']} | {r['kind']} | {r['texts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['errors']} |")


if __name__ == "__main__":
    main()
