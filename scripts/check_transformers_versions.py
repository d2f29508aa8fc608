"""Check that a saved Apex checkpoint runs right as Hub remote code under each transformers version a user may have.

Hub users load Apex with `trust_remote_code=True` under whatever transformers they have installed, outside the
package's pin. For each version this script

1. makes a throwaway environment holding only that transformers and its dependencies (`pip install --target`, cached
   under `.cache/transformers-versions/VERSION`; torch comes from the running interpreter);
2. saves a small Apex model with the package (refinement loop, memory, experts), with the package's logits and greedy
   generation for a left-padded batch;
3. in a `python -I` process where `apex_hf` cannot be imported, loads the folder as remote code under that version and
   checks that the logits match the package's, and that greedy generation with the cache equals generation without
   it and equals the package's.

    python scripts/check_transformers_versions.py                     # oldest supported and newest allowed
    python scripts/check_transformers_versions.py --versions 5.20.0   # any list; `installed` = this environment's

The default versions come from setup.cfg's `transformers>=LOW,<HIGH`: LOW itself, and the newest release pip finds
below HIGH. Exits 1 if any version fails.
"""

import argparse
import configparser
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parents[1]
ENVS = ROOT / ".cache" / "transformers-versions"
NEW_TOKENS = 12
LOGITS_TOLERANCE = 1e-5

# Runs under `python -I` in an empty folder, the version's environment first on sys.path and `apex_hf` blocked (an
# editable install would otherwise still expose it): only the files saved next to the weights can be used.
REMOTE_CODE_CHECK = """
import json, sys
environment, model_dir, reference_file = sys.argv[1:4]
if environment:
    sys.path.insert(0, environment)
sys.modules["apex_hf"] = None
import torch, transformers
from transformers import AutoModelForCausalLM

reference = torch.load(reference_file)
model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
inputs = {"input_ids": reference["input_ids"], "attention_mask": reference["attention_mask"]}
with torch.no_grad():
    logits = model(**inputs).logits
settings = dict(max_new_tokens=reference["new_tokens"], do_sample=False, pad_token_id=0)
cached = model.generate(**inputs, use_cache=True, **settings)
uncached = model.generate(**inputs, use_cache=False, **settings)
mask = inputs["attention_mask"].bool()
print(json.dumps({
    "version": transformers.__version__,
    "max_abs_logits_diff": (logits - reference["logits"])[mask].abs().max().item(),
    "cached_equals_uncached": torch.equal(cached, uncached),
    "cached_equals_package": torch.equal(cached, reference["generated"]),
}))
"""


def setup_cfg_range() -> tuple[str, str]:
    """(oldest supported version, full specifier) from setup.cfg's `transformers>=LOW,<HIGH`."""
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    requirement = next(
        line.strip()
        for line in parser["options"]["install_requires"].splitlines()
        if line.strip().startswith("transformers")
    )
    low = re.search(r">=\s*([\w.]+)", requirement)
    if low is None:
        raise SystemExit(f"setup.cfg: {requirement!r} has no lower bound (transformers>=X)")
    return low.group(1), requirement


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def newest_allowed(requirement: str) -> str:
    """The newest transformers release pip resolves for `requirement` (a wheel download, no dependencies)."""
    with tempfile.TemporaryDirectory() as folder:
        pip("download", "--no-deps", "--only-binary=:all:", "-d", folder, requirement)
        (wheel,) = Path(folder).glob("transformers-*.whl")
    return wheel.name.split("-")[1]


def environment_for(version: str) -> Path:
    """A folder with transformers==version and its dependencies, made once and reused."""
    target = ENVS / version
    done = target / ".complete"
    if not done.exists():
        pip("install", "--no-compile", "--upgrade", "--target", str(target), f"transformers=={version}")
        done.touch()
    return target


def save_reference(folder: Path) -> Path:
    """A small Apex checkpoint with every per-pass feature on, and the package's own logits and generation."""
    from apex_hf import ApexForCausalLM
    from apex_hf.presets import get_preset

    torch.manual_seed(0)
    config = get_preset("apex-tiny", memory_injection="gated_add", pad_token_id=0)
    model = ApexForCausalLM(config).eval()
    model.save_pretrained(folder / "model")
    input_ids = torch.randint(3, config.vocab_size, (2, 7))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding
    input_ids[1, :3] = 0
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    generated = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
    )
    reference = folder / "reference.pt"
    torch.save(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "logits": logits,
            "generated": generated,
            "new_tokens": NEW_TOKENS,
        },
        reference,
    )
    return reference


def check(version: str, folder: Path, reference: Path) -> dict:
    environment = "" if version == "installed" else str(environment_for(version))
    run = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_CODE_CHECK, environment, str(folder / "model"), str(reference)],
        cwd=folder,
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        return {"version": version, "error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else "failed"}
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["ok"] = (
        result["max_abs_logits_diff"] <= LOGITS_TOLERANCE
        and result["cached_equals_uncached"]
        and result["cached_equals_package"]
    )
    return result


def print_table(results: list[dict]) -> None:
    print("| transformers | max abs Δ logits vs package | cached == uncached | == package's generation | result |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['version']} | - | - | - | FAILED: {r['error']} |")
        else:
            print(
                f"| {r['version']} | {r['max_abs_logits_diff']:.1e} | {r['cached_equals_uncached']} "
                f"| {r['cached_equals_package']} | {'ok' if r['ok'] else 'FAILED'} |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--versions", nargs="+", help="transformers versions, or `installed` (default: setup.cfg's range)"
    )
    args = parser.parse_args(argv)
    if args.versions is None:
        oldest, requirement = setup_cfg_range()
        args.versions = list(dict.fromkeys([oldest, newest_allowed(requirement)]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reference = save_reference(folder)
        results = [check(version, folder, reference) for version in args.versions]
    print_table(results)
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
