"""apex_hf: Hugging Face transformers integration for the Apex MoE + iterative-refinement LM.

With apex_hf imported, the `apex` model type is registered with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, and the classes are marked for remote code, so `save_pretrained` writes `auto_map` and
copies `modeling/` next to the weights (a checkpoint then loads with `trust_remote_code=True` where apex_hf is not
installed). Once PEFT is imported, Apex's default LoRA targets are registered with it too (`apex_hf.posttrain.lora`).

`import apex_hf` itself stays light (no torch, no transformers), so the `apex-hf` command starts fast: the classes
are imported on first access (`apex_hf.ApexConfig`), and each registration runs as soon as a module that calls for
it has been imported, whoever imports it (`apex_hf.registration`); what is imported already is registered at once.
"""

import importlib

from . import registration


__version__ = "0.1.0"

# Public name -> module that defines it, imported on first access.
_LAZY_NAMES = {
    "ApexConfig": ".modeling.configuration_apex",
    "ApexConfigError": ".modeling.configuration_apex",
    "sliding_full_pattern": ".modeling.configuration_apex",
    "ApexForCausalLM": ".modeling.modeling_apex",
    "ApexModel": ".modeling.modeling_apex",
    "ApexPreTrainedModel": ".modeling.modeling_apex",
}

__all__ = [
    "ApexConfig",
    "ApexConfigError",
    "ApexForCausalLM",
    "ApexModel",
    "ApexPreTrainedModel",
    "sliding_full_pattern",
]


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


registration.install()
