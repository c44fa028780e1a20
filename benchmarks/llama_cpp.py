"""llama.cpp's converter and `llama-embedding`, built from the llama-cpp-python sdist on PyPI, as a harness.

    prepare(cache)            downloads the sdist (its vendor/llama.cpp is llama.cpp's source), makes a
                              venv for convert_hf_to_gguf.py, builds llama-embedding for the CPU
                              (about 7 minutes on 2 cores, once; later calls reuse the cache)
    to_gguf(tools, folder, out)   a published-layout folder -> GGUF (f32, for parity)
    embed(tools, gguf, texts)     mean-pooled, L2-normalised embeddings from llama-embedding

Used by tests/test_llama_cpp.py (opt-in) and benchmarks/engine_parity.py. Nothing of llama.cpp is
kept in this repository; the cache folder lives outside it (default ~/.cache/nomic-moe/llama.cpp).
"""

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "0.3.36"  # llama-cpp-python; vendors llama.cpp 0c1e570
CONVERTER_DEPS = [
    "numpy~=2.2.6",
    "transformers==4.57.6",  # the converter's own pin (requirements-convert_legacy_llama.txt)
    "protobuf>=4.21,<5",
    "sentencepiece==0.2.1",  # 0.2.3's generated protobuf code needs protobuf >= 7, which the pin above excludes
]
SEPARATOR = "<#nomic-moe-sep#>"


def log(msg):
    print(f"[llama.cpp] {msg}", file=sys.stderr, flush=True)


def default_cache() -> Path:
    return Path(os.environ.get("NOMIC_MOE_LLAMA_CPP_DIR", Path.home() / ".cache" / "nomic-moe" / "llama.cpp"))


@dataclass
class Tools:
    source: Path  # vendor/llama.cpp
    python: Path  # the converter's venv
    embedding: Path  # build/bin/llama-embedding
    server: Path = None  # build/bin/llama-server (serve_bench's anchor), when prepare() built it


def _run(cmd, **kw):
    t0 = time.time()
    log(" ".join(str(c) for c in cmd)[:200])
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    log(f"  done in {time.time() - t0:.0f}s")
    return r


def prepare(cache: Path = None, jobs: int = 2, server: bool = False) -> Tools:
    """``server``: build llama-server too (the HTTP anchor of benchmarks/serve_bench.py)."""
    cache = Path(cache or default_cache())
    cache.mkdir(parents=True, exist_ok=True)
    unpacked = cache / f"llama_cpp_python-{VERSION}"
    source = unpacked / "vendor" / "llama.cpp"
    if not source.exists():
        sdist = cache / "sdist"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
              f"llama-cpp-python=={VERSION}", "-d", sdist])
        with tarfile.open(next(sdist.glob("llama_cpp_python-*.tar.gz"))) as tar:
            tar.extractall(cache, filter="data")
    venv = cache / "venv"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        _run([sys.executable, "-m", "venv", venv])
        _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"])  # the CPU build from this machine's disk
        _run([python, "-m", "pip", "install", "-q", source / "gguf-py", *CONVERTER_DEPS])
        (venv / ".ready").touch()
    build = cache / "build"
    embedding, server_bin = build / "bin" / "llama-embedding", build / "bin" / "llama-server"
    wanted = {"llama-embedding": embedding, **({"llama-server": server_bin} if server else {})}
    targets = [t for t, path in wanted.items() if not path.exists()]
    if targets:
        if not (build / "CMakeCache.txt").exists():
            _run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                  "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF"])
        log(f"building {' '.join(targets)} with -j{jobs} (about 7 minutes on 2 cores for the first, less for the next)")
        _run(["cmake", "--build", build, "--target", *targets, f"-j{jobs}"])
    return Tools(source, python, embedding, server_bin if server_bin.exists() else None)


def to_gguf(tools: Tools, folder: Path, out: Path, outtype: str = "f32") -> Path:
    _run([tools.python, tools.source / "convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype])
    return out


def embed(tools: Tools, gguf: Path, texts, threads: int = 2, tries: int = 12) -> np.ndarray:
    """[len(texts), H] float32, mean pooling, L2-normalised.

    llama-embedding at this commit prints its results through an asynchronous logger that it never
    flushes before exiting, so stdout is sometimes empty or cut short while the exit code is 0
    (seen here in about 3 of 8 runs). The output is valid only if it parses and holds every text;
    otherwise the same deterministic command runs again.
    """
    cmd = [str(tools.embedding), "-m", str(gguf), "-t", str(threads), "-fa", "off", "--no-escape", "--pooling", "mean",
           "--embd-normalize", "2", "--embd-output-format", "json", "--embd-separator", SEPARATOR, "-b", "4096",
           "-p", SEPARATOR.join(texts)]
    for attempt in range(tries):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"llama-embedding failed ({r.returncode}): {r.stderr[-2000:]}")
        try:
            data = json.loads(r.stdout)["data"]
        except (json.JSONDecodeError, KeyError):
            continue
        if len(data) == len(texts):
            return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)
    raise RuntimeError(f"llama-embedding gave no complete output in {tries} runs")
