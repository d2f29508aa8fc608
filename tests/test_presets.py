"""Presets build valid configs; the meta-device counter agrees with real models and hand formulas; the CLI runs."""

import time

import pytest
import torch

from apex_hf import ApexConfig, ApexForCausalLM
from apex_hf.cli import main
from apex_hf.counting import count, kv_cache_bytes
from apex_hf.presets import PRESETS, get_preset


def hand_count(config: ApexConfig) -> tuple[int, int]:
    """(total, active) of a GQA config with no gate, QK-norm or MTP, written out layer by layer."""
    hidden, heads, kv_heads, head_dim = (
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    )
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    norms = (4 if config.sandwich_norms else 2) * hidden
    dense = 3 * hidden * config.intermediate_size
    experts = config.num_experts * 3 * hidden * config.moe_intermediate_size
    experts_active = config.num_experts_per_tok * 3 * hidden * config.moe_intermediate_size
    sparse_rest = config.num_experts * hidden + config.num_shared_experts * 3 * hidden * config.moe_intermediate_size

    total = active = 0
    for mlp in config.physical("mlp_layer_types"):
        total += attention + norms + (experts + sparse_rest if mlp == "sparse" else dense)
        active += attention + norms + (experts_active + sparse_rest if mlp == "sparse" else dense)
    if config.has_refinement_verifier:
        width = config.refinement_dim
        refinement = hidden + hidden * width + (width + 1)  # input norm, refinement projection, verifier
        if config.memory_injection != "none":  # proposal, review, anchor, score embedding, update, memory_gate
            refinement += 3 * hidden * width + 2 * width + (5 * width * 2 * hidden + 2 * hidden) + hidden
        total, active = total + refinement, active + refinement
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2) + hidden  # + final norm
    return total + embeddings, active + embeddings


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_valid_config(name):
    config = get_preset(name)
    assert isinstance(config, ApexConfig)
    assert config.num_hidden_layers == len(config.layer_types)


def test_overrides_and_unknown_name():
    assert get_preset("apex-tiny", num_refinement_steps=1).num_refinement_steps == 1
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets: apex-tiny, apex-small"):
        get_preset("nope")


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_count_matches_the_real_model(tied):
    config = get_preset("apex-tiny", tie_word_embeddings=tied)
    model = ApexForCausalLM(config)
    real_total = sum(p.numel() for p in model.parameters())
    counted = count(config)
    assert counted.total == real_total == hand_count(config)[0]
    assert counted.active == hand_count(config)[1]
    assert counted.active < counted.total
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


@pytest.mark.parametrize("name", ["apex-small", "apex-mvp", "bench-moe", "bench-moe-k3", "bench-dense", "apus"])
def test_count_matches_hand_formula(name):
    config = get_preset(name)
    counted = count(config)
    assert (counted.total, counted.active) == hand_count(config)


def test_moe_active_below_total_and_dense_active_equals_total():
    for name in ("apex-tiny", "myth", "apus", "apex-1", "bench-moe", "apex-7b-lora"):
        counted = count(get_preset(name))
        assert counted.active < counted.total, name
    dense = count(get_preset("bench-dense"))
    assert dense.active == dense.total


def test_flops_follow_torchtitan_for_a_plain_dense_decoder():
    config = get_preset("bench-dense")  # K=1, untied, all layers full: torchtitan's formula applies exactly
    counted = count(config, seq_len=2048)
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * 2048
    assert counted.train_flops_per_token == 6 * counted.non_embedding_active + attention
    # the K=3 variant has the same weights but runs the core three times
    assert count(get_preset("bench-moe-k3"), seq_len=2048).train_flops_per_token > 1.9 * counted.train_flops_per_token


def test_kv_cache_counts_sliding_layers_up_to_the_window():
    config = get_preset("apex-mvp")  # 15 unrolled layers: 3 full (one per core pass), 12 sliding with window 128
    per_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    assert count(config).kv_cache_bytes_per_token == 15 * per_layer
    assert kv_cache_bytes(config, 2048) == per_layer * (3 * 2048 + 12 * 128)
    mla = get_preset("apex-1")  # MLA caches the latent and the rotary key: (512 + 64) values per unrolled layer
    assert count(mla).kv_cache_bytes_per_token == (2 + 2 * 12 + 2) * (512 + 64) * 2


def test_meta_count_of_the_largest_preset_is_fast_and_allocates_nothing():
    start = time.perf_counter()
    counted = count(get_preset("myth"))
    assert time.perf_counter() - start < 10
    assert 1.6e12 < counted.total < 1.8e12
    assert torch.empty(0).device.type == "cpu"  # the meta device context did not leak


def test_cli_info_presets_and_saved_config(capsys, tmp_path):
    parameters = f"{sum(p.numel() for p in ApexForCausalLM(get_preset('apex-tiny')).parameters()):,}"
    assert main(["info", "apex-tiny"]) == 0
    out = capsys.readouterr().out
    assert parameters in out and "train FLOPs / token at seq len 64" in out

    assert main(["info", "myth", "--seq-len", "131072"]) == 0
    assert "seq len 131072" in capsys.readouterr().out

    get_preset("apex-tiny").save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert parameters in capsys.readouterr().out

    assert main(["presets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PRESETS)

    with pytest.raises(SystemExit):
        main(["info", "nope"])
    assert "known presets: apex-tiny" in capsys.readouterr().err


def test_flops_count_the_exit_loss_coda_and_lm_head_once_per_earlier_pass():
    from apex_hf.counting import _attention_dims, _tokens_held

    config = get_preset("apex-tiny", tie_word_embeddings=False, refinement_exit_loss_coef=1.0)
    without = get_preset("apex-tiny", tie_word_embeddings=False, refinement_exit_loss_coef=0.0)
    model = ApexForCausalLM(config)
    coda = [model.model.layers[config.num_physical_layers - 1 - i] for i in range(config.num_coda_layers)]
    experts_share = config.num_experts_per_tok / config.num_experts
    coda_active = sum(
        p.numel() * (experts_share if ".experts." in f".{name}" else 1)
        for layer in coda
        for name, p in layer.named_parameters()
    )
    d_qk, d_v = _attention_dims(config)
    coda_attention = sum(
        6 * config.num_attention_heads * (d_qk + d_v) * _tokens_held(config, t, 64)
        for t in config.layer_types[config.unrolled_coda_start :]
    )
    per_exit = 6 * (coda_active + config.vocab_size * config.hidden_size) + coda_attention
    extra = count(config, seq_len=64).train_flops_per_token - count(without, seq_len=64).train_flops_per_token
    assert extra == pytest.approx((config.num_refinement_steps - 1) * per_exit)
