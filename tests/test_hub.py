"""save_pretrained / from_pretrained: local round trip, remote code in a process without apex_hf, Hub cache by id."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_configs import tiny_config
from transformers import AutoModelForCausalLM

from apex_hf import ApexForCausalLM


def saved_model(path, variant="gqa", **overrides):
    torch.manual_seed(0)
    model = ApexForCausalLM(tiny_config(variant, **overrides)).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_round_trip(tmp_path, tied):
    model = saved_model(tmp_path, tie_word_embeddings=tied)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (
        config["model_type"] == "apex"
        and config["auto_map"]["AutoModelForCausalLM"] == "modeling_apex.ApexForCausalLM"
    )
    assert (tmp_path / "modeling_apex.py").is_file() and (tmp_path / "configuration_apex.py").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is ApexForCausalLM
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    ids = torch.randint(3, 97, (2, 9))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, dict(loaded.named_buffers())[name]), name


# Runs in a fresh interpreter where `import apex_hf` fails, so only the files saved next to the weights can be used.
REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["apex_hf"] = None  # make the installed package unimportable
    import torch
    from transformers import AutoModelForCausalLM
    source, ids_file, out_file = sys.argv[1:4]
    try:
        import apex_hf
    except ImportError:
        pass
    else:
        raise SystemExit("apex_hf must not be importable here")
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.load(ids_file)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.save({"logits": model(ids).logits.detach(), "generated": generated}, out_file)
    """
)


def run_without_apex_hf(tmp_path, source, ids, env_extra=None):
    script, ids_file, out_file = tmp_path / "load.py", tmp_path / "ids.pt", tmp_path / "out.pt"
    script.write_text(REMOTE_CODE_SCRIPT)
    torch.save(ids, ids_file)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), **(env_extra or {}))
    result = subprocess.run(
        [sys.executable, str(script), str(source), str(ids_file), str(out_file)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_file)


@pytest.mark.parametrize("variant", ["gqa", "mla"])
def test_remote_code_from_folder_without_apex_hf(tmp_path, variant):
    model = saved_model(tmp_path / "ckpt", variant)
    ids = torch.randint(3, 97, (1, 7))
    result = run_without_apex_hf(tmp_path, tmp_path / "ckpt", ids)
    assert torch.equal(result["logits"], model(ids).logits.detach())
    assert torch.equal(result["generated"], model.generate(ids, max_new_tokens=4, do_sample=False))


def test_remote_code_by_repo_id_from_offline_hub_cache(tmp_path):
    model = saved_model(tmp_path / "ckpt")
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--apex-org--apex-tiny"
    shutil.copytree(tmp_path / "ckpt", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    ids = torch.randint(3, 97, (1, 7))
    result = run_without_apex_hf(tmp_path, "apex-org/apex-tiny", ids, {"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert torch.equal(result["logits"], model(ids).logits.detach())


def test_transformers_version_check_runs_on_the_installed_version(capsys):
    """`scripts/check_transformers_versions.py` (CI runs it for the oldest and newest supported transformers) works
    end to end; `installed` checks this environment's transformers without downloading anything."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import check_transformers_versions
    finally:
        sys.path.pop(0)
    assert check_transformers_versions.main(["--versions", "installed"]) == 0
    table = capsys.readouterr().out
    assert "| ok |" in table and "True | True" in table
