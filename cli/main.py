"""`nomic-moe`: convert, encode, synth and demo. Errors are one line plus the fix, exit code 2."""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from nomic_moe_files.errors import UserError

PUBLISHED_REPO = "nomic-ai/nomic-embed-text-v2-moe"
EXIT_USER_ERROR = 2  # a refusal: the message says what to do
EXIT_PARTIAL = 3  # written, but without optional files that missed their bound (release, export-onnx)
EXIT_BUG = 70  # an unexpected exception: our bug
CARD_EXAMPLES = ["Hello!", "¡Hola!"]  # the model card's example, both with the passage prompt


def cmd_convert(a):
    from nomic_moe_conversion.convert import convert

    convert(a.src, a.out, dtype=a.dtype, tokenizer=a.tokenizer, force=a.force, check=not a.no_verify, layout_name=a.layout)


def cmd_encode(a):
    import torch

    if a.onnx:
        from nomic_moe_inference.onnx_encoder import OnnxEncoder

        name = a.onnx if "/" in a.onnx else f"onnx/{a.onnx}"
        enc = OnnxEncoder(resolve_model(a.model), name, provider=a.provider)
        emb = torch.from_numpy(enc.encode(a.texts, prompt=a.prompt, dim=a.dim))
        print(f"ONNX Runtime: {name} on {enc.session.get_providers()[0]}", file=sys.stderr)
    else:
        from nomic_moe_inference.encoder import Encoder

        enc = Encoder(resolve_model(a.model), device=a.device, dtype=a.dtype)
        emb = enc.encode(a.texts, prompt=a.prompt, dim=a.dim)
    for text, e in zip(a.texts, emb):
        print(json.dumps({"text": text, "prompt": a.prompt, "dim": len(e), "embedding": [round(v, 6) for v in e.tolist()]}))
    if len(a.texts) > 1:
        print_similarity(a.texts, emb @ emb.T)



def print_similarity(texts, sim):
    names = [t if len(t) <= 24 else t[:21] + "..." for t in texts]
    w = max(len(n) for n in names)
    print("cosine similarity", file=sys.stderr)
    for n, row in zip(names, sim.tolist()):
        print(f"  {n:<{w}}  " + "  ".join(f"{v:6.4f}" for v in row), file=sys.stderr)


def resolve_model(model: str) -> Path:
    from nomic_moe_files.hub import resolve_source

    return resolve_source(model)


def cmd_synth(a):
    from nomic_moe_conversion.synthetic import make_published_checkpoint, real_size_shape

    shape = real_size_shape() if a.real_size else {}
    t0 = time.time()
    # at the real size, initializer-scale weights: a stable network like a trained one (see random_weights)
    folder = make_published_checkpoint(a.out, seed=a.seed, weight_std=0.02 if a.real_size else None, **shape)
    print(f"wrote a random checkpoint in the published layout to {folder} ({time.time() - t0:.1f}s)", file=sys.stderr)


def cmd_bench(a):
    from nomic_moe_inference.bench import bench

    sort = {"arrival": (False,), "sorted": (True,), "both": (False, True)}[a.batching]
    if a.latency:
        from nomic_moe_inference.latency import latency_bench

        latency_bench(dtypes=a.dtypes.split(",") if a.dtypes else None, threads=a.threads or 2, repeats=a.latency_repeats,
                             llama_cpp=a.llama_cpp, out=a.out, isa=a.cpu)
        return None
    bench(device=a.device, dtypes=(a.dtypes or "float32,bfloat16").split(","), n_texts=a.texts, batch_size=a.batch_size, threads=a.threads,
          backends=a.backends.split(",") if a.backends else None, sorted_batches=sort, upstream=not a.no_upstream, out=a.out,
          repeats=a.repeats)


def cmd_export_onnx(a):
    from nomic_moe_conversion.onnx_export import export_onnx

    variants = tuple(a.variants.split(","))
    report = export_onnx(resolve_model(a.model_dir), exporter=a.exporter, variants=variants, force=a.force, strict=a.strict)
    print(json.dumps(report, indent=2))
    if report["left_out"]:
        names = ", ".join(f"{e['file']} ({e['measured']})" for e in report["left_out"])
        print(f"exported WITHOUT optional file(s): {names} (--strict makes this fatal)", file=sys.stderr)
        return EXIT_PARTIAL
    print("export complete", file=sys.stderr)


