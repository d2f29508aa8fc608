"""Tiny Apex configurations shared by the tests: one plain decoder, the "every feature on" variants, and the two that
transformers' common model tests run. Plain mappings until `tiny_config` builds one, so that importing this module
loads neither torch nor transformers (the tests of what `import apex_hf` loads use them too)."""

import apex_hf


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

MLA_SIZES = dict(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
# DeepSeek-V3's routing: sigmoid scores, group-limited, scaled
DEEPSEEK_ROUTING = dict(router_scoring="sigmoid", n_group=2, topk_group=1, routed_scaling_factor=2.5)

MLA_ALL_FEATURES = dict(
    attention_type="mla",
    **MLA_SIZES,
    num_refinement_steps=2,
    memory_injection="cross_attention",
    num_experts=4,
    num_experts_per_tok=2,
    num_shared_experts=1,
    **DEEPSEEK_ROUTING,
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

# transformers' common model tests (test_transformers_common.py), at the sizes transformers' own testers use (an
# intermediate size of 37), two unrolled layers each. GQA: QK-norm, a head-wise output gate, sliding windows, and a
# MoE core with a shared expert run twice with gated_add memory (prelude 0 + 2 x core 1 + coda 0).
COMMON_TESTS_GQA = dict(
    BASE,
    vocab_size=99,
    intermediate_size=37,
    max_position_embeddings=64,
    initializer_range=0.02,
    num_prelude_layers=0,
    num_coda_layers=0,
    num_refinement_steps=2,
    memory_injection="gated_add",
    refinement_dim=8,
    qk_norm=True,
    attention_output_gate="headwise",
    sliding_window=4,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
    num_shared_experts=1,
)
# MLA with a low-rank query and DeepSeek's routing, a sliding prelude layer followed by a full-attention MoE core
# (K = 1, no memory): a sliding / full mix and a dense / sparse mix (prelude 1 + core 1 + coda 0).
COMMON_TESTS_MLA = dict(
    COMMON_TESTS_GQA,
    attention_type="mla",
    **MLA_SIZES,
    num_key_value_heads=4,
    qk_norm=False,
    attention_output_gate="elementwise",
    num_prelude_layers=1,
    num_refinement_steps=1,
    memory_injection="none",
    layer_types=["sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse"],
    num_shared_experts=0,
    **DEEPSEEK_ROUTING,
)


def tiny_config(variant: str | None = None, **overrides) -> "apex_hf.ApexConfig":
    kwargs = dict(BASE)
    if variant is not None:
        kwargs.update(VARIANTS[variant])
    kwargs.update(overrides)
    return apex_hf.ApexConfig(**kwargs)
