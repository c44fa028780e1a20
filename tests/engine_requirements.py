"""What the serving engines check in a model folder, read from their code, one row per check.

Sources (read 2026-11-26):
  TEI        huggingface/text-embeddings-inference @ 0d124dc (v1.9.3)
  vLLM       vllm 0.33.0 (wheel on PyPI; the same files on GitHub vllm-project/vllm)
  llama.cpp  the llama-cpp-python 0.3.36 sdist, vendor/llama.cpp @ 0c1e570 (convert_hf_to_gguf.py
             is a thin CLI there; the NomicBert classes live in conversion/bert.py and base.py)

Each row: (engine, kind, name, what it needs, source file :: function, check). A check takes a
Folder and returns (ok, detail). test_engine_requirements asserts every row against a release in
the published layout.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open


@dataclass
class Folder:
    path: Path

    def __post_init__(self):
        self.cfg = json.loads((self.path / "config.json").read_text())
        with safe_open(str(self.path / "model.safetensors"), framework="pt") as f:
            self.tensors = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        self.tokenizer_json = json.loads((self.path / "tokenizer.json").read_text())
        self.tokenizer_config = json.loads((self.path / "tokenizer_config.json").read_text())
        self.modules = json.loads((self.path / "modules.json").read_text())

    def json(self, name):
        return json.loads((self.path / name).read_text())

    @property
    def moe_layers(self):
        n = self.cfg["moe_every_n_layers"]
        return [i for i in range(self.cfg["n_layer"]) if n and i % n == 1]

    @property
    def dense_layers(self):
        return [i for i in range(self.cfg["n_layer"]) if i not in self.moe_layers]


# ------------------------------------------------------------------------------------------------
# check builders
# ------------------------------------------------------------------------------------------------


def equals(key, value):
    return lambda f: (key in f.cfg and f.cfg[key] == value, f"{key}={f.cfg.get(key, '<absent>')!r}")


def is_int(*keys):
    def check(f):
        bad = [k for k in keys if not (isinstance(f.cfg.get(k), int) and not isinstance(f.cfg.get(k), bool))]
        return not bad, f"not JSON integers: {bad}" if bad else "all integers"
    return check


def is_number(key):
    return lambda f: (isinstance(f.cfg.get(key), (int, float)) and not isinstance(f.cfg.get(key), bool), f"{key}={f.cfg.get(key)!r}")


def is_bool(*keys):
    def check(f):
        bad = [k for k in keys if not isinstance(f.cfg.get(k), bool)]
        return not bad, f"not booleans: {bad}" if bad else "all booleans"
    return check


def present_null(key):
    return lambda f: (key in f.cfg and f.cfg[key] is None, f"{key} {'present' if key in f.cfg else 'absent'}, value {f.cfg.get(key)!r}")


def absent(*keys):
    def check(f):
        there = [k for k in keys if k in f.cfg]
        return not there, f"present: {there}" if there else "absent"
    return check


def tensor(name_fn, shape_fn, layers="all"):
    """Every layer's tensor exists with the shape; name_fn(i) -> name, shape_fn(cfg) -> shape."""
    def check(f):
        H, I, E, V = f.cfg["n_embd"], f.cfg["n_inner"], f.cfg.get("num_experts"), f.cfg["vocab_size"]
        which = {"all": range(f.cfg["n_layer"]), "moe": f.moe_layers, "dense": f.dense_layers, "none": [None]}[layers]
        wrong = []
        for i in which:
            name = name_fn(i)
            want = tuple(shape_fn(H=H, I=I, E=E, V=V, T=f.cfg["type_vocab_size"]))
            if f.tensors.get(name) != want:
                wrong.append(f"{name}: {f.tensors.get(name)} (want {want})")
        return not wrong, "; ".join(wrong[:3]) or f"{len(list(which))} x ok"
    return check


def layer(suffix):
    return lambda i: f"encoder.layers.{i}.{suffix}"


def only_published_names(f):
    from nomic_moe_conversion.layout import our_config_kwargs, published_shapes

    expected = set(published_shapes(our_config_kwargs(f.cfg)))
    extra, missing = set(f.tensors) - expected, expected - set(f.tensors)
    return not extra and not missing, f"extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]}"