def cmd_upcycle(a):
    from nomic_moe_conversion.upcycle import upcycle

    upcycle(a.dense, a.out, experts=a.experts, top_k=a.top_k, every=a.every, renormalize=a.renormalize,
            bias=a.bias, seed=a.seed, tokenizer=a.tokenizer, force=a.force)


def cmd_bench_onnx(a):
    from nomic_moe_inference.bench import bench_onnx

    bench_onnx(resolve_model(a.model_dir), files=a.files.split(","), provider=a.provider, torch_dtypes=a.torch_dtypes.split(","),
               n_texts=a.texts, batch_size=a.batch_size, threads=a.threads, out=a.out, sort=a.batching == "sorted")


def cmd_release(a):
    from nomic_moe_conversion.release import release

    result = release(a.src, a.out, repo_id=a.repo_id, push_to=a.push, dry_run=a.dry_run, force=a.force, exporter=a.exporter,
                     results_md=a.results, synthetic=a.synthetic, private=a.private, layout_name=a.layout,
                     published_revision=a.published_revision, strict=a.strict)
    print(result.summary(), file=sys.stderr)
    return 0 if result.complete else EXIT_PARTIAL


def find_real_checkpoint():
    """The published checkpoint from the local Hub cache, or None. Never goes to the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(PUBLISHED_REPO, local_files_only=True))
    except Exception:
        return None


def cmd_demo(a):
    from nomic_moe_inference.encoder import Encoder
    from nomic_moe_conversion.release import release
    from nomic_moe_conversion.synthetic import make_published_checkpoint

    work = Path(a.workdir)
    src = Path(a.src) if a.src else find_real_checkpoint()
    synthetic = src is None
    if synthetic:
        print(
            f"note: {PUBLISHED_REPO} is not in the local Hub cache, so this demo runs on a SMALL RANDOM "
            "checkpoint in the published layout with a small trained tokenizer. Its weights are synthetic: "
            "the pipeline is real, the similarities are meaningless.",
            file=sys.stderr,
        )
        src = make_published_checkpoint(work / "synthetic-source", seed=0)
    else:
        print(f"using the checkpoint at {src}", file=sys.stderr)
    out = release(str(src), str(work / "release"), force=True, synthetic=synthetic).folders["main"]
    card = (out / "README.md").read_text().split("---\n", 2)[-1].strip().splitlines()
    print("\nmodel card (first lines):")
    for line in card[:14]:
        print("  " + line)
    enc = Encoder(out)
    emb = enc.encode(CARD_EXAMPLES, prompt="passage")
    cos = float(emb[0] @ emb[1])
    print_similarity([f"passage: {t}" for t in CARD_EXAMPLES], emb @ emb.T)
    print(f"\ncosine('Hello!', '¡Hola!') with the passage prompt: {cos:.4f}" + ("  (real model: 0.9118)" if not synthetic else "  (synthetic weights)"))
    q = enc.encode(["What food did they eat?"], prompt="query")
    d = enc.encode(["The settlers ate bread and fish.", "Thunderstorms are expected today."], prompt="document")
    print(f"query vs documents: {[round(v, 4) for v in (q @ d.T)[0].tolist()]}")
    print(f"release folder, ready to upload (nomic-moe release ... --push ORG/NAME): {out}")


def cmd_embed(a):
    from nomic_moe_inference.corpus.job import embed_corpus

    embed_corpus(a.model, a.input, a.output, engine=a.engine, text_column=a.text_column, id_column=a.id_column,
                 prompt=a.prompt, dim=a.dim, dtype=a.dtype, onnx=a.onnx, batch_tokens=a.batch_tokens, part_rows=a.part_rows,
                 on_bad_rows=a.on_bad_rows, device=a.device, threads=a.threads, replicas=a.replicas,
                 cpus_per_replica=a.cpus_per_replica)


def cmd_finetune(a):
    from nomic_moe_training.finetune import finetune

    finetune(a.model, a.train, a.out, eval_file=a.eval, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, matryoshka=a.matryoshka,
             hard_negatives=a.hard_negatives, hard_negative_margin=a.hard_negative_margin, aux_loss_coef=a.aux_loss_coef, bf16=a.bf16, max_steps=a.max_steps, resume=a.resume,
             cached_batch=a.cached_batch, gradient_checkpointing=a.gradient_checkpointing, save_steps=a.save_steps,
             logging_steps=a.logging_steps, seed=a.seed, device=a.device, force=a.force)


def cmd_serve(a):
    from nomic_moe_serving.server import serve
    from nomic_moe_serving.settings import Settings

    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: binding {a.host}: the server is reachable from other machines"
              + ("" if a.api_key else " and has no --api-key"), file=sys.stderr)
    return serve(Settings(model=a.model, host=a.host, port=a.port, served_model_name=a.served_model_name, dtype=a.dtype,
                          device=a.device, onnx=a.onnx, provider=a.provider, threads=a.threads, cuda_graphs=a.cuda_graphs,
                          model_nice=a.model_nice, max_batch_tokens=a.max_batch_tokens,
                          batch_seconds=a.batch_seconds, bulk_share=a.bulk_share, query_batch_tokens=a.query_batch_tokens,
                          max_queue_tokens=a.max_queue_tokens, query_tokens=a.query_tokens,
                          request_timeout=a.request_timeout, api_key=a.api_key or os.environ.get("NOMIC_MOE_API_KEY"),
                          engine=a.engine, replicas=a.replicas, cpus_per_replica=a.cpus_per_replica))


def cmd_doctor(a):
    from nomic_moe_inference.doctor import print_report, report

    r = report(a.capability, a.dtype, a.compile, cpu=a.cpu)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print_report(r)
    if a.compile and not all(c["ok"] for c in r["compiled"]):
        return 1


def build_parser():
    p = argparse.ArgumentParser(prog="nomic-moe", description="Nomic Embed v2 MoE: convert, verify, encode.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="published checkpoint -> our Hub-ready format, verified")
    c.add_argument("src", help="checkpoint folder or Hub repo id (the local Hub cache works offline)")
    c.add_argument("out", help="output folder (written atomically)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast the weights (default: keep)")
    c.add_argument("--tokenizer", help="folder with the tokenizer, if SRC has none")
    c.add_argument("--force", action="store_true", help="replace OUT if it exists")
    c.add_argument("--no-verify", action="store_true", help="skip the comparison with the reference")
    c.add_argument("--layout", choices=["ours", "published"], default="ours",
                   help="ours: model_type nomic_moe (default, safe with transformers 5); published: nomic_bert, what TEI, vLLM and llama.cpp read")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("encode", help="print embeddings as JSON lines, and their cosine table")
    e.add_argument("model", help="converted model folder or Hub repo id")
    e.add_argument("texts", nargs="+")
    e.add_argument("--prompt", help="prompt name: query, document, passage, classification, clustering, ...")
    e.add_argument("--dim", type=int, help="Matryoshka dimension (768 or 256), re-normalised")
    e.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto", "int8"], default="float32",
                   help="float32 (exact, default); auto: the fastest float this device computes natively; int8: the CPU's int8 kernels")
    e.add_argument("--onnx", nargs="?", const="model.onnx", metavar="FILE",
                   help="run ONNX Runtime on onnx/FILE instead of PyTorch (default model.onnx)")
    e.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider, with --onnx")
    e.set_defaults(func=cmd_encode)

    s = sub.add_parser("synth", help="write a random checkpoint in the published layout (tests, benchmarks)")
    s.add_argument("out")
    s.add_argument("--real-size", action="store_true", help="the published shapes (475M parameters, 1.8 GB)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("bench", help="MoE speed: upstream-style path vs our backends vs the GEMM limit")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtypes", help="comma list (default float32,bfloat16; with --latency: every dtype this CPU runs, int8 always)")
    b.add_argument("--dtype", dest="dtypes", help="one dtype (float32, bfloat16, float16, int8)")
    b.add_argument("--latency", action="store_true",
                   help="one-query latency: p50/p99 of 32- and 128-token queries per dtype against the floor measured in the same run")
    b.add_argument("--latency-repeats", type=int, default=50, help="with --latency: timed queries per length and dtype")
    b.add_argument("--llama-cpp", action="store_true", help="with --latency: also llama-embedding f32/f16/q8_0 (optional; builds llama.cpp, ~7 min)")
    b.add_argument("--cpu", choices=["avx2", "avx512", "avx512_bf16", "amx"], help="with --latency: the dtypes of another ISA's row")
    b.add_argument("--texts", type=int, default=64, help="texts in the fixed workload")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--threads", type=int)
    b.add_argument("--backends", help="comma list (default: all that run on the device)")
    b.add_argument("--batching", choices=["arrival", "sorted", "both"], default="both")
    b.add_argument("--no-upstream", action="store_true")
    b.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every path; the best counts")
    b.add_argument("--out", help="write the results as JSON here")
    b.set_defaults(func=cmd_bench)

    o = sub.add_parser("export-onnx", help="write MODEL_DIR/onnx/ (exact, fused, fp16, int8), validated")
    o.add_argument("model_dir")
    o.add_argument("--exporter", choices=["auto", "optimum", "torch"], default="auto",
                   help="auto: optimum's main_export where optimum is installed, else torch.onnx")
    o.add_argument("--variants", default="model,fused,fp16,int8")
    o.add_argument("--force", action="store_true", help="replace an existing onnx/ folder")
    o.add_argument("--strict", action="store_true", help="fail if an optional variant misses its bound (default: leave it out, exit 3)")
    o.set_defaults(func=cmd_export_onnx)

    u = sub.add_parser("upcycle", help="dense checkpoint -> MoE whose experts start as copies of the dense MLP")
    u.add_argument("dense", help="dense checkpoint: published (nomic-bert-2048 style) layout or ours; folder or repo id")
    u.add_argument("out")
    u.add_argument("--experts", type=int, default=8)
    u.add_argument("--top-k", type=int, default=2)
    u.add_argument("--every", type=int, default=2, help="layer i is MoE iff i %% every == 1")
    u.add_argument("--renormalize", action="store_true", help="renormalise the top-k router weights")
    u.add_argument("--bias", choices=["zero", "dense"], default="zero",
                   help="shared expert bias: zero (the paper) or the dense fc2 bias (exact start with --renormalize)")
    u.add_argument("--seed", type=int, default=0, help="router initialisation seed")
    u.add_argument("--tokenizer")
    u.add_argument("--force", action="store_true")
    u.set_defaults(func=cmd_upcycle)

    bo = sub.add_parser("bench-onnx", help="ONNX Runtime files against PyTorch on the same workload")
    bo.add_argument("model_dir", help="a converted folder with onnx/ (nomic-moe export-onnx)")
    bo.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    bo.add_argument("--files", default="model.onnx,model_fused.onnx,model_qint8_avx512.onnx")
    bo.add_argument("--torch-dtypes", default="float32,bfloat16")
    bo.add_argument("--texts", type=int, default=64)
    bo.add_argument("--batch-size", type=int, default=32)
    bo.add_argument("--threads", type=int)
    bo.add_argument("--batching", choices=["arrival", "sorted"], default="arrival")
    bo.add_argument("--out")
    bo.set_defaults(func=cmd_bench_onnx)

    r = sub.add_parser("release", help="convert + ONNX + verify + model card: a Hub-ready folder, optionally uploaded")
    r.add_argument("src", help="published-layout or our-format checkpoint; folder or repo id")
    r.add_argument("out")
    r.add_argument("--push", metavar="ORG/NAME", help="upload OUT to this Hub repo (token from HF_TOKEN or the login)")
    r.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    r.add_argument("--repo-id", default="nomic-ai/nomic-embed-text-v2-moe", help="the repo id the model card's snippets use")
    r.add_argument("--exporter", choices=["auto", "optimum", "torch"], default="auto")
    r.add_argument("--results", help="benchmarks/RESULTS.md to take the speed table from")
    r.add_argument("--synthetic", action="store_true", help="say in the card that the weights are random")
    r.add_argument("--private", action="store_true")
    r.add_argument("--force", action="store_true")
    r.add_argument("--layout", choices=["ours", "published", "both"], default="ours",
                   help="ours (nomic_moe, default), published (nomic_bert: TEI, vLLM, llama.cpp), or both: OUT/main and OUT/REVISION")
    r.add_argument("--published-revision", default="nomic-bert", metavar="REVISION",
                   help="with --layout both: the Hub branch for the published layout (default nomic-bert)")
    r.add_argument("--strict", action="store_true",
                   help="fail if an optional ONNX variant misses its bound (default: leave it out, say so, exit 3)")
    r.set_defaults(func=cmd_release)

    em = sub.add_parser("embed", help="embed a corpus (JSON lines / parquet / CSV) into parquet parts, resumable, exactly once")
    em.add_argument("model", help="model folder or Hub repo id")
    em.add_argument("input", help="a .jsonl/.parquet/.csv file, a folder of them, or a glob (quote it)")
    em.add_argument("output", help="output folder: part-NNNNN.parquet (id, embedding) + manifest.json; rerun to resume")
    em.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or Ray Data (RAY_ADDRESS joins a cluster)")
    em.add_argument("--text-column", default="text")
    em.add_argument("--id-column", default="id")
    em.add_argument("--prompt", default="document", help="prompt name (default document; query for queries; none for no prompt)")
    em.add_argument("--dim", type=int, help="Matryoshka dimension (768 or 256), re-normalised")
    em.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "auto", "int8"], default="float32",
                    help="auto: the fastest float this device computes natively; int8: the CPU's int8 kernels (nomic-moe doctor)")
    em.add_argument("--onnx", metavar="FILE", help="run ONNX Runtime on onnx/FILE instead of PyTorch")
    em.add_argument("--batch-tokens", type=int, default=8192, help="real tokens per batch (default 8192)")
    em.add_argument("--part-rows", type=int, default=10000, help="rows per output part, the unit of resumption (default 10000)")
    em.add_argument("--on-bad-rows", choices=["refuse", "skip"], default="refuse",
                    help="refuse (default): name the bad rows and embed nothing; skip: write them to OUTPUT/errors.jsonl and go on")
    em.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    em.add_argument("--threads", type=int, help="torch / ONNX Runtime threads per replica")
    em.add_argument("--replicas", type=int, help="Ray: model replicas (default one per GPU, or per --cpus-per-replica cores)")
    em.add_argument("--cpus-per-replica", type=int, help="Ray without GPUs: cores per replica (default up to 4)")
    em.set_defaults(func=cmd_embed)

    ft = sub.add_parser("finetune", help="fine-tune on (query, positive[, negatives]) pairs: InfoNCE, Matryoshka, hard negatives, MoE balance")
    ft.add_argument("model", help="model folder (our layout or published) or Hub repo id")
    ft.add_argument("train", help="JSON lines or parquet with query, positive and optionally negatives (a list)")
    ft.add_argument("out", help="output model folder (our layout; nomic-moe release accepts it)")
    ft.add_argument("--eval", help="held-out pairs, same format (default: a 10%% slice of TRAIN, at most 1000 rows)")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--batch-size", type=int, default=32, help="in-batch negatives grow with it (the paper: 256)")
    ft.add_argument("--lr", type=float, default=2e-5)
    ft.add_argument("--matryoshka", metavar="DIMS", help="comma list (default 768,256)")
    ft.add_argument("--hard-negatives", type=int, default=0, metavar="K", help="mine K hard negatives per query with the model")
    ft.add_argument("--hard-negative-margin", type=float, default=0.05, metavar="M",
                    help="pass over candidates scoring above (1 - M) x the positive's score: likely false negatives (0: none)")
    ft.add_argument("--aux-loss-coef", type=float, default=0.0, help="load-balancing loss weight (default 0, as the paper fine-tunes)")
    ft.add_argument("--bf16", action="store_true", help="bf16 autocast")
    ft.add_argument("--max-steps", type=int)
    ft.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint (OUT.training/)")
    ft.add_argument("--cached-batch", type=int, metavar="N", help="GradCache: large batches in mini-batches of N")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (what --resume continues from)")
    ft.add_argument("--logging-steps", type=int, default=10)
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    ft.add_argument("--force", action="store_true", help="replace OUT")
    ft.set_defaults(func=cmd_finetune)

    sv = sub.add_parser("serve", help="an OpenAI- and TEI-compatible embedding endpoint (token-budget batching, query lane)")
    sv.add_argument("model", help="model folder or Hub repo id")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--served-model-name", help="the name clients send as `model` (default: the folder name or repo id)")
    sv.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, int8, or auto (what this CPU/GPU runs best)")
    sv.add_argument("--device", default="cpu", help="PyTorch device (cpu, cuda)")
    sv.add_argument("--onnx", metavar="FILE", help="serve onnx/FILE with ONNX Runtime instead of PyTorch")
    sv.add_argument("--provider", choices=["cpu", "cuda"], default="cpu", help="ONNX Runtime provider, with --onnx")
    sv.add_argument("--threads", type=int, help="torch / ONNX Runtime threads")
    sv.add_argument("--model-nice", type=int, default=5,
                    help="run the model's threads this much nicer than the HTTP, tokenising and other threads, so that "
                         "these are not queued behind it on a busy CPU (Linux, CPU models; default 5, 0 = equal)")
    sv.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                    help="on CUDA, run short batches eagerly too (default: captured CUDA graphs, launch-bound otherwise)")
    sv.add_argument("--max-batch-tokens", type=int, help="real tokens per forward pass (default: sized at warm-up to --batch-seconds)")
    sv.add_argument("--batch-seconds", type=float,
                    help="target time of one batch when sizing the budget (default 4 with PyTorch, where queries run between two "
                         "steps of half a layer of a bulk batch; 1 with --onnx, where a query waits for the batch ahead of it)")
    sv.add_argument("--bulk-share", type=float, default=0.75,
                    help="share of model time bulk work keeps while queries come back to back (default 0.75; 0 = queries always first)")
    sv.add_argument("--query-batch-tokens", type=int,
                    help="most tokens in one batch of queries (default: what the CPU kernel runs in one call for every "
                         "layer, 128, where it does; 0 = the whole --max-batch-tokens)")
    sv.add_argument("--max-queue-tokens", type=int, help="tokens the queue may hold before 429 (default 32 batches)")
    sv.add_argument("--query-tokens", type=int, default=256, help="requests up to this many tokens go in the query lane (default 256)")
    sv.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take in all (504 after)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set NOMIC_MOE_API_KEY)")
    sv.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or Ray Serve replicas (RAY_ADDRESS joins a cluster)")
    sv.add_argument("--replicas", type=int, help="Ray: replicas (default one per GPU, or per --cpus-per-replica cores)")
    sv.add_argument("--cpus-per-replica", type=int, help="Ray without GPUs: cores per replica (default up to 4)")
    sv.set_defaults(func=cmd_serve)

    dr = sub.add_parser("doctor", help="what will run here (attention kernel, expert backend) and why")
    dr.add_argument("--capability", metavar="MAJOR.MINOR", help="simulate a CUDA GPU (7.5 T4, 8.0 A100, 8.9 L4, 9.0 H100)")
    dr.add_argument("--cpu", choices=["avx2", "avx512", "avx512_bf16", "amx"], help="show another CPU's choices (its ISA)")
    dr.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                    help="auto (default): what --dtype auto loads on that device (a simulated one included)")
    dr.add_argument("--compile", action="store_true", help="compile each Triton kernel for that architecture, here on the CPU")
    dr.add_argument("--json", action="store_true", help="one JSON object")
    dr.set_defaults(func=cmd_doctor)

    d = sub.add_parser("demo", help="release (convert, ONNX, verify, card) and encode the model card's examples")
    d.add_argument("src", nargs="?", help="checkpoint folder (default: the Hub cache, else a synthetic one)")
    d.add_argument("--workdir", default=os.environ.get("NOMIC_MOE_DEMO_DIR", ".demo"))
    d.set_defaults(func=cmd_demo)
    return p


def report_bug(e: BaseException) -> None:
    """An exception that is not a UserError is our bug: the traceback, and how to report it."""
    import platform
    import traceback

    traceback.print_exc()
    versions = []
    for name in ("torch", "transformers", "sentence_transformers", "onnxruntime"):
        try:
            versions.append(f"{name} {__import__(name).__version__}")
        except Exception:
            pass
    try:
        from importlib.metadata import version

        ours = version("nomic-embed-moe")
    except Exception:
        ours = "unknown"
    print(
        f"\nnomic-moe hit an unexpected error ({type(e).__name__}). This is a bug in nomic-moe, not something you did.\n"
        "Please report it at the project's issue tracker with the command you ran, the traceback above and these\n"
        f"versions: nomic-embed-moe {ours}, Python {platform.python_version()}, {', '.join(versions)}",
        file=sys.stderr,
    )


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last resort: say it is ours and how to report it
        report_bug(e)
        return EXIT_BUG
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
