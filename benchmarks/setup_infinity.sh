#!/usr/bin/env bash
# The infinity anchor for serve_bench.py, in a venv of its own (it needs sentence-transformers < 4 and numpy < 2).
# Usage: benchmarks/setup_infinity.sh [VENV]   (default ~/.cache/nomic-moe/infinity-venv)
set -euo pipefail
VENV="${1:-$HOME/.cache/nomic-moe/infinity-venv}"
if [ -x "$VENV/bin/infinity_emb" ]; then echo "$VENV"; exit 0; fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check "infinity-emb[server,torch]==0.0.78" "transformers==4.57.*" "numpy<2" "sentence-transformers<4"
echo "$VENV"