def pooling_mean(f):
    pool = [m for m in f.modules if m["type"] in ("sentence_transformers.models.Pooling",
                                                  "sentence_transformers.sentence_transformer.modules.pooling.Pooling")]
    if len(pool) != 1:
        return False, f"{len(pool)} Pooling modules"
    cfg = f.json(Path(pool[0]["path"]) / "config.json")
    ok = cfg.get("pooling_mode_mean_tokens") is True and cfg.get("pooling_mode_cls_token") is False
    return ok, f"{pool[0]['path']}/config.json: mean={cfg.get('pooling_mode_mean_tokens')}, cls={cfg.get('pooling_mode_cls_token')}"


def legacy_module_types(f):
    legal = {f"sentence_transformers.models.{n}" for n in ("Transformer", "Pooling", "Normalize", "Dense")}
    bad = [m.get("type") for m in f.modules if m.get("type") not in legal or not {"idx", "name", "path", "type"} <= set(m)]
    return not bad, f"unrecognised entries: {bad}" if bad else "all legacy type names with idx/name/path/type"


def config_class_name(trust_remote_code):
    def check(f):
        from transformers import AutoConfig

        try:
            cls = type(AutoConfig.from_pretrained(str(f.path), trust_remote_code=trust_remote_code)).__name__
        except Exception as e:  # transformers 4.x knows no nomic_bert: only the remote class exists
            if trust_remote_code:
                return False, f"{type(e).__name__}: {e}"
            return True, f"no native nomic_bert in this transformers ({type(e).__name__}); vLLM needs --trust-remote-code here"
        return cls == "NomicBertConfig", f"AutoConfig(trust_remote_code={trust_remote_code}) -> {cls}"
    return check


def native_config_rope_and_heads(f):
    """transformers >= 5's own NomicBertConfig (vLLM without --trust-remote-code) must see RoPE base and heads."""
    from transformers import AutoConfig

    try:
        c = AutoConfig.from_pretrained(str(f.path), trust_remote_code=False)
    except Exception:
        ok = f.cfg.get("rope_theta") == f.cfg["rotary_emb_base"] and f.cfg.get("num_attention_heads") == f.cfg["n_head"]
        return ok, "no native class here; config.json carries rope_theta and num_attention_heads for it"
    theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", None))
    ok = float(theta) == float(f.cfg["rotary_emb_base"]) and c.num_attention_heads == f.cfg["n_head"]
    return ok, f"native {type(c).__name__}: rope_theta {theta}, heads {c.num_attention_heads}"


def tokenizer_class(f):
    name = f.tokenizer_config.get("tokenizer_class")
    return name in ("XLMRobertaTokenizer", "XLMRobertaTokenizerFast"), f"tokenizer_class={name!r}"


def unigram_tokenizer(f):
    return f.tokenizer_json["model"]["type"] == "Unigram", f"model.type={f.tokenizer_json['model']['type']}"


def top_level_charsmap(f):
    if (f.path / "sentencepiece.bpe.model").exists():
        return True, "sentencepiece.bpe.model present (the converter reads that instead)"
    norm = f.tokenizer_json.get("normalizer") or {}
    return bool(norm.get("precompiled_charsmap")), f"normalizer type {norm.get('type')}, top-level charsmap: {'precompiled_charsmap' in norm}"


def spm_model_only_at_full_vocab(f):
    spm = (f.path / "sentencepiece.bpe.model").exists()
    return (not spm) or f.cfg["vocab_size"] >= 250002, f"sentencepiece.bpe.model {'present' if spm else 'absent'}, vocab {f.cfg['vocab_size']}"


def vocab_covers_tokenizer(f):
    n = len(f.tokenizer_json["model"]["vocab"]) + len([t for t in f.tokenizer_json.get("added_tokens", [])
                                                        if t["content"] not in dict(f.tokenizer_json["model"]["vocab"])])
    rows = f.tensors["embeddings.word_embeddings.weight"][0]
    return f.cfg["vocab_size"] == rows and rows >= n, f"vocab_size {f.cfg['vocab_size']}, rows {rows}, tokenizer {n}"


