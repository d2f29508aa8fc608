"""Function-preserving upcycling: a trained model grows new parts that compute nothing at initialisation, so the
upcycled model starts with exactly the source's outputs and training begins from the source's quality.

* **Dense -> MoE** (sparse upcycling, Komatsuzaki et al. 2022): every dense MLP becomes `num_experts` copies of
  itself behind a softmax router with `norm_topk_prob`. The chosen experts' weights sum to 1 and every expert is the
  old MLP, so the output is the MLP's whatever the router picks. The router starts random rather than zero so that
  tokens spread over the experts: each copy then sees different tokens and they drift apart from the first step.
  (Through the main loss alone the router has no gradient while the experts are identical - the weights always sum
  to one - so the load-balancing loss is what first moves it.) No noise is added to the copies: any would change the
  output.
* **Single pass -> refinement loop**: the core runs `num_refinement_steps` times. Each pass after the first moves the
  hidden state by `pass_gates[k] * (core(h) - h)` (`refinement_pass_gate`), and the spiral memory enters through
  `memory_gate`; both gates start at zero, so the extra passes are identities and the memory is not read until
  training opens the gates.

The source can be an Apex checkpoint or any family `apex_hf.convert.families` reads; it is converted first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..modeling.configuration_apex import MEMORY_INJECTIONS, ApexConfig, unrolled_physical_layers
from ..modeling.modeling_apex import ApexForCausalLM
from ..outputs import atomic_output_dir, check_new_output_dir
from .families import ConversionError, copy_tokenizer_files, load_as_apex


# Knobs that only describe the experts being replaced; the upcycled router and experts use their defaults.
_MOE_DEFAULTS = dict(
    router_scoring="softmax",
    norm_topk_prob=True,
    routed_scaling_factor=1.0,
    num_shared_experts=0,
    n_group=1,
    topk_group=1,
    router_bias=False,
    expert_bias=False,
    swiglu_limit=None,
)


def _knobs(config: ApexConfig) -> dict:
    """The config's own knobs, without the values `__post_init__` derives (they are re-derived)."""
    knobs = {k: v for k, v in config.to_dict().items() if k in ApexConfig.__annotations__}
    del knobs["num_hidden_layers"]
    if config.attention_type == "mla":
        del knobs["head_dim"]
    return knobs


def _relayout(knobs: dict, physical_attention: list[str], physical_mlp: list[str]) -> ApexConfig:
    """`knobs` with `layer_types` / `mlp_layer_types` unrolled from per-physical-layer lists for its loop layout."""
    layout = ("num_prelude_layers", "num_core_layers", "num_coda_layers", "max_refinement_steps")
    order = unrolled_physical_layers(*(knobs[name] for name in layout))
    knobs = {
        **knobs,
        "layer_types": [physical_attention[p] for p in order],
        "mlp_layer_types": [physical_mlp[p] for p in order],
    }
    return ApexConfig(**knobs)


def _new_model(config: ApexConfig, source: ApexForCausalLM) -> tuple[ApexForCausalLM, list[str]]:
    """A model of `config` holding every tensor of `source` that still fits; returns it and the keys it added."""
    model = ApexForCausalLM._from_config(
        config,
        attn_implementation=source.config._attn_implementation,
        experts_implementation=source.config._experts_implementation,
        dtype=source.dtype,
    )
    source_state = source.state_dict()
    model_state = model.state_dict()
    carried = {k: v for k, v in source_state.items() if k in model_state and model_state[k].shape == v.shape}
    model.load_state_dict(carried, strict=False)
    return model, sorted(set(model_state) - set(carried))


@torch.no_grad()
def upcycle_to_moe(
    source: ApexForCausalLM, num_experts: int, num_experts_per_tok: int = 2, seed: int = 0
) -> ApexForCausalLM:
    """Every dense MLP of `source` as `num_experts` copies of itself behind a new router (see the module docstring).
    The source must have no experts yet."""
    config = source.config
    if "sparse" in config.mlp_layer_types:
        raise ConversionError("the source already has expert layers; upcycling to MoE starts from a dense model")
    if not 1 <= num_experts_per_tok <= num_experts:
        raise ConversionError(f"num_experts_per_tok={num_experts_per_tok} must be in [1, num_experts={num_experts}]")
    knobs = {
        **_knobs(config),
        **_MOE_DEFAULTS,
        "num_experts": num_experts,
        "num_experts_per_tok": num_experts_per_tok,
        "moe_intermediate_size": config.intermediate_size,
    }
    physical_mlp = ["sparse"] * config.num_physical_layers
    model, added = _new_model(_relayout(knobs, config.physical("layer_types"), physical_mlp), source)
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(model.model.layers):
        dense = source.model.layers[index].mlp
        experts, router = layer.mlp.experts, layer.mlp.gate
        experts.gate_up_proj.copy_(torch.cat((dense.gate_proj.weight, dense.up_proj.weight)))  # to every expert
        experts.down_proj.copy_(dense.down_proj.weight)
        noise = torch.randn(router.weight.shape, generator=generator) * config.initializer_range
        router.weight.copy_(noise.to(router.weight.dtype))
        router.e_score_correction_bias.zero_()
        router.expert_load.zero_()
    unexpected = [k for k in added if not k.split(".mlp.")[-1].startswith(("experts.", "gate."))]
    if unexpected:  # everything else must have come from the source
        raise AssertionError(f"upcycling left tensors unset: {unexpected}")
    return model


