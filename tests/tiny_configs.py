"""Tiny Apex configurations shared by the tests: one plain decoder and the "every feature on" variants."""

from apex_hf import ApexConfig


BASE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_prelude_layers=1,
    num_core_layers=1,
    num_coda_layers=1,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Every Apex feature on, with GQA attention: refinement loop + both losses, MoE with shared experts and group-limited
# routing, sliding/full layers, QK-norm, gated attention output.
GQA_ALL_FEATURES = dict(
    num_refinement_steps=3,
    memory_injection="gated_add",
    consistency_loss_coef=0.1,
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    n_group=2,
    topk_group=2,
    router_z_loss_coef=0.01,
    router_bias_update_rate=0.01,
    sliding_window=3,
    full_attention_interval=2,
    qk_norm=True,
    attention_output_gate="headwise",
    partial_rotary_factor=0.5,
)

MLA_ALL_FEATURES = dict(
    attention_type="mla",
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    num_refinement_steps=2,
    memory_injection="cross_attention",
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    router_scoring="sigmoid",
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    router_bias_update_rate=0.01,
    sliding_window=3,
    full_attention_interval=2,
    attention_output_gate="elementwise",
)

# The knobs the converted families brought (Gemma 3, GPT-OSS, GLM-4), together and inside a gated refinement loop.
FAMILY_KNOBS = dict(
    num_refinement_steps=2,
    memory_injection="gated_add",
    refinement_pass_gate=True,
    num_experts=4,
    num_experts_per_tok=2,
    router_bias=True,
    expert_bias=True,
    swiglu_limit=0.5,
    attention_sinks=True,
    attention_bias=True,
    attention_output_bias=False,
    sandwich_norms=True,
    embedding_multiplier=32**0.5,
    query_pre_attn_scalar=12,
    qk_norm=True,
    sliding_window=3,
    full_attention_interval=2,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "rope_theta": 100000.0, "factor": 4.0},
    },
)

VARIANTS = {"gqa": GQA_ALL_FEATURES, "mla": MLA_ALL_FEATURES, "family_knobs": FAMILY_KNOBS}


def tiny_config(variant: str | None = None, **overrides) -> ApexConfig:
    kwargs = dict(BASE)
    if variant is not None:
        kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    return ApexConfig(**kwargs)
