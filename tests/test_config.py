"""ApexConfig: derived fields, round trip, and a clear error naming the field for each nonsense value."""

import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from tiny_configs import MLA_SIZES, tiny_config

from apex_hf import ApexConfig, sliding_full_pattern


CONFIG_ERRORS = [
    (dict(num_attention_heads=3), "hidden_size=32 is not divisible by num_attention_heads=3"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=4"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok=0"),
    (dict(num_refinement_steps=0), "num_refinement_steps=0"),
    (dict(num_refinement_steps=3, max_refinement_steps=2), "max_refinement_steps=2"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(attention_type="mla"), "attention_type='mla' needs kv_lora_rank"),
    (
        dict(attention_type="mla", **{**MLA_SIZES, "qk_rope_head_dim": 3}),
        "qk_rope_head_dim=3 must be even",
    ),
    (dict(attention_type="sparse"), "attention_type='sparse'"),
    (dict(num_hidden_layers=5), "num_hidden_layers=5 contradicts the refinement loop"),
    (dict(rope_parameters={"rope_type": "spiral", "rope_theta": 1e4}), "rope_type=.spiral. is invalid"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef=-0.1"),
    (dict(verifier_loss_coef=-1.0), "verifier_loss_coef=-1.0"),
    (dict(router_z_loss_coef=-1e-3), "router_z_loss_coef=-0.001"),
    (dict(num_experts=6, n_group=4), "n_group=4"),
    (dict(num_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "exceeds the 2 experts"),
    (dict(router_scoring="relu", num_experts=4), "router_scoring='relu'"),
    (dict(memory_injection="concat"), "memory_injection='concat'"),
    (dict(attention_output_gate="both"), "attention_output_gate='both'"),
    (dict(partial_rotary_factor=0.1), "rotary size of 0"),
    (dict(layer_types=["full_attention", "sliding_attention", "full_attention"]), "sliding_window is None"),
    (dict(layer_types=["full_attention"] * 2), "layer_types has 2 entries"),
    (
        dict(
            num_refinement_steps=2,
            sliding_window=4,
            layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"],
        ),
        r"layer_types\[2\]='sliding_attention' differs from the same core layer's first pass",
    ),
    (dict(mlp_layer_types=["dense", "moe", "dense"]), "mlp_layer_types entries must be in"),
    (dict(num_experts=4, expert_capacity_factor=0.0), "expert_capacity_factor=0.0"),
    (
        dict(qk_norm=True, attention_type="mla", **MLA_SIZES),
        "qk_norm is only defined",
    ),
    (
        dict(attention_sinks=True, attention_type="mla", **MLA_SIZES),
        "attention_sinks is only defined",
    ),
    (dict(embedding_multiplier=0.0), "embedding_multiplier=0.0"),
    (dict(query_pre_attn_scalar=-4), "query_pre_attn_scalar=-4"),
    (dict(num_experts=4, swiglu_limit=0.0), "swiglu_limit=0.0"),
    (
        dict(sliding_window=3, full_attention_interval=2, rope_parameters={"full_attention": {"rope_theta": 1e4}}),
        "has no dict for 'sliding_attention'",
    ),
]


@pytest.mark.parametrize("overrides,message", CONFIG_ERRORS, ids=[m[:40] for _, m in CONFIG_ERRORS])
def test_nonsense_values_raise_naming_the_field(overrides, message):
    with pytest.raises((ValueError, StrictDataclassClassValidationError), match=message):
        tiny_config(**overrides)


def test_mutation_is_validated_again_on_save(tmp_path):
    config = tiny_config()
    config.num_experts, config.num_experts_per_tok = 2, 4
    with pytest.raises(StrictDataclassClassValidationError, match="num_experts_per_tok=4"):
        config.save_pretrained(tmp_path)


def test_unrolled_depth_and_layer_types():
    config = tiny_config(
        num_prelude_layers=1,
        num_core_layers=2,
        num_coda_layers=1,
        num_refinement_steps=2,
        max_refinement_steps=3,
        sliding_window=8,
        full_attention_interval=2,
        num_experts=4,
        first_k_dense_replace=1,
    )
    assert config.num_hidden_layers == 1 + 3 * 2 + 1
    physical = sliding_full_pattern(4, 2)
    assert physical == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert config.layer_types == [physical[config.physical_layer_index(u)] for u in range(8)]
    assert [config.physical_layer_index(u) for u in range(8)] == [0, 1, 2, 1, 2, 1, 2, 3]
    assert config.physical("layer_types") == physical
    assert config.physical("mlp_layer_types") == ["dense", "sparse", "sparse", "sparse"]


def test_defaults_and_round_trip(tmp_path):
    assert ApexConfig().num_hidden_layers == 8
    config = tiny_config("mla")
    assert config.head_dim == config.qk_rope_head_dim  # transformers' RoPE helpers read the rotary size from head_dim
    config.save_pretrained(tmp_path)
    assert ApexConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def test_legacy_rope_scaling_is_converted():
    config = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 2.0
