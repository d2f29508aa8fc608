"""Registers Apex with transformers' Auto classes (and its LoRA targets with PEFT) right after the modules that need
it are imported, so that `import apex_hf` stays free of torch and transformers (the `apex-hf` command starts in tens of
milliseconds, not seconds) and still keeps its promise: once apex_hf is imported, `AutoConfig.for_model("apex")`,
`AutoModelForCausalLM.from_config(...)` and `save_pretrained`'s `auto_map` work, whichever is imported first.

Standard library only: this module runs inside `import apex_hf`. Written by hand because neither transformers nor the
standard library offers a post-import hook.
"""

import importlib.abc
import sys


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from apex_hf.modeling.configuration_apex import ApexConfig

    AutoConfig.register(ApexConfig.model_type, ApexConfig, exist_ok=True)
    ApexConfig.register_for_auto_class()


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from apex_hf.modeling.configuration_apex import ApexConfig
    from apex_hf.modeling.modeling_apex import ApexForCausalLM, ApexModel

    AutoModel.register(ApexConfig, ApexModel, exist_ok=True)
    AutoModelForCausalLM.register(ApexConfig, ApexForCausalLM, exist_ok=True)
    ApexModel.register_for_auto_class("AutoModel")
    ApexForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def _register_lora_targets() -> None:
    from apex_hf.posttrain import lora  # noqa: F401  (importing it registers the targets with PEFT)


# Registration -> the modules any of which, once imported, calls for it (in this order). Either side may come first:
# transformers' Auto modules (`AutoModelForCausalLM.from_config(...)`) or Apex's own (`ApexForCausalLM(...)`).
_REGISTRATIONS = {
    _register_config: ("transformers.models.auto.configuration_auto", "apex_hf.modeling.configuration_apex"),
    _register_models: ("transformers.models.auto.modeling_auto", "apex_hf.modeling.modeling_apex"),
    _register_lora_targets: ("peft",),
}
# Modules whose imports are tracked: the triggers, and everything a registration imports.
_TRACKED_PACKAGES = ("transformers", "peft", "apex_hf")
_registered: set = set()
_imports_in_flight = 0


def _register_triggered() -> None:
    """Runs the registrations that an imported module calls for, once no tracked import is half-way: transformers
    imports its Auto modules from inside other modules (`modeling_layers` imports `AutoModel` at its top), and
    importing `modeling_apex` there would meet those modules half-initialised."""
    pending = [
        register
        for register, triggers in _REGISTRATIONS.items()
        if register not in _registered and any(name in sys.modules for name in triggers)
    ]
    if _imports_in_flight or not pending:
        return
    _registered.update(pending)  # before running: their own imports come back here
    for register in pending:
        register()


class _TrackedLoader(importlib.abc.Loader):
    """A tracked module's loader: counts the module as in flight while it executes, gives it back its own loader
    (for `inspect`, `linecache`, `runpy`), and then runs any registration that has become due."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):  # get_code, get_source, is_package, ... of the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        global _imports_in_flight
        module.__loader__ = module.__spec__.loader = self.loader
        _imports_in_flight += 1
        try:
            self.loader.exec_module(module)
        finally:
            _imports_in_flight -= 1
        _register_triggered()


class _RegisterAfterImports(importlib.abc.MetaPathFinder):
    """Post-import hook: finds the tracked modules with the finders after it on `sys.meta_path` and hands them
    `_TrackedLoader`s, until every registration has run. (It stays on `sys.meta_path`: removing it while an import
    walks that list would make the walk skip the next finder.)"""

    def find_spec(self, fullname, path, target=None):
        done = len(_registered) == len(_REGISTRATIONS)
        if done or fullname.partition(".")[0] not in _TRACKED_PACKAGES or self not in sys.meta_path:
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _TrackedLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """One hook per process, also when apex_hf is imported again (after being removed from sys.modules); then
    registers what is imported already."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if type(finder).__name__ != _RegisterAfterImports.__name__]
    sys.meta_path.insert(0, _RegisterAfterImports())
    _register_triggered()
