"""Fills template.md from measured data only: the weights, the verification report, RESULTS.md."""

import datetime
import json
import re
from pathlib import Path
from string import Template
from typing import Optional

TEMPLATE = Path(__file__).with_name("template.md")
SPEED_START, SPEED_END = "<!-- card:speed:start -->", "<!-- card:speed:end -->"
PARITY_START, PARITY_END = "<!-- card:parity:start -->", "<!-- card:parity:end -->"
LANGUAGES = [
    "multilingual", "en", "es", "fr", "de", "it", "pt", "nl", "pl", "ru", "uk", "cs", "sv", "da", "no", "fi",
    "tr", "ar", "fa", "he", "hi", "bn", "ur", "ta", "te", "mr", "zh", "ja", "ko", "vi", "th", "id", "ms",
    "ro", "hu", "el", "bg", "sr", "hr", "sk", "sl", "lt", "lv", "et", "sw", "af",
]


def model_config(model_dir: Path) -> dict:
    """config.json of either layout, in our key names."""
    from nomic_moe_modeling.configuration_nomic_moe import NomicBertConfig, NomicMoEConfig

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    cls = NomicBertConfig if raw.get("model_type") == "nomic_bert" else NomicMoEConfig
    config = cls(**{k: v for k, v in raw.items() if k != "model_type"})
    names = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_experts", "num_experts_per_tok",
             "moe_every_n_layers", "rope_theta")
    return {k: getattr(config, k) for k in names}


def count_parameters(model_dir: Path):
    """(total, active per token), counted from the safetensors headers and config.json."""
    from safetensors import safe_open

    cfg = model_config(model_dir)
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


def results_section(results_md: Optional[Path], start: str, end: str, missing: str) -> str:
    """The part of benchmarks/RESULTS.md between two markers: the card quotes measurements, never writes its own."""
    if results_md is None or not results_md.exists():
        return missing
    m = re.search(re.escape(start) + r"(.*?)" + re.escape(end), results_md.read_text(), re.S)
    if not m:
        return missing
    return m.group(1).strip() + "\n\nFull tables, machines and dates: `benchmarks/RESULTS.md` in the source repository."


def speed_section(results_md: Optional[Path]) -> str:
    return results_section(results_md, SPEED_START, SPEED_END, "No speed measurements were recorded with this release.")


def parity_section(results_md: Optional[Path]) -> str:
    return results_section(results_md, PARITY_START, PARITY_END, "No cross-engine measurements were recorded with this release.")


def result_word(row: dict) -> str:
    return "pass" if row["ok"] else ("left out" if not row.get("required", True) else "FAIL")


def verification_table(report: dict) -> str:
    rows = ["| path | min cosine to reference | max abs diff | bound | result |", "|---|---|---|---|---|"]
    for r in report["paths"]:
        diff = "" if r.get("max_abs") is None else f"{r['max_abs']:.1e}"
        bound = r["bound"] + (f"; routing flips: {r['routing_flips']}" if "routing_flips" in r else "")
        rows.append(f"| {r['path']} | {r['min_cosine']:.6f} | {diff} | {bound} | {result_word(r)} |")
    return "\n".join(rows)


def left_out_note(report: dict) -> str:
    left = report.get("left_out") or []
    if not left:
        return ""
    rows = "\n".join(f"- `{e['file']}`: {e['measured']} (needs {e['bound']}; {e.get('stage', '')})" for e in left)
    return f"\n\n**Left out of this release** (optional files that missed their bound):\n\n{rows}"


NATIVE_TRAP = (
    "**Always pass `trust_remote_code=True`.** transformers 5 ships its own, dense-only `nomic_bert` "
    "model. Loaded without remote code, a `nomic_bert` folder (the published layout) silently becomes "
    "that dense model: every expert and router is dropped, SiLU replaces GELU, and the vectors reach "
    "cosine 0.18 to the true embedding, with only a warning table (measured with transformers 5.23). "
    "The default layout (`model_type` `nomic_moe`) cannot be mistaken that way: without remote code "
    "transformers refuses it."
)