def positions_pair(f):
    pair = (f.cfg.get("n_positions"), f.cfg.get("max_trained_positions", 2048))
    return pair in ((2048, 2048), (8192, 2048)), f"(n_positions, max_trained_positions) = {pair}"


def id2label_safe(f):
    labels = f.cfg.get("id2label")
    return labels is None or len(labels) != 2, f"id2label={labels!r}"


def auto_map_strings(f):
    am = f.cfg.get("auto_map", {})
    return all(isinstance(v, str) for v in am.values()), f"auto_map={am}"


def auto_map_local_code(f):
    am = f.cfg.get("auto_map", {})
    files = [v.split(".")[0] + ".py" for v in am.values()]
    ok = set(am) >= {"AutoConfig", "AutoModel"} and all("--" not in v for v in am.values()) and all((f.path / x).exists() for x in files)
    return ok, f"auto_map={am}"


def no_alias_pairs_for_ort(f):
    both = [(a, b) for a, b in (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers")) if a in f.cfg and b in f.cfg]
    return not both, f"alias pairs present: {both}" if both else "no key next to its alias"


def onnx_outputs(f):
    path = f.path / "onnx" / "model.onnx"
    if not path.exists():
        return True, "no onnx/model.onnx: the CPU image uses the candle backend"
    import onnx

    outputs = [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]
    return "sentence_embedding" in outputs or "last_hidden_state" in outputs, f"outputs {outputs}"


def st_max_len(f):
    v = f.json("sentence_bert_config.json").get("max_seq_length")
    return isinstance(v, int) and v > 0, f"max_seq_length={v!r}"


def pooling_keys_both(f):
    cfg = f.json("1_Pooling/config.json")
    return isinstance(cfg.get("pooling_mode_cls_token"), bool) and isinstance(cfg.get("pooling_mode_mean_tokens"), bool), \
        f"cls={cfg.get('pooling_mode_cls_token')!r}, mean={cfg.get('pooling_mode_mean_tokens')!r}"


def architectures_ok(f):
    arch = f.cfg.get("architectures")
    ok = isinstance(arch, list) and all(isinstance(a, str) for a in arch) and not any(a.endswith("Classification") for a in arch)
    return ok, f"architectures={arch!r}"


def moe_keys(f):
    ok = all(isinstance(f.cfg.get(k), int) and f.cfg[k] > 0 for k in ("num_experts", "moe_top_k", "moe_every_n_layers"))
    return ok, f"num_experts={f.cfg.get('num_experts')}, moe_top_k={f.cfg.get('moe_top_k')}, moe_every_n_layers={f.cfg.get('moe_every_n_layers')}"


def equal_bias_flags(f):
    flags = [f.cfg.get(k) for k in ("mlp_fc1_bias", "mlp_fc2_bias", "qkv_proj_bias")]
    return len(set(flags)) == 1 and flags[0] is True, f"biases {flags}"


def expert_numel(f):
    E, I, H = f.cfg["num_experts"], f.cfg["n_inner"], f.cfg["n_embd"]
    bad = [n for n, s in f.tensors.items() if ".experts.mlp.w" in n and s != (E * I, H)]
    return not bad, f"{bad[:2]}" if bad else f"all [{E * I}, {H}]"


def add_prefix_space(f):
    return f.tokenizer_config.get("add_prefix_space") is True, f"add_prefix_space={f.tokenizer_config.get('add_prefix_space')!r}"


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------

TEI_NOMIC = "backends/candle/src/models/nomic.rs"
TEI_ROUTER = "router/src/lib.rs"
VLLM_CFG = "vllm/model_executor/models/config.py :: NomicBertModelConfig.verify_and_update_model_config"
VLLM_MODEL = "vllm/model_executor/models/bert_with_rope.py"
LLAMA = "convert_hf_to_gguf.py -> conversion/bert.py :: NomicBertModel"

ROWS = [
    # --- TEI -------------------------------------------------------------------------------------
    ("TEI", "model_type", "model_type", '== "nomic_bert"', "backends/candle/src/lib.rs :: enum Config", equals("model_type", "nomic_bert")),
    ("TEI", "config", "architectures", "list of str, no *Classification", f"{TEI_ROUTER} :: ModelConfig, get_backend_model_type", architectures_ok),
    ("TEI", "config", "max_position_embeddings | max_trained_positions", "one present (usize)", f"{TEI_ROUTER} :: run", is_int("max_trained_positions")),
    ("TEI", "config", "auto_map", "string values only", f"{TEI_ROUTER} :: ModelConfig", auto_map_strings),
    ("TEI", "config", "prenorm", "false", f"{TEI_NOMIC} :: NomicConfig::valid", equals("prenorm", False)),
    ("TEI", "config", "rotary_emb_fraction", "1.0", f"{TEI_NOMIC} :: NomicConfig::valid", equals("rotary_emb_fraction", 1.0)),
    ("TEI", "config", "rotary_emb_interleaved", "false", f"{TEI_NOMIC} :: NomicConfig::valid", equals("rotary_emb_interleaved", False)),
    ("TEI", "config", "type_vocab_size", "> 0", f"{TEI_NOMIC} :: NomicConfig::valid", lambda f: (f.cfg.get("type_vocab_size", 0) > 0, f"{f.cfg.get('type_vocab_size')}")),
    ("TEI", "config", "qkv_proj_bias, mlp_fc1_bias, mlp_fc2_bias", "booleans", f"{TEI_NOMIC} :: NomicAttention::load, NomicBertMLP::load", is_bool("qkv_proj_bias", "mlp_fc1_bias", "mlp_fc2_bias")),
    ("TEI", "config", "rotary_emb_base", "number", f"{TEI_NOMIC} :: NomicBertModel::load", is_number("rotary_emb_base")),
    ("TEI", "config", "rotary_scaling_factor", "null or number", f"{TEI_NOMIC} :: NomicBertModel::load", lambda f: (f.cfg.get("rotary_scaling_factor") is None or isinstance(f.cfg["rotary_scaling_factor"], (int, float)), repr(f.cfg.get("rotary_scaling_factor")))),
    ("TEI", "config", "n_embd, n_head, n_inner, n_layer, n_positions, vocab_size", "JSON integers", f"{TEI_NOMIC} :: NomicConfig", is_int("n_embd", "n_head", "n_inner", "n_layer", "n_positions", "vocab_size")),
    ("TEI", "config", "layer_norm_epsilon", "number", f"{TEI_NOMIC} :: NomicConfig", is_number("layer_norm_epsilon")),
    ("TEI", "config", "activation_function", '"gelu" (selects fc1/fc2; computed as tanh-GELU)', "backends/candle/src/layers/linear.rs :: HiddenAct; nomic.rs :: NomicMLP::load", equals("activation_function", "gelu")),
    ("TEI", "config", "num_experts, moe_top_k, moe_every_n_layers", "present (> 0), else no MoE layer / panic", f"{TEI_NOMIC} :: NomicMLP::load, NomicRouter::load", moe_keys),
    ("TEI", "tensor", "embeddings.word_embeddings.weight", "[vocab_size, n_embd]", f"{TEI_NOMIC} :: NomicBertEmbeddings::load", tensor(lambda i: "embeddings.word_embeddings.weight", lambda **d: (d["V"], d["H"]), "none")),
    ("TEI", "tensor", "embeddings.token_type_embeddings.weight", "[type_vocab_size, n_embd]", f"{TEI_NOMIC} :: NomicBertEmbeddings::load", tensor(lambda i: "embeddings.token_type_embeddings.weight", lambda **d: (d["T"], d["H"]), "none")),
    ("TEI", "tensor", "emb_ln.weight, emb_ln.bias", "[n_embd]", "backends/candle/src/layers/layer_norm.rs :: LayerNorm::load", lambda f: (f.tensors.get("emb_ln.weight") == (f.cfg["n_embd"],) and f.tensors.get("emb_ln.bias") == (f.cfg["n_embd"],), "emb_ln")),
    ("TEI", "tensor", "encoder.layers.{i}.attn.Wqkv.weight / .bias", "[3*n_embd, n_embd] / [3*n_embd]", f"{TEI_NOMIC} :: NomicAttention::load", lambda f: tensor(layer("attn.Wqkv.weight"), lambda **d: (3 * d["H"], d["H"]))(f) if tensor(layer("attn.Wqkv.bias"), lambda **d: (3 * d["H"],))(f)[0] else (False, "Wqkv.bias")),
    ("TEI", "tensor", "encoder.layers.{i}.attn.out_proj.weight / .bias", "[n_embd, n_embd] / [n_embd]", f"{TEI_NOMIC} :: NomicAttention::load", tensor(layer("attn.out_proj.weight"), lambda **d: (d["H"], d["H"]))),
    ("TEI", "tensor", "encoder.layers.{i}.norm1.*, norm2.*", "[n_embd]", f"{TEI_NOMIC} :: NomicBertBlock::load", lambda f: tensor(layer("norm1.weight"), lambda **d: (d["H"],))(f) if tensor(layer("norm2.bias"), lambda **d: (d["H"],))(f)[0] else (False, "norm2")),
    ("TEI", "tensor", "encoder.layers.{dense}.mlp.fc1.weight", "[n_inner, n_embd]", f"{TEI_NOMIC} :: NomicBertMLP::load", tensor(layer("mlp.fc1.weight"), lambda **d: (d["I"], d["H"]), "dense")),
    ("TEI", "tensor", "encoder.layers.{dense}.mlp.fc2.weight", "[n_embd, n_inner]", f"{TEI_NOMIC} :: NomicBertMLP::load", tensor(layer("mlp.fc2.weight"), lambda **d: (d["H"], d["I"]), "dense")),
    ("TEI", "tensor", "encoder.layers.{moe}.mlp.router.layer.weight", "[num_experts, n_embd], no bias", f"{TEI_NOMIC} :: NomicRouter::load", tensor(layer("mlp.router.layer.weight"), lambda **d: (d["E"], d["H"]), "moe")),
    ("TEI", "tensor", "encoder.layers.{moe}.mlp.experts.mlp.w1", "[num_experts*n_inner, n_embd] (2-D; 3-D is rejected)", f"{TEI_NOMIC} :: NomicExpertMLP::load", tensor(layer("mlp.experts.mlp.w1"), lambda **d: (d["E"] * d["I"], d["H"]), "moe")),
    ("TEI", "tensor", "encoder.layers.{moe}.mlp.experts.mlp.w2", "[num_experts*n_inner, n_embd]", f"{TEI_NOMIC} :: NomicExpertMLP::load", tensor(layer("mlp.experts.mlp.w2"), lambda **d: (d["E"] * d["I"], d["H"]), "moe")),
    ("TEI", "tensor", "encoder.layers.{moe}.mlp.experts.bias", "[n_embd], added once after the sum", f"{TEI_NOMIC} :: NomicExperts::load", tensor(layer("mlp.experts.bias"), lambda **d: (d["H"],), "moe")),
    ("TEI", "tensor", "(prefix)", "none: names exactly as published", f"{TEI_NOMIC} (vb.pp paths)", only_published_names),
    ("TEI", "file", "tokenizer.json", "required (fast tokenizers only)", f"{TEI_ROUTER} :: run", lambda f: ((f.path / "tokenizer.json").exists(), "tokenizer.json")),
    ("TEI", "file", "model.safetensors", "required (or .bin / index)", "backends/candle/src/lib.rs :: CandleBackend::new", lambda f: ((f.path / "model.safetensors").exists(), "model.safetensors")),
    ("TEI", "file", "1_Pooling/config.json", "pooling_mode_cls_token and pooling_mode_mean_tokens present (else CLS for *bert*)", f"{TEI_ROUTER} :: get_backend_model_type, PoolConfig", pooling_keys_both),
    ("TEI", "file", "1_Pooling/config.json", "mean pooling", f"{TEI_ROUTER} :: PoolConfig", pooling_mean),
    ("TEI", "file", "sentence_bert_config.json", "max_seq_length: usize", f"{TEI_ROUTER} :: STConfig", st_max_len),
    ("TEI", "file", "modules.json", "idx/name/path/type, legacy sentence_transformers.models.* type names", "backends/src/lib.rs :: ModuleConfig, parse_dense_paths_from_modules", legacy_module_types),
    ("TEI", "config", "n_embd & hidden_size, n_layer & num_hidden_layers", "not both (CPU image, ORT backend: serde alias clash)", "backends/ort/src/lib.rs :: Config", no_alias_pairs_for_ort),
    ("TEI", "file", "onnx/model.onnx", "output sentence_embedding or last_hidden_state (CPU image serves ONNX first)", "backends/ort/src/lib.rs :: OrtBackend", onnx_outputs),
    # --- vLLM ------------------------------------------------------------------------------------
    ("vLLM", "architecture", "architectures[0]", '"NomicBertModel" -> bert_with_rope.NomicBertModel', "vllm/model_executor/models/registry.py :: _EMBEDDING_MODELS", lambda f: (f.cfg.get("architectures", [None])[0] == "NomicBertModel", repr(f.cfg.get("architectures")))),
    ("vLLM", "class name", "NomicBertConfig", "config class name with --trust-remote-code (auto_map.AutoConfig)", VLLM_CFG, config_class_name(True)),
    ("vLLM", "class name", "NomicBertConfig", "config class name without --trust-remote-code (transformers' own class)", VLLM_CFG, config_class_name(False)),
    ("vLLM", "config", "rope_theta, num_attention_heads", "set, so transformers 5's own class sees base and heads", f"{VLLM_CFG} + transformers NomicBertConfig", native_config_rope_and_heads),
    ("vLLM", "config", "activation_function", 'in ["swiglu", "gelu"]', VLLM_CFG, lambda f: (f.cfg.get("activation_function") in ("swiglu", "gelu"), repr(f.cfg.get("activation_function")))),
    ("vLLM", "config", "mlp_fc1_bias == mlp_fc2_bias == qkv_proj_bias", "equal", VLLM_CFG, equal_bias_flags),
    ("vLLM", "config", "rotary_emb_scale_base", "present and null", VLLM_CFG, present_null("rotary_emb_scale_base")),
    ("vLLM", "config", "rotary_emb_interleaved", "false", VLLM_CFG, equals("rotary_emb_interleaved", False)),
    ("vLLM", "config", "layer_norm_epsilon, n_inner, n_embd, n_layer, max_trained_positions", "present (copied to the standard names)", VLLM_CFG, lambda f: (all(k in f.cfg for k in ("layer_norm_epsilon", "n_inner", "n_embd", "n_layer", "max_trained_positions")), "present")),
    ("vLLM", "config", "moe_every_n_layers, num_experts, moe_top_k", "present", f"{VLLM_MODEL} :: BertWithRopeEncoder, BertWithRopeBlock", moe_keys),
    ("vLLM", "tensor", "all names", "the published names only: an unknown name raises KeyError, a missing one fails the load", f"{VLLM_MODEL} :: NomicBertModel.hf_to_vllm_mapper, BertWithRope.load_weights", only_published_names),
    ("vLLM", "tensor", "mlp.experts.mlp.w1/w2", "numel E*I*H, reshaped (E, I, H)", f"{VLLM_MODEL} :: NomicMoE.weight_loader", expert_numel),
    ("vLLM", "file", "modules.json -> Pooling config", "mean (else the class default, CLS)", "vllm/transformers_utils/config.py :: get_pooling_config", pooling_mean),
    ("vLLM", "file", "tokenizer_config.json", "tokenizer_class XLMRobertaTokenizer[Fast] (transformers 5 maps nomic_bert to BertTokenizer)", "vllm/tokenizers/hf.py; transformers auto/tokenization_auto.py", tokenizer_class),
    ("vLLM", "file", "sentence_bert_config.json", "max_seq_length (max_model_len)", "vllm/config/model.py :: _get_and_verify_max_len", st_max_len),
    # --- llama.cpp -------------------------------------------------------------------------------
    ("llama.cpp", "architecture", "architectures[0]", '"NomicBertModel"', "conversion/base.py :: get_model_architecture", lambda f: (f.cfg.get("architectures", [None])[0] == "NomicBertModel", repr(f.cfg.get("architectures")))),
    ("llama.cpp", "config", "moe_every_n_layers", "truthy: selects nomic-bert-moe", f"{LLAMA}.__init__", lambda f: (bool(f.cfg.get("moe_every_n_layers")), repr(f.cfg.get("moe_every_n_layers")))),
    ("llama.cpp", "config", "(n_positions, max_trained_positions)", "(2048, 2048) or (8192, 2048)", f"{LLAMA}.set_gguf_parameters", positions_pair),
    ("llama.cpp", "config", "activation_function", '"gelu" for MoE', f"{LLAMA}.__init__", equals("activation_function", "gelu")),
    ("llama.cpp", "config", "causal", "present, false", f"{LLAMA}.__init__", equals("causal", False)),
    ("llama.cpp", "config", "qkv_proj_bias, mlp_fc1_bias, mlp_fc2_bias", "present, true for MoE", f"{LLAMA}.__init__", equal_bias_flags),
    ("llama.cpp", "config", "prenorm", "false", f"{LLAMA}.__init__", equals("prenorm", False)),
    ("llama.cpp", "config", "rotary_emb_fraction", "1.0", f"{LLAMA}.__init__", equals("rotary_emb_fraction", 1.0)),
    ("llama.cpp", "config", "rotary_emb_interleaved", "false", f"{LLAMA}.__init__", equals("rotary_emb_interleaved", False)),
    ("llama.cpp", "config", "rotary_emb_scale_base", "present (KeyError otherwise), null", f"{LLAMA}.__init__", present_null("rotary_emb_scale_base")),
    ("llama.cpp", "config", "n_inner, num_experts, moe_top_k, layer_norm_epsilon", "present", f"{LLAMA}.modify_tensors, set_gguf_parameters", lambda f: (all(k in f.cfg for k in ("n_inner", "num_experts", "moe_top_k", "layer_norm_epsilon")), "present")),
    ("llama.cpp", "config", "id2label", "absent, or not two string-keyed labels (KeyError: 0)", "conversion/bert.py :: BertModel.__init__", id2label_safe),
    ("llama.cpp", "config", "max_position_embeddings, n_ctx, intermediate_size, num_experts_per_tok", "absent (they win in find_hparam)", "conversion/base.py :: TextModel.find_hparam", absent("max_position_embeddings", "n_ctx", "intermediate_size", "num_experts_per_tok")),
    ("llama.cpp", "config", "vocab_size", "== embedding rows >= tokenizer size", "conversion/bert.py :: _xlmroberta_set_vocab", vocab_covers_tokenizer),
    ("llama.cpp", "tensor", "all names", "the published names only ('Can not map tensor' otherwise); experts.bias is dropped", "gguf-py/gguf/tensor_mapping.py; conversion/bert.py :: NomicBertModel.filter_tensors", only_published_names),
    ("llama.cpp", "tensor", "mlp.experts.mlp.w1/w2", "[num_experts*n_inner, n_embd], viewed (E, n_inner, n_embd)", f"{LLAMA}.modify_tensors", expert_numel),
    ("llama.cpp", "file", "tokenizer.json", "model.type Unigram (the XLM-R path)", "conversion/bert.py :: _is_tokenizer_xlmroberta", unigram_tokenizer),
    ("llama.cpp", "file", "tokenizer.json normalizer", "top-level precompiled_charsmap (without sentencepiece.bpe.model)", "conversion/bert.py :: _xlmroberta_set_vocab", top_level_charsmap),
    ("llama.cpp", "file", "sentencepiece.bpe.model", "only with XLM-R's full vocabulary (<mask> is written at id 250001)", "conversion/bert.py :: _xlmroberta_set_vocab", spm_model_only_at_full_vocab),
    ("llama.cpp", "file", "tokenizer_config.json", "tokenizer_class XLMRobertaTokenizer (AutoTokenizer)", "conversion/bert.py :: _xlmroberta_set_vocab", tokenizer_class),
    ("llama.cpp", "file", "tokenizer_config.json", "add_prefix_space true (read as the GGUF add_space_prefix)", "conversion/bert.py :: _xlmroberta_set_vocab", add_prefix_space),
    ("llama.cpp", "file", "modules.json -> Pooling config", "mean (written as the GGUF pooling type)", "conversion/base.py :: _try_set_pooling_type", pooling_mean),
]
