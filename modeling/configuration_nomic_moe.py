"""Configuration of Nomic Embed v2 MoE. Defaults are the published nomic-embed-text-v2-moe."""

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
