"""`nomic-moe embed MODEL INPUT OUTPUT`: a corpus of texts -> parquet parts of (id, embedding), resumable, exactly once.

    1. check the model and the settings; lock OUTPUT (one job per folder)
    2. first run: read every row once, check it (ids unique, texts non-empty strings), cut the
       files into parts of --part-rows rows, write manifest.json; a rerun: compare the settings
       with the manifest's and refuse a different model, prompt, dim or dtype
    3. embed the parts not yet written, with the local engine or on Ray Data (engines share
       worker.PartEmbedder, so both give the same rows and the same numbers)
    4. check that every part holds its rows, and mark the manifest complete

OUTPUT/part-NNNNN.parquet hold the columns id and embedding (fixed-size list of float32, L2-
normalised). Every input id is in exactly one part, once. Bad rows are refused before any work
(default), or with --on-bad-rows skip written to OUTPUT/errors.jsonl and counted in the manifest.
"""

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from nomic_moe_files import checks
from nomic_moe_files.errors import UserError
from nomic_moe_files.hub import resolve_source

from . import inputs
from .worker import PartEmbedder, part_file, part_is_done

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
FORMAT = 1
# what defines the numbers in OUTPUT: a rerun with any of these changed is refused
IDENTITY = ("model", "model_revision", "prompt", "dim", "dtype", "onnx", "text_column", "id_column")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_revision(model_dir: Path) -> str:
    """The Hub commit of a cached snapshot, else a fingerprint of config.json and the weights' header and size."""
    if model_dir.parent.name == "snapshots":
        return model_dir.name
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    weights = model_dir / "model.safetensors"
    if weights.exists():
        with open(weights, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100 << 20)))
        h.update(str(weights.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:16]


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class Lock:
    """One embed job per OUTPUT folder: a second one is refused instead of writing the same parts."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"another embed job is writing {out_dir}", "wait for it to finish, or choose another OUTPUT") from None

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def settings_for(model: str, *, prompt, dim, dtype, onnx, text_column, id_column, batch_tokens, device, threads) -> dict:
    import torch

    model_dir = resolve_source(model)
    cfg = checks.model_folder(model_dir)
    prompts = checks.prompts(model_dir)
    if prompt not in (None, "none") and prompt not in prompts:
        raise UserError(f"unknown prompt {prompt!r}", f"use one of: {', '.join(sorted(prompts))}, or none")
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    if dim is not None and not 1 <= dim <= hidden:
        raise UserError(f"--dim {dim} is outside 1..{hidden}", "use 768 or 256 (the trained sizes)")
    if dtype not in ("float32", "bfloat16", "float16", "auto", "int8"):
        raise UserError(f"--dtype {dtype}", "use float32, bfloat16, float16, auto or int8")
    if onnx:
        onnx = onnx if "/" in onnx else f"onnx/{onnx}"
        checks.onnx_file(model_dir / onnx)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available() and not onnx:
        raise UserError("--device cuda, but torch sees no CUDA device", "use --device cpu")
    if not onnx:  # "auto" becomes the dtype it means here (the manifest records it); int8 refused where it cannot run
        from nomic_moe_inference.cpu import dtype_name, resolve_dtype

        dtype = dtype_name(resolve_dtype(dtype, device))
    if batch_tokens < 512:
        raise UserError(f"--batch-tokens {batch_tokens} is below one full text (512 tokens)", "use 8192 or more")
    return {
        "model": str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model, "model_dir": str(model_dir), "model_revision": model_revision(model_dir),
        "prompt": None if prompt in (None, "none") else prompt,
        "prefix": prompts.get(prompt, "") if prompt not in (None, "none") else "",
        "dim": dim or hidden, "dtype": "onnx" if onnx else dtype, "onnx": onnx,
        "text_column": text_column, "id_column": id_column, "batch_tokens": batch_tokens, "device": device, "threads": threads,
    }


def plan_parts(scans, part_rows: int):
    parts = []
    for fs in scans:
        bad = sorted(b[0] for b in fs.bad)
        for first, offset, line in fs.boundaries:
            end = min(first + part_rows, fs.rows)
            skip = [o for o in bad if first <= o < end]
            if end - first - len(skip) > 0:
                parts.append({"index": len(parts), "input": str(fs.path), "start": first, "end": end, "offset": offset, "line": line,
                              "rows": end - first - len(skip), "skip": skip})
    return parts


def describe_bad(scans, limit: int = 10) -> str:
    rows = [(fs.path, b) for fs in scans for b in fs.bad]
    shown = [f"{path.name}:{number} (id {rid!r}): {why}" for path, (_, number, rid, why) in rows[:limit]]
    more = f"; ... and {len(rows) - limit} more" if len(rows) > limit else ""
    return f"{len(rows)} bad row(s): " + "; ".join(shown) + more


def _input_fingerprint(files):
    return [{"path": str(f), "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in files]


def _progress(total_rows: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total_rows, unit="row", desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=0.5,
                disable=os.environ.get("NOMIC_MOE_NO_PROGRESS") == "1")


def embed_corpus(model: str, input_spec: str, output: str, *, engine: str = "local", text_column: str = "text",
                 id_column: str = "id", prompt: Optional[str] = "document", dim: Optional[int] = None, dtype: str = "float32",
                 onnx: Optional[str] = None, batch_tokens: int = 8192, part_rows: int = 10000, on_bad_rows: str = "refuse",
                 device: str = "auto", threads: Optional[int] = None, replicas: Optional[int] = None,
                 cpus_per_replica: Optional[int] = None) -> dict:
    t0 = time.time()
    if engine not in ("local", "ray"):
        raise UserError(f"--engine {engine}", "use local or ray")
    if on_bad_rows not in ("refuse", "skip"):
        raise UserError(f"--on-bad-rows {on_bad_rows}", "use refuse (default) or skip")
    if part_rows < 1:
        raise UserError(f"--part-rows {part_rows}", "use a positive number of rows, e.g. 10000")
    s = settings_for(model, prompt=prompt, dim=dim, dtype=dtype, onnx=onnx, text_column=text_column, id_column=id_column,
                     batch_tokens=batch_tokens, device=device, threads=threads)
    out = Path(output).expanduser().resolve()
    files = [f for f in inputs.resolve_inputs(input_spec) if out not in f.parents]  # OUTPUT may sit inside INPUT's folder
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file", "OUTPUT is a folder (of parquet parts)")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    s["output"] = str(out)
    lock = Lock(out)
    try:
        manifest = _open_or_plan(out, s, files, part_rows, on_bad_rows, created)
        manifest = _run(out, s, manifest, engine, replicas, cpus_per_replica)
    finally:
        lock.release()
    log(f"embedded {manifest['rows']['embedded']:,} rows into {len(manifest['parts'])} part(s) in {out} "
        f"({time.time() - t0:.1f}s); bad rows: {manifest['rows']['bad']}")
    return manifest


def _open_or_plan(out: Path, s: dict, files, part_rows: int, on_bad_rows: str, created: bool) -> dict:
    path = out / MANIFEST
    if path.exists():
        manifest = checks.read_json(path, "embed manifest", required=("settings", "parts", "inputs"))
        differ = [f"{k}: {manifest['settings'].get(k)!r} there, {s[k]!r} now" for k in IDENTITY if manifest["settings"].get(k) != s[k]]
        if differ:
            raise UserError(f"{out} holds embeddings made with other settings ({'; '.join(differ)})",
                            "rerun with the same settings to resume it, or choose a new OUTPUT folder")
        if manifest["inputs"] != _input_fingerprint(files):
            raise UserError(f"the input files changed since {out} was started (names, sizes or times differ)",
                            "embed the new input into a new OUTPUT folder")
        if manifest.get("part_rows") != part_rows or manifest.get("on_bad_rows") != on_bad_rows:
            raise UserError(f"{out} was started with --part-rows {manifest.get('part_rows')} --on-bad-rows {manifest.get('on_bad_rows')}",
                            "rerun with those to resume it")
        done = sum(part_is_done(out, p) for p in manifest["parts"])
        log(f"resuming {out}: {done} of {len(manifest['parts'])} parts already written")
        return manifest
    if any(p for p in out.iterdir() if p.name != ".lock"):
        raise UserError(f"{out} is not empty and holds no {MANIFEST}", "choose a new or empty OUTPUT folder")
    log(f"checking {len(files)} input file(s) (every row, before any work)")
    bar = _progress(0, "checking rows")
    try:
        scans, s["id_type"] = inputs.scan(files, s["text_column"], s["id_column"], part_rows, progress=bar.update)
        n_bad = sum(len(fs.bad) for fs in scans)
        if n_bad and on_bad_rows == "refuse":
            raise UserError(f"nothing was embedded: {describe_bad(scans)}",
                            f"fix those rows, or pass --on-bad-rows skip to write them to OUTPUT/{ERRORS} and embed the rest")
    except UserError:
        if created:  # refused before any work: leave no trace of this run
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    finally:
        bar.close()
    if n_bad:
        errors_tmp = out / f".{ERRORS}.tmp"
        with open(errors_tmp, "w") as f:
            for fs in scans:
                for _, number, rid, why in fs.bad:
                    f.write(json.dumps({"file": str(fs.path), "row": number, "id": rid, "problem": why}) + "\n")
        os.replace(errors_tmp, out / ERRORS)
        log(f"set aside {describe_bad(scans, 3)} -> {out / ERRORS}")
    manifest = {
        "format": FORMAT, "status": "running", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {k: s[k] for k in (*IDENTITY, "id_type", "prefix")},
        "part_rows": part_rows, "on_bad_rows": on_bad_rows,
        "inputs": _input_fingerprint(files),
        "rows": {"input": sum(fs.rows for fs in scans), "bad": n_bad, "embedded": 0, "truncated": 0},
        "errors_file": ERRORS if n_bad else None,
        "parts": plan_parts(scans, part_rows),
    }
    _write_json(out / MANIFEST, manifest)
    return manifest


def _run(out: Path, s: dict, manifest: dict, engine: str, replicas, cpus_per_replica) -> dict:
    s["id_type"] = manifest["settings"]["id_type"]
    for stale in out.glob(".part-*.tmp-*"):  # a part interrupted mid-write
        stale.unlink(missing_ok=True)
    todo = [p for p in manifest["parts"] if not part_is_done(out, p)]
    stats = {"tokens": 0, "truncated": manifest["rows"].get("truncated", 0), "seconds": 0.0, "worker_seconds": 0.0}
    if todo:
        total = sum(p["rows"] for p in todo)
        bar = _progress(total, f"embedding ({engine})")
        started = time.time()

        def done(result):
            stats["tokens"] += result["tokens"]
            stats["truncated"] += result["truncated"]
            stats["worker_seconds"] += result["seconds"]
            bar.update(result["rows"])
            bar.set_postfix_str(f"{stats['tokens'] / max(time.time() - started, 1e-9):,.0f} tok/s", refresh=False)

        try:
            if engine == "local":
                worker = PartEmbedder(s)
                for part in todo:
                    done(worker.embed_part(part))
            else:
                from .ray_engine import run_on_ray

                run_on_ray(s, todo, done, replicas=replicas, cpus_per_replica=cpus_per_replica)
        except KeyboardInterrupt:
            written = sum(part_is_done(out, p) for p in manifest["parts"])
            log(f"\ninterrupted: {written} of {len(manifest['parts'])} parts are written; rerun the same command to finish")
            raise
        finally:
            bar.close()
        stats["seconds"] = time.time() - started
    missing = [p["index"] for p in manifest["parts"] if not part_is_done(out, p)]
    if missing:
        raise UserError(f"parts {missing[:10]} are missing or incomplete after the run", "rerun the same command to finish them")
    manifest["rows"]["embedded"] = sum(p["rows"] for p in manifest["parts"])
    manifest["rows"]["truncated"] = stats["truncated"]
    manifest["status"] = "complete"
    manifest["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    # seconds: the whole embedding phase (model load, Ray start-up included); worker_seconds: the parts themselves
    manifest["last_run"] = {"engine": engine, "parts": len(todo), "tokens": stats["tokens"], "seconds": round(stats["seconds"], 2),
                            "tokens_per_second": round(stats["tokens"] / stats["seconds"], 1) if stats["seconds"] else None,
                            "worker_seconds": round(stats["worker_seconds"], 2),
                            "worker_tokens_per_second": round(stats["tokens"] / stats["worker_seconds"], 1) if stats["worker_seconds"] else None}
    _write_json(out / MANIFEST, manifest)
    if stats["truncated"]:
        log(f"note: {stats['truncated']} text(s) reached 512 tokens and were truncated")
    return manifest


def read_output(output) -> "dict":
    """{id: embedding} of a finished OUTPUT (for tests and small corpora)."""
    import pyarrow.parquet as pq

    out = Path(output)
    manifest = checks.read_json(out / MANIFEST, "embed manifest")
    result = {}
    for p in manifest["parts"]:
        t = pq.read_table(str(part_file(out, p["index"])))
        for rid, vec in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist()):
            if rid in result:
                raise AssertionError(f"id {rid!r} appears twice in {out}")
            result[rid] = vec
    return result
