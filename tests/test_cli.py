"""The `apex-hf` command itself: `--help` and the light commands start without torch / transformers, `import apex_hf`
is light yet registers `apex` with the Auto classes whatever is imported first, and `info` refuses a folder that
holds no config rather than describing a default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apex_hf.cli import main


HEAVY_MODULES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "datatrove")
TESTS = Path(__file__).resolve().parent  # where a child process finds tiny_configs


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


# --------------------------------------------------------------------------------------------------------------------
# start-up: what a command imports before it needs it

PARSE_THEN_LIST_HEAVY_MODULES = f"""
import sys
from apex_hf.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("heavy:", sorted(name for name in {HEAVY_MODULES!r} if name in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["info", "--help"],
        ["pretrain", "--help"],
        ["sft", "--help"],
        ["grpo", "--help"],
        ["pipeline", "--help"],
        ["merge-lora", "--help"],
        ["convert", "--help"],
        ["upcycle", "--help"],
        ["demo", "--help"],
        ["eval", "--help"],
        ["preprocess", "--help"],
        ["presets"],
    ],
    ids=" ".join,
)
def test_help_and_light_commands_import_no_heavy_module(argv):
    result = run_python(PARSE_THEN_LIST_HEAVY_MODULES, *argv)
    assert result.returncode == 0, result.stderr
    assert "usage: apex-hf" in result.stdout or "apex-small" in result.stdout
    assert "heavy: []" in result.stdout


def test_import_apex_hf_is_light_and_registers_apex_on_first_use():
    code = """
import sys
import apex_hf
assert "torch" not in sys.modules and "transformers" not in sys.modules, "import apex_hf loaded torch / transformers"
from tiny_configs import BASE
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
config = AutoConfig.for_model("apex", **BASE)
assert type(config) is apex_hf.ApexConfig
assert type(AutoModelForCausalLM.from_config(config)) is apex_hf.ApexForCausalLM
assert type(AutoModel.from_config(apex_hf.ApexConfig(**config.to_diff_dict()))) is apex_hf.ApexModel
print("ok")
"""
    result = run_python(code)
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.parametrize(
    "first_import",
    [
        "from transformers import AutoModelForCausalLM",  # transformers first: registered when apex_hf is imported
        "from transformers import LlamaForCausalLM",  # imports the Auto classes from inside a half-imported module
        "import peft",  # with PEFT: the default LoRA targets too
        "from transformers import Trainer",
    ],
)
def test_registration_whatever_is_imported_first(first_import):
    code = f"""
import apex_hf
{first_import}
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS
assert CONFIG_MAPPING["apex"] is apex_hf.ApexConfig
assert MODEL_FOR_CAUSAL_LM_MAPPING[apex_hf.ApexConfig] is apex_hf.ApexForCausalLM
assert "apex" in LORA_TARGETS
print("ok")
"""
    result = run_python(code)
    assert result.stdout.strip() == "ok", result.stderr


def test_registering_the_lora_targets_leaves_trl_unloaded():
    """`import peft` registers Apex's LoRA targets by importing `apex_hf.posttrain.lora`, which must not bring TRL."""
    result = run_python("import sys, apex_hf, peft\nprint('trl loaded:', 'trl' in sys.modules)")
    assert result.stdout.strip() == "trl loaded: False", result.stderr


def test_model_imported_from_its_module_saves_auto_map(tmp_path):
    """`save_pretrained` writes `auto_map` (remote code) also when the classes come straight from `modeling/`."""
    code = """
import sys
from apex_hf.modeling.configuration_apex import ApexConfig
from apex_hf.modeling.modeling_apex import ApexForCausalLM
from tiny_configs import BASE
config = ApexConfig(**BASE)
ApexForCausalLM(config).save_pretrained(sys.argv[1])
"""
    result = run_python(code, str(tmp_path))
    assert result.returncode == 0, result.stderr
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_apex.ApexConfig",
        "AutoModelForCausalLM": "modeling_apex.ApexForCausalLM",
    }


# --------------------------------------------------------------------------------------------------------------------
# info: a folder must hold a config


def info_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["info", *argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no made-up model
    return captured.err


def test_info_of_a_folder_without_config_names_it(tmp_path, capsys):
    (tmp_path / "report.json").write_text("{}")  # e.g. the demo's report folder
    error = info_error([str(tmp_path)], capsys)
    assert error == f"apex-hf info: error: {tmp_path} has no config.json (it is not a saved model or config folder)\n"


def test_info_of_another_model_type_a_bad_file_and_a_missing_path(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert "is not an Apex config (model_type 'llama')" in info_error([str(tmp_path)], capsys)

    (tmp_path / "broken.json").write_text("{")
    assert f"{tmp_path / 'broken.json'} is not a JSON config" in info_error([str(tmp_path / "broken.json")], capsys)

    assert f"no such file or folder: {tmp_path / 'missing'}" in info_error([str(tmp_path / "missing")], capsys)
    assert "unknown preset 'nope'; known presets: apex-tiny" in info_error(["nope"], capsys)


def test_info_of_a_saved_config_file_and_a_preset(tmp_path, capsys):
    from apex_hf import ApexForCausalLM
    from apex_hf.presets import get_preset

    config = get_preset("apex-tiny")
    parameters = f"{sum(p.numel() for p in ApexForCausalLM(config).parameters()):,}"  # the model's own count
    config.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path / "config.json")]) == 0
    assert parameters in capsys.readouterr().out
    assert main(["info", "apex-tiny"]) == 0
    assert parameters in capsys.readouterr().out