@torch.no_grad()
def upcycle_to_refinement(
    source: ApexForCausalLM,
    num_refinement_steps: int,
    max_refinement_steps: int | None = None,
    memory_injection: str = "gated_add",
    num_prelude_layers: int | None = None,
    num_coda_layers: int | None = None,
) -> ApexForCausalLM:
    """`source` (one pass, no memory) with its core looped `num_refinement_steps` times, the extra passes and the
    memory gated to zero. `num_prelude_layers` / `num_coda_layers` re-split the stack (default: the source's)."""
    config = source.config
    if config.max_refinement_steps != 1 or config.has_refinement_memory:
        raise ConversionError(
            f"the source already loops (max_refinement_steps={config.max_refinement_steps}, memory_injection="
            f"{config.memory_injection!r}); upcycling to a refinement loop starts from a single-pass model"
        )
    if memory_injection not in MEMORY_INJECTIONS:
        raise ConversionError(f"memory_injection={memory_injection!r} must be one of {MEMORY_INJECTIONS}")
    prelude = config.num_prelude_layers if num_prelude_layers is None else num_prelude_layers
    coda = config.num_coda_layers if num_coda_layers is None else num_coda_layers
    core = config.num_physical_layers - prelude - coda
    if prelude < 0 or coda < 0 or core < 1:
        raise ConversionError(
            f"num_prelude_layers={prelude} + num_coda_layers={coda} must leave at least one of the source's "
            f"{config.num_physical_layers} layers for the core"
        )
    knobs = {
        **_knobs(config),
        "num_prelude_layers": prelude,
        "num_core_layers": core,
        "num_coda_layers": coda,
        "num_refinement_steps": num_refinement_steps,
        "max_refinement_steps": max(max_refinement_steps or num_refinement_steps, num_refinement_steps),
        "memory_injection": memory_injection,
        "refinement_pass_gate": True,
    }
    try:
        new_config = _relayout(knobs, config.physical("layer_types"), config.physical("mlp_layer_types"))
    except ValueError as error:
        raise ConversionError(str(error)) from error
    model, added = _new_model(new_config, source)
    if hasattr(model.model, "pass_gates"):
        model.model.pass_gates.zero_()
    if hasattr(model.model, "refinement"):
        model.model.refinement.memory_gate.zero_()
    unexpected = [k for k in added if not k.startswith(("model.refinement.", "model.pass_gates"))]
    if unexpected:
        raise AssertionError(f"upcycling left tensors unset: {unexpected}")
    return model


def upcycle_model(
    source: ApexForCausalLM,
    *,
    num_experts: int | None = None,
    num_experts_per_tok: int = 2,
    num_refinement_steps: int | None = None,
    max_refinement_steps: int | None = None,
    memory_injection: str = "gated_add",
    num_prelude_layers: int | None = None,
    num_coda_layers: int | None = None,
    seed: int = 0,
) -> ApexForCausalLM:
    """Dense -> MoE when `num_experts` is given, then single pass -> refinement loop when `num_refinement_steps` is."""
    if num_experts is None and num_refinement_steps is None:
        raise ConversionError("nothing to upcycle: give num_experts (dense -> MoE) and/or num_refinement_steps")
    model = source
    if num_experts is not None:
        model = upcycle_to_moe(model, num_experts, num_experts_per_tok, seed=seed)
    if num_refinement_steps is not None:
        model = upcycle_to_refinement(
            model, num_refinement_steps, max_refinement_steps, memory_injection, num_prelude_layers, num_coda_layers
        )
    return model


def upcycle_checkpoint(source: str | Path, output_dir: str | Path, overwrite: bool = False, **options) -> Path:
    """`upcycle_model` on the checkpoint folder `source` (Apex, or any family `apex_hf.convert.families` reads),
    saved to the new folder `output_dir` with the tokenizer files, written whole or not at all; one that holds
    something is replaced only with `overwrite`."""
    source, output_dir = Path(source), check_new_output_dir(output_dir, overwrite)
    upcycled = upcycle_model(load_as_apex(source), **options)
    with atomic_output_dir(output_dir, overwrite) as staging:
        upcycled.save_pretrained(staging)
        copy_tokenizer_files(source, staging)
    return output_dir


__all__ = ["upcycle_checkpoint", "upcycle_model", "upcycle_to_moe", "upcycle_to_refinement"]
