"""apex_hf: Hugging Face transformers integration for the Apex MoE + iterative-refinement LM.

Importing the package registers the `apex` model type with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM`,
and marks the classes for remote code, so `save_pretrained` writes `auto_map` and copies `modeling/` next to the
weights (a checkpoint then loads with `trust_remote_code=True` where apex_hf is not installed). Where PEFT is
installed it also registers Apex's default LoRA targets (`apex_hf.lora`).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.utils import is_peft_available

from .modeling.configuration_apex import ApexConfig, sliding_full_pattern
from .modeling.modeling_apex import ApexForCausalLM, ApexModel, ApexPreTrainedModel


__version__ = "0.1.0"

AutoConfig.register(ApexConfig.model_type, ApexConfig, exist_ok=True)
AutoModel.register(ApexConfig, ApexModel, exist_ok=True)
AutoModelForCausalLM.register(ApexConfig, ApexForCausalLM, exist_ok=True)
ApexConfig.register_for_auto_class()
ApexModel.register_for_auto_class("AutoModel")
ApexForCausalLM.register_for_auto_class("AutoModelForCausalLM")

if is_peft_available():  # PEFT is an optional extra; with it, `apex` gets default LoRA targets
    from . import lora  # noqa: F401

__all__ = ["ApexConfig", "ApexForCausalLM", "ApexModel", "ApexPreTrainedModel", "sliding_full_pattern"]
