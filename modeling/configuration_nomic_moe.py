"""Configuration of Nomic Embed v2 MoE. Defaults are the published nomic-embed-text-v2-moe.

Two spellings of one configuration:
  NomicMoEConfig   model_type "nomic_moe", transformers-style keys: our default layout. Without
                   trust_remote_code, transformers refuses it and asks for remote code.
  NomicBertConfig  model_type "nomic_bert", the published GPT-2 style keys (n_embd, n_head, ...):
                   the layout TEI, vLLM and llama.cpp read. vLLM asserts the class name
                   "NomicBertConfig", hence the name. Without trust_remote_code, transformers >= 5
                   loads such a folder as its own dense nomic_bert and silently drops every expert.
"""

from transformers import PretrainedConfig

MOE_IMPLEMENTATIONS = ("auto", "eager", "sorted", "grouped_mm", "triton")


class NomicMoEConfig(PretrainedConfig):
    """A post-LayerNorm BERT-style encoder with RoPE whose odd layers are sparse Mixture-of-Experts.

    MoE fields:
        num_experts: experts per MoE layer.
        num_experts_per_tok: experts each token is routed to (top-k).
        moe_every_n_layers: layer ``i`` is MoE iff ``i % moe_every_n_layers == 1`` (1, 3, 5, ...).
        norm_topk_prob: renormalise the top-k router probabilities to sum to 1. The published
            model does not (its top-2 weights sum to about 0.7).
        router_aux_loss_coef: weight of the load-balancing loss when ``output_router_logits``.
        moe_implementation: expert compute backend; "auto" picks the fastest correct one.
    """

    model_type = "nomic_moe"

    def __init__(
        self,
        vocab_size=250048,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_act="gelu",
        max_position_embeddings=2048,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        num_experts=8,
        num_experts_per_tok=2,
        moe_every_n_layers=2,
        norm_topk_prob=False,
        router_aux_loss_coef=0.1,
        output_router_logits=False,
        moe_implementation="auto",
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        **kwargs,
    ):
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        if not 1 <= num_experts_per_tok <= num_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..num_experts ({num_experts}), got {num_experts_per_tok}")
        if hidden_act != "gelu":
            raise ValueError(f"only the exact (erf) 'gelu' is supported, got hidden_act={hidden_act!r}")
        if moe_implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe_implementation must be one of {MOE_IMPLEMENTATIONS}, got {moe_implementation!r}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.rope_theta = rope_theta
        self.initializer_range = initializer_range
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_every_n_layers = moe_every_n_layers
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.moe_implementation = moe_implementation
        kwargs.setdefault(
            "auto_map",
            {
                "AutoConfig": "configuration_nomic_moe.NomicMoEConfig",
                "AutoModel": "modeling_nomic_moe.NomicMoEModel",
            },
        )
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe_every_n_layers > 0 and i % self.moe_every_n_layers == 1


# published (GPT-2 style) key -> our attribute; NomicBertConfig stores the published names
PUBLISHED_KEYS = {
    "n_embd": "hidden_size",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
    "n_layer": "num_hidden_layers",
    "n_positions": "max_position_embeddings",
    "layer_norm_epsilon": "layer_norm_eps",
    "rotary_emb_base": "rope_theta",
    "activation_function": "hidden_act",
    "moe_top_k": "num_experts_per_tok",
    "moe_normalize_expert_weights": "norm_topk_prob",
}

# settings of the published model family that this code does not implement: the value each must have
PUBLISHED_FIXED = {
    "prenorm": False,
    "causal": False,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "rotary_scaling_factor": None,
    "qkv_proj_bias": True,
    "mlp_fc1_bias": True,
    "mlp_fc2_bias": True,
}


class NomicBertConfig(NomicMoEConfig):
    """NomicMoEConfig under the published checkpoint's model_type and key names.

    Reads either spelling (n_embd or hidden_size, ...), stores and saves the published one, and
    refuses published settings this code does not implement (prenorm, partial or interleaved
    RoPE, missing biases).
    """

    model_type = "nomic_bert"
    attribute_map = {ours: theirs for theirs, ours in PUBLISHED_KEYS.items()}

    def __init__(self, **kwargs):
        for theirs, ours in PUBLISHED_KEYS.items():
            if theirs in kwargs:
                value = kwargs.pop(theirs)
                if ours in kwargs and kwargs[ours] != value:
                    raise ValueError(f"config has {theirs}={value!r} and {ours}={kwargs[ours]!r}; they name one setting")
                kwargs[ours] = value
        # vLLM and transformers' own nomic_bert read rope_theta; keep it equal to rotary_emb_base
        kwargs.pop("rope_parameters", None)
        wrong = {k: kwargs[k] for k, v in PUBLISHED_FIXED.items() if k in kwargs and kwargs[k] != v}
        if wrong:
            raise ValueError(f"settings this implementation does not support: {wrong} (needs {dict((k, PUBLISHED_FIXED[k]) for k in wrong)})")
        for k, v in PUBLISHED_FIXED.items():
            kwargs.setdefault(k, v)
        max_trained = kwargs.pop("max_trained_positions", None)
        if max_trained is not None:
            kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 0), max_trained)
        kwargs.setdefault(
            "auto_map",
            {"AutoConfig": "configuration_nomic_moe.NomicBertConfig", "AutoModel": "modeling_nomic_moe.NomicBertModel"},
        )
        super().__init__(**kwargs)
        self.max_trained_positions = self.max_position_embeddings
