"""Fills template.md from measured data only: the weights, the verification report, RESULTS.md."""

import datetime
import json
import re
from pathlib import Path
from string import Template
from typing import Optional

TEMPLATE = Path(__file__).with_name("template.md")
SPEED_START, SPEED_END = "<!-- card:speed:start -->", "<!-- card:speed:end -->"
LANGUAGES = [
    "multilingual", "en", "es", "fr", "de", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sv", "da", "no", "fi",
    "tr", "ar", "fa", "he", "hi", "bn", "ur", "ta", "te", "mr", "zh", "ja", "ko", "vi", "th", "id", "ms",
    "ro", "hu", "el", "bg", "sr", "hr", "sk", "sl", "lt", "lv", "et", "sw", "af",
]


def count_parameters(model_dir: Path):
    """(total, active per token), counted from the safetensors headers and config.json."""
    from safetensors import safe_open

    cfg = json.loads((model_dir / "config.json").read_text())
    total = experts = 0
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
            if key.endswith((".experts.mlp.w1", ".experts.mlp.w2")):
                experts += n
    idle_fraction = 1 - cfg["num_experts_per_tok"] / cfg["num_experts"]
    return total, total - int(round(experts * idle_fraction))


def speed_section(results_md: Optional[Path]) -> str:
    if results_md is None or not results_md.exists():
        return "No speed measurements were recorded with this release."
    text = results_md.read_text()
    m = re.search(re.escape(SPEED_START) + r"(.*?)" + re.escape(SPEED_END), text, re.S)
    if not m:
        return "No speed measurements were recorded with this release."
    return m.group(1).strip() + "\n\nFull tables, machines and dates: `benchmarks/RESULTS.md` in the source repository."


def verification_table(report: dict) -> str:
    rows = ["| path | min cosine to reference | max abs diff | bound | result |", "|---|---|---|---|---|"]
    for r in report["paths"]:
        diff = "" if r.get("max_abs") is None else f"{r['max_abs']:.1e}"
        bound = r["bound"] + (f"; routing flips: {r['routing_flips']}" if "routing_flips" in r else "")
        rows.append(f"| {r['path']} | {r['min_cosine']:.6f} | {diff} | {bound} | {'pass' if r['ok'] else 'FAIL'} |")
    return "\n".join(rows)


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M ({n:,})" if n >= 1e6 else f"{n:,}"


def render_card(model_dir, verification: dict, repo_id: str, results_md=None, synthetic: bool = False,
                base_model: str = "nomic-ai/nomic-xlm-2048", title: Optional[str] = None) -> str:
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    st = json.loads((model_dir / "config_sentence_transformers.json").read_text())
    max_len = json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
    total, active = count_parameters(model_dir)
    moe_layers = sum(1 for i in range(cfg["num_hidden_layers"]) if cfg["moe_every_n_layers"] and i % cfg["moe_every_n_layers"] == 1)
    hidden = cfg["hidden_size"]
    note = (
        "> **Synthetic weights.** This repository was built from a random checkpoint to test the release "
        "pipeline; its embeddings mean nothing.\n\n" if synthetic else ""
    )
    values = dict(
        title=title or repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        languages="\n".join(f"- {lang}" for lang in LANGUAGES),
        synthetic_note=note,
        total_params=human(total),
        active_params=human(active),
        layers=cfg["num_hidden_layers"],
        hidden=hidden,
        heads=cfg["num_attention_heads"],
        experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        moe_layers=moe_layers,
        matryoshka=", ".join(str(d) for d in (hidden, 256) if d <= hidden),
        max_seq_length=max_len,
        rope_theta=int(cfg["rope_theta"]),
        prompt_rows="\n".join(f"| `{k}` | `{v}` |" for k, v in st["prompts"].items()),
        verification_table=verification_table(verification),
        speed=speed_section(Path(results_md) if results_md else None),
        date=datetime.date.today().isoformat(),
    )
    return Template(TEMPLATE.read_text()).substitute(values)


def python_snippets(card: str):
    """(requirement or None, code) for every ```python block, in order; used by the tests."""
    out = []
    for m in re.finditer(r"(?:<!-- requires: ([\w.]+) -->\n)?```python\n(.*?)```", card, re.S):
        out.append((m.group(1), m.group(2)))
    return out