def serving_section(repo_id: str, layout: str, revisions: dict) -> str:
    """Which revision each engine needs, and the commands, from the release's layouts."""
    ours = revisions.get("ours")
    pub = revisions.get("published")
    rev = lambda r: "" if r == "main" else f" --revision {r}"  # noqa: E731
    lines = [NATIVE_TRAP, "", "| you use | revision of this repo | layout |", "|---|---|---|"]
    for who in ("transformers, sentence-transformers, ONNX Runtime, optimum",):
        lines.append(f"| {who} | `{ours or pub}` | {'ours (`nomic_moe`)' if ours else 'published (`nomic_bert`)'} |")
    for who in ("text-embeddings-inference (TEI)", "vLLM", "llama.cpp / Ollama (GGUF)"):
        lines.append(f"| {who} | `{pub}` | published (`nomic_bert`) |" if pub else
                     f"| {who} | not in this repo: it needs the published layout (`nomic-moe release SRC OUT --layout published`) | |")
    if pub:
        lines += [
            "",
            "The engines read the published layout (`model_type` `nomic_bert`, GPT-2 style config keys, the "
            "upstream tensor names); its weights are byte-identical to the default layout's.",
            "",
            "```bash",
            "# TEI (GPU; the cpu-1.9 image serves onnx/model.onnx when the repo has one). TEI computes GELU with the",
            "# tanh approximation, so its vectors differ slightly from these (see the parity table in the verification).",
            f"docker run --gpus all -p 8080:80 ghcr.io/huggingface/text-embeddings-inference:cuda-1.9 --model-id {repo_id}{rev(pub)}",
            "",
            "# vLLM (pooling runner; the sentence-transformers files select mean pooling)",
            f"vllm serve {repo_id}{rev(pub)} --runner pooling --convert embed --trust-remote-code",
            "",
            "# llama.cpp: convert to GGUF, then embed (mean pooling, L2-normalised). llama.cpp drops the shared",
            "# expert bias, so its vectors differ slightly from these.",
            f"hf download {repo_id}{rev(pub)} --local-dir nomic-embed-published",
            "python llama.cpp/convert_hf_to_gguf.py nomic-embed-published --outtype f32 --outfile nomic-embed.gguf",
            'llama-embedding -m nomic-embed.gguf --pooling mean --embd-normalize 2 -p "search_query: What food did they eat?"',
            "",
            "# Ollama, from the same GGUF file",
            'printf "FROM ./nomic-embed.gguf\n" > Modelfile && ollama create nomic-embed-moe -f Modelfile',
            "```",
            "",
            "Prompts are not added by the engines: send `search_query: ...` and `search_document: ...` yourself.",
        ]
    return "\n".join(lines)


def human(n: int) -> str:
    return f"{n / 1e6:.1f}M ({n:,})" if n >= 1e6 else f"{n:,}"


def render_card(model_dir, verification: dict, repo_id: str, results_md=None, synthetic: bool = False,
                base_model: str = "nomic-ai/nomic-xlm-2048", title: Optional[str] = None, layout: str = "ours",
                revisions: Optional[dict] = None) -> str:
    model_dir = Path(model_dir)
    cfg = model_config(model_dir)
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
        left_out=left_out_note(verification),
        serving=serving_section(repo_id, layout, revisions or {layout: "main"}),
        speed=speed_section(Path(results_md) if results_md else None),
        parity=parity_section(Path(results_md) if results_md else None),
        date=datetime.date.today().isoformat(),
    )
    return Template(TEMPLATE.read_text()).substitute(values)


def python_snippets(card: str):
    """(requirement or None, code) for every ```python block, in order; used by the tests."""
    out = []
    for m in re.finditer(r"(?:<!-- requires: ([\w.]+) -->\n)?```python\n(.*?)```", card, re.S):
        out.append((m.group(1), m.group(2)))
    return out
