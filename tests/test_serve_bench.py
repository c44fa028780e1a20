"""benchmarks/serve_bench.py against our server on the tiny model: every scenario runs, its rows are
whole, and no request fails (the numbers themselves belong to RESULTS.md, at the real size)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("httpx")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_bench.py"


def test_every_scenario_runs_without_errors(ckpts, tmp_path):
    out = tmp_path / "serve_bench.json"
    env = dict(os.environ, NOMIC_MOE_CLI=f"{sys.executable} -m nomic_moe_cli")
    subprocess.run([sys.executable, str(BENCH), str(ckpts.converted()), "--servers", "ours:float32",
                    "--scenarios", "mixed,queries,documents,paced", "--query-clients", "2", "--doc-clients", "1",
                    "--seconds", "1", "--query-rate", "8", "--out", str(out)], env=env, check=True, timeout=600)
    rows = json.loads(out.read_text())
    got = {(r["scenario"], r["kind"]) for r in rows}
    assert got == {("mixed", "query"), ("mixed", "document"), ("queries x2", "query"), ("documents x1", "document"),
                   ("paced 8 q/s", "query"), ("paced 8 q/s", "document")}
    assert all(r["errors"] == 0 and r["requests"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    paced = next(r for r in rows if r["scenario"] == "paced 8 q/s" and r["kind"] == "query")
    assert 5 <= paced["requests"] <= 60  # ~24 arrivals in its 3 s, sent whether or not the ones before were answered
