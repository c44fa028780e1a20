#!/usr/bin/env bash
# The CPU benchmark of the routing issue: full-size model, 2 threads, fp32 and bf16, one run.
# Usage: benchmarks/cpu_bench.sh [extra nomic-moe bench args]   (writes benchmarks/out/cpu.json)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/out
exec .venv/bin/nomic-moe bench --device cpu --threads 2 --texts 64 --batch-size 32 --batching both \
  --out benchmarks/out/cpu.json "$@"
