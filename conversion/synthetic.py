"""Random checkpoints in the published layout (SPEC §3) and a small XLM-R-style tokenizer.

Used by tests, the demo on an offline machine, and benchmarks. The weights are synthetic: they
exercise every code path (non-zero biases, LayerNorm scales, a router that really chooses) but
mean nothing.
"""

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .layout import published_shapes

# Enough text for a Unigram model to learn pieces in a few scripts. Includes the prompts.
CORPUS = [
    "search_query: What food did they eat?",
    "search_document: The settlers ate bread, salted fish and wild berries through the winter.",
    "classification: This movie was a delight from start to finish.",
    "clustering: Quarterly earnings beat analyst expectations.",
    "Hello! How are you today?",
    "¡Hola! ¿Cómo estás hoy?",
    "Bonjour, comment allez-vous aujourd'hui ?",
    "Guten Tag, wie geht es Ihnen heute?",
    "Thunderstorms are expected this afternoon across the northern plains.",
    "The mixture of experts routes each token to two of eight feed-forward networks.",
    "Retrieval augmented generation needs good embeddings for search.",
    "Sparse models activate only a fraction of their parameters per token.",
    "今日はとても良い天気ですね。",
    "Сегодня хорошая погода.",
    "الطقس جميل اليوم",
    "आज मौसम अच्छा है।",
    "天气很好，我们去公园吧。",
    "Il pleut des cordes depuis ce matin.",
    "Die Katze schläft auf dem Sofa.",
    "Embeddings map text to vectors so that similar meanings lie close together.",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")


def _proto_field(buf: bytes, wanted: int) -> bytes:
    """The first length-delimited field number ``wanted`` of a protobuf message (wire format only)."""
    def varint(i):
        shift = value = 0
        while True:
            b = buf[i]
            value |= (b & 0x7F) << shift
            i += 1
            if b < 0x80:
                return value, i
            shift += 7

    i = 0
    while i < len(buf):
        key, i = varint(i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = varint(i)
            if field == wanted:
                return buf[i : i + n]
            i += n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return b""


def train_unigram(vocab_size: int):
    """(pieces with scores, precompiled_charsmap) of a SentencePiece Unigram model trained on CORPUS.

    Trained by sentencepiece itself with XLM-R's normalisation (nmt_nfkc), so the charsmap is a real
    one: llama.cpp's converter reads it from tokenizer.json, and HF applies it as XLM-R's does.
    """
    import io
    import logging

    import sentencepiece as spm

    logging.getLogger("sentencepiece").setLevel(logging.ERROR)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_writer=model, model_type="unigram", vocab_size=vocab_size,
        normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
        pad_id=-1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i))]
    normalizer_spec = _proto_field(model.getvalue(), 3)  # ModelProto.normalizer_spec
    return pieces, _proto_field(normalizer_spec, 2)  # NormalizerSpec.precompiled_charsmap


def make_tokenizer(folder, vocab_size: int = 500):
    """A SentencePiece Unigram tokenizer laid out like XLM-R's, saved to ``folder``.

    ids: <s>=0, <pad>=1, </s>=2, <unk>=3, pieces, <mask>=last; right padding; ``<s> ... </s>``.
    tokenizer.json has XLM-R's shape: a Precompiled (nmt_nfkc) normaliser, the pipeline that
    transformers 5's XLMRobertaTokenizer builds (WhitespaceSplit + Metaspace), so that
    transformers 4 (which reads the file as it is), transformers 5 and llama.cpp all agree.
    """
    import base64

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces, charsmap = train_unigram(vocab_size - 5)
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Precompiled(charsmap)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    try:
        from transformers import XLMRobertaTokenizerFast as Fast
    except ImportError:  # pragma: no cover - transformers builds without the alias
        from transformers import PreTrainedTokenizerFast as Fast
    fast = Fast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=512,
        padding_side="right",
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    # what a SentencePiece model says of itself (add a dummy prefix, collapse runs of spaces): llama.cpp's
    # converter reads these two from the tokenizer when no sentencepiece.bpe.model is present
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="XLMRobertaTokenizer", add_prefix_space=True, clean_up_tokenization_spaces=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    # saving may re-serialise the normaliser; keep it as XLM-R's file has it
    data = json.loads((folder / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()}
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    return fast


def published_config(
    *,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 128,
    num_experts: int = 8,
    top_k: int = 2,
    moe_every: int = 2,
    normalize: bool = False,
) -> dict:
    """A config.json dict in the published (GPT-2 style) form."""
    return {
        "architectures": ["NomicBertModel"],
        "model_type": "nomic_bert",
        "activation_function": "gelu",
        "n_embd": hidden_size,
        "n_head": num_heads,
        "n_inner": intermediate_size,
        "n_layer": num_layers,
        "n_positions": 2048,
        "max_trained_positions": 2048,
        "layer_norm_epsilon": 1e-5,
        "vocab_size": vocab_size,
        "type_vocab_size": 1,
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "rotary_emb_base": 10000,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_scaling_factor": None,
        "prenorm": False,
        "qkv_proj_bias": True,
        "mlp_fc1_bias": True,
        "mlp_fc2_bias": True,
        "num_experts": num_experts,
        "moe_top_k": top_k,
        "moe_every_n_layers": moe_every,
        "moe_normalize_expert_weights": normalize,
        "router_aux_loss_coef": 0.1,
        "auto_map": {"AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel"},
    }


def random_weights(config: dict, seed: int = 0, weight_std=None) -> dict:
    """Random tensors for every published key.

    weight_std None: matrices at 1/sqrt(fan_in), so every branch is as large as the residual stream;
    a strong signal for small test models, but at 12 layers the network turns chaotic and any
    rounding (bf16, fp16, int8) or routing flip grows without bound, which trained models do not
    do. weight_std 0.02 (transformers' initializer_range): small branches, a stable network, the
    right stand-in for speed and precision work at the real size.
    """
    from .layout import our_config_kwargs

    kw = our_config_kwargs(config)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in published_shapes(kw).items():
        if key.endswith(("norm1.weight", "norm2.weight", "emb_ln.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("router.layer.weight"):
            # logits with std ~1.6 make the top-2 weights sum to ~0.7, as in the published model (SPEC §2)
            t = torch.randn(shape, generator=g) * (1.6 / shape[1] ** 0.5)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=g)  # biases, experts.bias included: non-zero on purpose
        else:
            t = torch.randn(shape, generator=g) * (weight_std if weight_std else 1.0 / shape[-1] ** 0.5)
        weights[key] = t.contiguous()
    return weights


def make_published_checkpoint(folder, *, tokenizer_vocab: int = 500, seed: int = 0, tokenizer: bool = True,
                              weight_std=None, **shape) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer) in the published layout; returns the folder.

    ``shape`` takes published_config's keywords (hidden_size, num_layers, num_experts, top_k, ...).
    The vocabulary is the tokenizer's padded to a multiple of 64, as the real model pads XLM-R's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        make_tokenizer(folder, tokenizer_vocab)
    shape.setdefault("vocab_size", -(-tokenizer_vocab // 64) * 64)
    config = published_config(**shape)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(random_weights(config, seed, weight_std), str(folder / "model.safetensors"))
    return folder


def real_size_shape(vocab_size: Optional[int] = None) -> dict:
    """Shape keywords of the published model (475,292,928 parameters)."""
    return dict(
        vocab_size=vocab_size or 250048,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        num_experts=8,
        top_k=2,
        moe_every=2,
    )
