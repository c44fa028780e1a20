"""The published layout (model_type nomic_bert): what TEI, vLLM and llama.cpp read, loaded by our code."""

import hashlib
import json

import pytest
import torch

from engine_requirements import ROWS, Folder
from nomic_moe_conversion.convert import convert
from nomic_moe_conversion.synthetic import published_config

SHAPE = dict(num_experts=4, top_k=2, num_layers=4)
TEXTS = ["search_query: What food did they eat?", "search_document: The settlers ate bread and fish.", "¡Hola!", ""]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def both(ckpts, tmp_path_factory):
    ours = ckpts.converted(**SHAPE)
    published = convert(str(ckpts.source(**SHAPE)), str(tmp_path_factory.mktemp("pub") / "published"), layout_name="published")
    return ours, published


def test_published_config_has_every_upstream_key_and_points_at_our_code(both):
    _, pub = both
    cfg = json.loads((pub / "config.json").read_text())
    upstream = published_config(vocab_size=512)  # the keys of the upstream config.json (SPEC §3)
    missing = sorted(set(upstream) - set(cfg))
    assert missing == [], missing
    assert cfg["model_type"] == "nomic_bert" and cfg["architectures"] == ["NomicBertModel"]
    assert cfg["auto_map"] == {"AutoConfig": "configuration_nomic_moe.NomicBertConfig", "AutoModel": "modeling_nomic_moe.NomicBertModel"}
    for module in ("configuration_nomic_moe.py", "modeling_nomic_moe.py", "experts_nomic_moe.py"):
        assert (pub / module).exists()
    assert "id2label" not in cfg and "label2id" not in cfg


def test_weights_are_the_same_bytes_in_both_layouts(both):
    ours, pub = both
    assert sha256(ours / "model.safetensors") == sha256(pub / "model.safetensors")


@pytest.mark.parametrize("which", ["automodel", "sentence_transformers"])
def test_published_layout_loads_with_our_model_and_gives_the_same_embeddings(both, which):
    ours, pub = both
    if which == "automodel":
        from transformers import AutoModel, AutoTokenizer

        outs = []
        for folder in (ours, pub):
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
            model = AutoModel.from_pretrained(str(folder), trust_remote_code=True).eval()
            batch = tok(TEXTS, padding=True, return_tensors="pt")
            with torch.no_grad():
                outs.append(model(**batch).last_hidden_state)
            names = [c.__name__ for c in type(model).__mro__]
            assert "NomicMoEModel" in names, names
        assert names[0] == "NomicBertModel"
        assert torch.equal(outs[0], outs[1])
    else:
        from sentence_transformers import SentenceTransformer

        a = SentenceTransformer(str(ours), trust_remote_code=True, device="cpu").encode(TEXTS, prompt_name="query")
        st = SentenceTransformer(str(pub), trust_remote_code=True, device="cpu")
        b = st.encode(TEXTS, prompt_name="query")
        assert type(st[0].auto_model).__name__ == "NomicBertModel"
        assert abs(a - b).max() <= 1e-6


def test_native_transformers_cannot_mistake_our_layout(both):
    """Without remote code our layout is refused; the published one is the dense trap on transformers 5 (SPEC §8)."""
    from transformers import AutoModel

    ours, pub = both
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModel.from_pretrained(str(ours))
    try:
        native = AutoModel.from_pretrained(str(pub))
    except (ValueError, KeyError):  # transformers 4.x: no native nomic_bert, remote code is required
        return
    except RuntimeError as e:  # transformers 5 at this tiny size: its dense model ignores n_embd and mismatches
        assert "mismatch" in str(e)  # at the real size (768 wide) the shapes agree and it loads silently
        return
    names = [n for n, _ in native.named_parameters()]
    assert not any("experts" in n for n in names), "the native nomic_bert has no experts: the trap the README warns of"


def test_nomic_bert_config_round_trip_and_refusals():
    from nomic_moe_modeling.configuration_nomic_moe import NomicBertConfig

    c = NomicBertConfig(**{k: v for k, v in published_config(vocab_size=512).items() if k != "model_type"})
    assert (c.hidden_size, c.num_hidden_layers, c.num_experts_per_tok, c.rope_theta) == (64, 4, 2, 10000)
    assert NomicBertConfig.from_dict(c.to_dict()).to_dict()["n_embd"] == 64
    with pytest.raises(ValueError, match="prenorm"):
        NomicBertConfig(prenorm=True)
    with pytest.raises(ValueError, match="one setting"):
        NomicBertConfig(n_embd=64, hidden_size=128, n_head=4)


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}:{r[2]}:{r[3][:30]}" for r in ROWS])
def test_engine_requirements(row, released_both):
    engine, kind, name, need, source, check = row
    ok, detail = check(Folder(released_both["published"]))
    assert ok, f"{engine} {kind} {name}: needs {need} ({source}); found {detail}"


def test_engine_table_covers_each_engine():
    engines = {r[0] for r in ROWS}
    assert engines == {"TEI", "vLLM", "llama.cpp"} and len(ROWS) >= 60
    assert all(r[4] for r in ROWS), "every row names its source"


def test_tei_math_emulated(ckpts):
    """TEI computes GELU with the tanh form (SPEC §8): close to, but measurably not, the exact model."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from nomic_moe_conversion.layout import our_config_kwargs
    from nomic_moe_conversion.reference import mean_pool, reference_forward

    src = ckpts.source(**SHAPE)
    weights = load_file(str(src / "model.safetensors"))
    kw = our_config_kwargs(json.loads((src / "config.json").read_text()))
    batch = AutoTokenizer.from_pretrained(str(src))(TEXTS[:3], padding=True, return_tensors="pt")
    exact = mean_pool(reference_forward(weights, kw, batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
    tei = mean_pool(reference_forward(weights, kw, batch["input_ids"], batch["attention_mask"], gelu="tanh"), batch["attention_mask"])
    cos = torch.nn.functional.cosine_similarity(exact, tei, dim=-1)
    assert cos.min() > 0.99 and (exact - tei).abs().max() > 1e-6
