"""LoRA and QLoRA for Apex with PEFT.

Importing this module registers Apex's default LoRA targets with PEFT, so `get_peft_model(model,
LoraConfig(task_type="CAUSAL_LM"))` works on an Apex model without `target_modules`. The routed experts are fused 3D
`nn.Parameter`s, not `nn.Linear`s: `target_modules` cannot reach them, `target_parameters` can (`default_lora_config`
adds them). `merge_lora` folds a saved adapter into its base and writes a checkpoint that loads without PEFT.

Train adapters with the aux-loss-free balancing off (`from_pretrained(path, router_bias_update_rate=0.0)`): the
router's correction bias is a buffer that every training forward updates, and an adapter saves only LoRA weights, so
the updated biases would be lost and base + adapter would route differently from the model that was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel
from transformers.utils import is_bitsandbytes_available, logging

from ..counting import build_on_meta
from ..modeling.configuration_apex import ApexConfig
from ..outputs import atomic_output_dir, check_new_output_dir
from ..stage_folder import check_model_folder


logger = logging.get_logger(__name__)

# Module-name suffixes, matched by PEFT on whole dotted components (`o_proj` never matches `output_gate.proj`,
# `gate_proj` never matches the router `mlp.gate`). Names a config does not build are simply not matched.
APEX_LORA_TARGET_MODULES = [
    # attention: GQA, and MLA with (`q_a_proj`/`q_b_proj`) or without (`q_proj`) a query low-rank
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    # SwiGLU MLPs: dense layers and shared experts
    "gate_proj",
    "up_proj",
    "down_proj",
    # refinement loop: the per-pass proposal / review / refinement heads, the anchor, the memory cross-attention read
    "proposal_proj",
    "review_proj",
    "refinement_proj",
    "anchor_proj",
    "memory_query",
    "memory_key",
    "memory_value",
]
# Left out on purpose:
# * the router `mlp.gate`: its logits are computed in fp32 and it carries the aux-loss-free correction bias. A
#   low-rank delta there moves expert assignment and load balance, which the balancing machinery does not watch.
# * `lm_head`: TRL's GRPO and RLOO trainers read log-probabilities from `lm_head.weight` through a fused head and
#   refuse an adapter on it; with tied embeddings it is also the input embedding table.
# * the verifier `refinement.verifier`: it learns a halting target made from the model's own predictions; adapting
#   it together with those predictions chases a moving target.
# * gates: the attention output gate and `memory_update` (half of its output is the memory's update gate) only scale
#   what the adapted projections produce; `score_embed` has a single input feature. Norms and `memory_gate` are
#   vectors, not Linear layers, so no target can reach them.

# Matched as suffixes of parameter names, so they reach the experts of every MoE layer (MTP layers included).
APEX_LORA_TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj"]

# Modules bitsandbytes must leave in full precision: the router (routing flips on rounding; it is no Linear today, so
# this only guards a future change), `lm_head` (giving a list replaces transformers' default skips, which hold it),
# the verifier, and `score_embed`, whose single input feature leaves nothing to save and forces bitsandbytes' slow
# kernel.
QLORA_SKIP_MODULES = ["mlp.gate", "lm_head", "refinement.verifier", "refinement.score_embed"]

TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[ApexConfig.model_type] = APEX_LORA_TARGET_MODULES


def default_lora_config(
    model_or_config: nn.Module | ApexConfig,
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    include_experts: bool = True,
    **overrides,
) -> LoraConfig:
    """A causal-LM `LoraConfig` on the default targets this model has, plus the routed experts if it has them.

    PEFT applies neither dropout nor DoRA to parameter targets, so `lora_dropout > 0` needs `include_experts=False`.
    `overrides` are passed to `LoraConfig` last (e.g. `target_modules`, `use_rslora`).
    """
    model = build_on_meta(model_or_config) if isinstance(model_or_config, ApexConfig) else model_or_config
    module_names = [name for name, _ in model.named_modules()]
    target_modules = [
        target for target in APEX_LORA_TARGET_MODULES if any(name.endswith(f".{target}") for name in module_names)
    ]
    parameter_names = [name for name, _ in model.named_parameters()]
    has_experts = any(
        name.endswith(f".{target}") for name in parameter_names for target in APEX_LORA_TARGET_PARAMETERS
    )
    target_parameters = APEX_LORA_TARGET_PARAMETERS if include_experts and has_experts else None
    if target_parameters and lora_dropout > 0:
        raise ValueError(
            f"lora_dropout={lora_dropout} cannot apply to the expert parameters (PEFT has no dropout for parameter "
            "targets); pass lora_dropout=0.0, or include_experts=False to adapt attention and MLPs only."
        )
    kwargs = dict(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        target_parameters=target_parameters,
    )
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def build_lora_config(section: dict, model: nn.Module | None = None, where: str = "peft") -> LoraConfig:
    """The `LoraConfig` of a recipe's `peft` section: `LoraConfig` fields plus `include_experts`. Without
    `target_modules` the targets are Apex's defaults for `model` (see `default_lora_config`). Without `model` the
    section is only checked, so a typo fails before anything is loaded."""
    # Imported here: `import peft` imports this module (to register the targets), and recipe.py would bring TRL along.
    from ..recipe import build_dataclass

    section = dict(section or {})
    include_experts = section.pop("include_experts", True)
    build_dataclass(LoraConfig, {"task_type": "CAUSAL_LM", **section}, where)  # unknown fields, bad values
    if model is None or "target_modules" in section:
        return LoraConfig(**{"task_type": "CAUSAL_LM", **section})
    return default_lora_config(model, include_experts=include_experts, **section)


def merge_lora(
    adapter_dir: str | Path,
    output_dir: str | Path,
    base_model: str | Path | PreTrainedModel | None = None,
    dtype: str | torch.dtype = "auto",
    overwrite: bool = False,
) -> Path:
    """Fold the LoRA adapter saved in `adapter_dir` into its base model and save the result to `output_dir`.

    The base is `base_model` (a path, a Hub id, or a loaded model, which is merged in place), else the adapter's
    `base_model_name_or_path`; a base loaded here gets `dtype` (`"auto"`: as saved). The output holds safetensors
    weights, the remote code (it loads with `trust_remote_code=True` where apex_hf is not installed) and the
    tokenizer, taken from the adapter folder or else the base folder. It is written to a temporary folder next to
    `output_dir` and renamed into place, so `output_dir` is either complete or absent; one that holds something is
    replaced only with `overwrite`, once the merged model is complete. Returns `output_dir`.
    """
    adapter_dir, output_dir = Path(adapter_dir), check_new_output_dir(output_dir, overwrite)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"no adapter in {adapter_dir}: {adapter_dir / 'adapter_config.json'} does not exist")

    if base_model is None:
        base_model = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
        if not base_model:
            raise ValueError(f"the adapter in {adapter_dir} does not name its base model; pass base_model=")
    if isinstance(base_model, nn.Module):
        base_source = base_model.name_or_path
    else:
        base_source = str(base_model)
        check_model_folder(base_source)
        base_model = AutoModelForCausalLM.from_pretrained(base_source, dtype=dtype)
    merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
    folders = [adapter_dir, Path(base_source)] if base_source else [adapter_dir]  # an in-memory base has no folder
    tokenizer_dir = next((folder for folder in folders if (folder / "tokenizer_config.json").is_file()), None)
    if tokenizer_dir is None:
        logger.warning(f"no tokenizer in {adapter_dir} or {base_source}: {output_dir} will have none")

    with atomic_output_dir(output_dir, overwrite) as staging:
        merged.save_pretrained(staging)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(staging)
    return output_dir


def quantization_config(load_in_4bit: bool) -> BitsAndBytesConfig | None:
    """QLoRA's 4-bit NF4 config (double quantization, bf16 compute), or None when `load_in_4bit` is False.

    bitsandbytes only quantizes `nn.Linear`: attention, dense/shared MLPs and the refinement projections become 4-bit,
    the routed experts (fused 3D parameters) stay in the dtype the model is loaded in, so load with
    `dtype=torch.bfloat16`. The router, `lm_head`, the verifier and `score_embed` are not quantized
    (`QLORA_SKIP_MODULES`).
    """
    if not load_in_4bit:
        return None
    missing = []
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False)")
    if not is_bitsandbytes_available():
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise RuntimeError(f"4-bit loading (QLoRA) needs {' and '.join(missing)}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=list(QLORA_SKIP_MODULES),
    )


def trainable_parameter_summary(model: nn.Module) -> dict:
    """Trainable and total parameter counts, the trainable percentage, and how many LoRA parameters sit on the routed
    experts, for logging."""
    if isinstance(model, PeftModel):
        # PEFT's count also handles packed 4-bit weights (two values per byte) and ZeRO-3 partitioned parameters.
        trainable, total = model.get_nb_trainable_parameters()
    else:
        trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
        total = sum(param.numel() for param in model.parameters())
    # By name rather than class, so that a model loaded as remote code counts too. `.experts.` is the routed experts'
    # module (`mlp.experts`, and `mlp.experts.base_layer` for its second wrapped parameter), never `shared_experts`.
    expert_lora = sum(
        param.numel() for name, param in model.named_parameters() if "lora_" in name and ".experts." in name
    )
    return {
        "trainable": trainable,
        "total": total,
        "percent": 100 * trainable / total if total else 0.0,
        "expert_lora": expert_lora,
    }


__all__ = [
    "APEX_LORA_TARGET_MODULES",
    "APEX_LORA_TARGET_PARAMETERS",
    "QLORA_SKIP_MODULES",
    "default_lora_config",
    "merge_lora",
    "quantization_config",
    "trainable_parameter_summary",
]
