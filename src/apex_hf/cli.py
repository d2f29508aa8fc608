"""`apex-hf` command line.

`info` / `presets`: sizes of a preset or a saved config. `pretrain` / `sft` / `dpo` / `grpo --config FILE`: one
training stage (`--field value` overrides the file). `pipeline FILE`: the stages in order. `merge-lora`: fold an
adapter into its base model. `convert SRC OUT`: a Llama / Qwen3 / Qwen3-MoE / Mixtral / DeepSeek-V3 / Gemma 3 /
GPT-OSS / GLM-4 checkpoint as Apex; `export SRC OUT --to FAMILY`: back; `upcycle SRC OUT`: dense -> MoE and / or
single pass -> refinement loop, outputs unchanged. `preprocess INPUT... --output OUT`: clean, filter and
deduplicate pre-training text (datatrove). `demo`: the CPU demo. `eval FOLDER --tasks ...`: lm-eval-harness on a
saved model (`apex_hf.harness`; the `eval` extra). `verify FOLDER`: check a folder against its manifest.
A command refuses an output folder that already holds something unless `--resume` or `--overwrite` says what to do
with it (`apex_hf.outputs.check_output_dir`), before it loads anything. Training commands run the same under
`accelerate launch` (`accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m apex_hf.cli sft --config ...`).

Each command is a row of `COMMANDS`: its help, the function that adds its arguments, and the function that runs it.
Bad input ends in a one-line message and exit status 2, whichever command meets it (`main`, `USER_ERRORS`): a recipe,
a flag, a path, a configuration, and for some commands the work itself (a checkpoint that cannot be converted, data
that leaves nothing). Any other error is a bug and keeps its traceback; `--debug` shows the traceback of bad input
too.
"""

from __future__ import annotations

# The standard library only, here and in what is imported below (`apex_hf/__init__.py`, the argument builders of
# `demo.py` and `pretrain/preprocess.py`): `--help` and the light commands start in a fraction of a second, and each
# command imports torch / transformers / TRL when it runs.
import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .arguments import at_least
from .demo import add_demo_arguments
from .outputs import check_new_output_dir, check_output_dir
from .pretrain.preprocess import add_preprocess_arguments
from .stage_folder import read_manifest, verify_folder


def _overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what the output folder holds, once the new one is complete"
    )


# What bad input raises, wherever a command meets it: ValueError (a nonsense value: recipes, ApexConfigError, a
# checkpoint that cannot be converted), OSError (a missing, unreadable or already existing path; transformers' "not a
# folder nor a Hub repo"), ImportError (the package of an extra is missing). `main` reports them in one line.
USER_ERRORS = (ValueError, OSError, ImportError)


class _Parser(argparse.ArgumentParser):
    """A usage mistake (an unknown flag, a value of the wrong type or range) is bad input too: one line, status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """An error's message on one line (some libraries' messages span several), or its class when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


@dataclass(frozen=True)
class Command:
    """One `apex-hf` command: a row of `COMMANDS`."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], object]
    run: Callable[[argparse.Namespace, list[str]], int]  # (arguments, recipe overrides) -> exit status
    description: str | None = None
    takes_overrides: bool = False  # the `--field value` pairs argparse does not know go to the recipe


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    command = COMMANDS[args.command]
    if overrides and not command.takes_overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    try:
        return command.run(args, overrides)
    except USER_ERRORS as error:
        if args.debug:
            raise
        parser.exit(2, f"apex-hf {args.command}: error: {one_line(error)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="apex-hf", description="Apex (MoE + iterative refinement) tools")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        subparser = commands.add_parser(name, help=command.help, description=command.description)
        command.add_arguments(subparser)
        subparser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


# --------------------------------------------------------------------------------------------------------------------
# info, presets


def _info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a preset name (see `apex-hf presets`), a saved model folder or its config.json")
    parser.add_argument("--seq-len", type=at_least(1), default=None, help="default: the preset's training length")
    parser.add_argument("--dtype-bytes", type=at_least(1), default=2, help="bytes per cached value (2 = bf16)")


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _human(value: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}".rstrip()
    return f"{value:.0f} {unit}".rstrip()


def _load_config(name_or_path: str):
    """A preset by name, or the Apex config of a saved model folder or a config.json file."""
    from .presets import PRESETS, get_preset

    if name_or_path in PRESETS:
        return get_preset(name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (it is not a saved model or config folder)")
        path = path / "config.json"
    elif not path.is_file():
        if name_or_path.endswith(".json") or "/" in name_or_path or os.sep in name_or_path:  # meant as a path
            raise FileNotFoundError(f"no such file or folder: {path}")
        return get_preset(name_or_path)  # raises, listing the known presets
    return _read_apex_config(path)


def _read_apex_config(path: Path):
    """`ApexConfig` of a config.json; any other model type is an error rather than an Apex with default sizes."""
    try:
        values = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not a JSON config: {error}") from None
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type != "apex":
        raise ValueError(
            f"{path} is not an Apex config (model_type {model_type!r}); `apex-hf convert` turns supported families"
            " into Apex"
        )
    from .modeling.configuration_apex import ApexConfig

    return ApexConfig.from_pretrained(path)


def _info(args: argparse.Namespace, overrides: list[str]) -> int:
    from .counting import count
    from .presets import TRAINING_SEQ_LEN

    config = _load_config(args.model)
    seq_len = args.seq_len or TRAINING_SEQ_LEN.get(args.model) or min(config.max_position_embeddings, 4096)
    result = count(config, seq_len=seq_len, dtype_bytes=args.dtype_bytes)
    dtype = f"{args.dtype_bytes}-byte values"
    rows = [
        ("total params", result.total),
        ("active params / token", result.active),
        ("non-embedding active / token", result.non_embedding_active),
        (f"KV cache / token, all layers full ({dtype})", result.kv_cache_bytes_per_token),
        (f"KV cache at seq len {seq_len} (sliding capped)", result.kv_cache_bytes_at_seq_len),
        (f"train FLOPs / token at seq len {seq_len}", result.train_flops_per_token),
    ]
    shape = (
        f"{args.model}: {config.attention_type}, hidden {config.hidden_size}, layers {config.num_prelude_layers}"
        f" + {config.num_core_layers} x K={config.num_refinement_steps} + {config.num_coda_layers}, "
        + (f"{config.num_experts} experts top-{config.num_experts_per_tok}" if config.num_experts else "dense")
        + f", memory {config.memory_injection}"
    )
    print(shape)
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        unit = "B" if label.startswith("KV") else "FLOP" if "FLOPs" in label else ""
        print(f"  {label:<{width}}  {value:>22,}  ({_human(value, unit)})")
    return 0


def _presets(args: argparse.Namespace, overrides: list[str]) -> int:
    from .presets import PRESETS, TRAINING_SEQ_LEN

    for name in PRESETS:
        print(f"{name:<14} seq {TRAINING_SEQ_LEN.get(name, '-')}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# training


def _stage_arguments(stage: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help=f"recipe YAML, e.g. recipes/apex-small/{stage}.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    _overwrite_argument(parser)


def _recipe_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    return [*overrides, "--resume_from_checkpoint", "latest"] if args.resume else overrides


def _pretrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pretrain.config import load_pretrain_config
    from .pretrain.train import resumes_in_place, run_pretrain

    config = load_pretrain_config(args.config, _recipe_overrides(args, overrides))
    check_output_dir(config.output_dir, resume=resumes_in_place(config), overwrite=args.overwrite)
    return _until_stopped(args, lambda: run_pretrain(config, overwrite=args.overwrite))


def _posttrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from .posttrain.config import load_recipe
    from .posttrain.stages import resumes_in_place, run_stage

    recipe = load_recipe(args.config, args.command, _recipe_overrides(args, overrides))
    check_output_dir(recipe.args.output_dir, resume=resumes_in_place(recipe), overwrite=args.overwrite)
    run_stage(recipe, overwrite=args.overwrite)
    return 0


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="pipeline YAML, e.g. recipes/apex-small/pipeline.yaml")
    parser.add_argument("--resume", action="store_true", help="skip finished stages, resume an unfinished one")
    _overwrite_argument(parser)


def _pipeline(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pipeline import check_stage_folders, plan_pipeline, run_pipeline

    plan = plan_pipeline(args.file, overrides)
    check_stage_folders(plan, args.resume, args.overwrite)
    return _until_stopped(args, lambda: run_pipeline(plan, resume=args.resume, overwrite=args.overwrite))


def _until_stopped(args: argparse.Namespace, train: Callable[[], object]) -> int:
    """Run `train`; a SIGTERM answered with a checkpoint ends with the shell's code for "terminated"."""
    from .pretrain.checkpoint import TrainingStopped

    try:
        train()
    except TrainingStopped as stopped:
        print(f"apex-hf {args.command}: {stopped}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def _merge_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + weights)")
    parser.add_argument("output", help="new folder for the merged model")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    _overwrite_argument(parser)


def _merge_lora(args: argparse.Namespace, overrides: list[str]) -> int:
    check_new_output_dir(args.output, overwrite=args.overwrite)  # before torch and the model load
    from .posttrain.lora import merge_lora

    merge_lora(args.adapter, args.output, base_model=args.base, overwrite=args.overwrite)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# convert, export, upcycle


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="transformers checkpoint folder (config.json + weights)")
    parser.add_argument("output", help="new folder for the Apex checkpoint")
    _overwrite_argument(parser)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Apex checkpoint folder")
    parser.add_argument("output", help="new folder for the exported checkpoint")
    parser.add_argument("--to", required=True, help="model_type of the target family, e.g. llama, mixtral")
    _overwrite_argument(parser)


def _upcycle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="Apex checkpoint folder, or any folder `apex-hf convert` reads")
    parser.add_argument("output", help="new folder for the upcycled Apex checkpoint")
    parser.add_argument(
        "--experts", type=at_least(1), default=None, help="dense -> MoE with this many experts per layer"
    )
    parser.add_argument("--experts-per-token", type=at_least(1), default=2, help="experts each token is routed to")
    parser.add_argument("--refinement-steps", type=at_least(1), default=None, help="single pass -> this many passes")
    parser.add_argument("--max-refinement-steps", type=at_least(1), default=None, help="passes the cache has room for")
    parser.add_argument("--memory", default="gated_add", help="memory_injection of the loop (default gated_add)")
    parser.add_argument(
        "--prelude-layers", type=at_least(0), default=None, help="layers before the loop (default: kept)"
    )
    parser.add_argument("--coda-layers", type=at_least(0), default=None, help="layers after the loop (default: kept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new routers")
    _overwrite_argument(parser)


def _convert(args: argparse.Namespace, overrides: list[str]) -> int:
    check_new_output_dir(args.output, overwrite=args.overwrite)  # before torch and the model load
    from .convert.families import convert_checkpoint, export_checkpoint
    from .convert.upcycle import upcycle_checkpoint

    if args.command == "convert":
        output = convert_checkpoint(args.source, args.output, overwrite=args.overwrite)
    elif args.command == "export":
        output = export_checkpoint(args.source, args.output, args.to, overwrite=args.overwrite)
    else:
        output = upcycle_checkpoint(
            args.source,
            args.output,
            overwrite=args.overwrite,
            num_experts=args.experts,
            num_experts_per_tok=args.experts_per_token,
            num_refinement_steps=args.refinement_steps,
            max_refinement_steps=args.max_refinement_steps,
            memory_injection=args.memory,
            num_prelude_layers=args.prelude_layers,
            num_coda_layers=args.coda_layers,
            seed=args.seed,
        )
    print(f"apex-hf {args.command}: wrote {output}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# preprocess, demo


def _preprocess(args: argparse.Namespace, overrides: list[str]) -> int:
    from .pretrain.preprocess import config_from_args, preprocess

    config = config_from_args(args)
    preprocess(config)
    return 0


def _demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from .demo import run_demo

    run_demo(args)
    return 0


# --------------------------------------------------------------------------------------------------------------------
# eval


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a saved model folder (config.json, weights, tokenizer), loaded as remote code")
    parser.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="lm-eval task names, separated by spaces or commas: apex_demo_answers (generation),"
        " apex_demo_answers_loglik (log-likelihood), or any lm-eval task whose data set this machine has"
        " (e.g. arc_easy)",
    )
    parser.add_argument("--limit", type=at_least(1), default=None, help="rows per task (default: all)")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda:0 (default cpu)")
    parser.add_argument("--num-fewshot", type=at_least(0), default=None, help="default: each task's own")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="plain-text prompts (a base model without a chat template)"
    )
    parser.add_argument(
        "--data",
        default=None,
        help="JSONL file of {prompt, answer} rows for the local tasks (default: the repository's"
        " data/demo/grpo_test.jsonl)",
    )
    parser.add_argument("--output", default=None, help="new JSON file for lm-eval's results (never overwritten)")


def _eval(args: argparse.Namespace, overrides: list[str]) -> int:
    from .harness import check_new_results_file, results_table, run_lm_eval, write_results

    if args.output is not None:
        check_new_results_file(args.output)  # before the model loads and the evaluation runs
    tasks = [task for argument in args.tasks for task in argument.split(",") if task]  # lm-eval's own CLI: commas
    results = run_lm_eval(
        args.folder,
        tasks,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        apply_chat_template=not args.no_chat_template,
        num_fewshot=args.num_fewshot,
        data=args.data,
    )
    print(results_table(results))
    if args.output is not None:
        print(f"apex-hf eval: wrote {write_results(results, args.output)}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# verify


def _verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="a stage, checkpoint or model folder with a manifest.json")


def _verify(args: argparse.Namespace, overrides: list[str]) -> int:
    """Exit 0 when every file matches the manifest; a one-line error naming the first bad file (exit 2) otherwise."""
    verify_folder(args.folder)
    files = read_manifest(args.folder)
    print(f"apex-hf verify: {args.folder}: intact ({len(files)} files match {Path(args.folder) / 'manifest.json'})")
    return 0


_STAGE_HELP = {
    "pretrain": "pre-train (or continue pre-training) with Accelerate",
    "sft": "supervised fine-tuning (TRL SFTTrainer)",
    "dpo": "preference optimisation (TRL DPOTrainer)",
    "grpo": "reinforcement learning with verifiable rewards (TRL GRPOTrainer)",
}

COMMANDS: dict[str, Command] = {
    "info": Command("parameters, KV cache and FLOPs of a preset or a saved config", _info_arguments, _info),
    "presets": Command("list the preset names", _no_arguments, _presets),
    **{
        stage: Command(
            summary,
            partial(_stage_arguments, stage),
            _pretrain if stage == "pretrain" else _posttrain,
            description=f"{summary}; --field value overrides",
            takes_overrides=True,
        )
        for stage, summary in _STAGE_HELP.items()
    },
    "pipeline": Command(
        "run a pipeline of stages, each feeding the next", _pipeline_arguments, _pipeline, takes_overrides=True
    ),
    "merge-lora": Command(
        "merge a LoRA adapter into its base model and save the result", _merge_lora_arguments, _merge_lora
    ),
    "convert": Command("convert a checkpoint of an open model family to Apex", _convert_arguments, _convert),
    "export": Command("export an Apex checkpoint to a model family's own format", _export_arguments, _convert),
    "upcycle": Command(
        "grow a model into an MoE and / or a refinement loop with its outputs unchanged at init",
        _upcycle_arguments,
        _convert,
    ),
    "preprocess": Command(
        "clean, quality-filter and deduplicate pre-training text into files a recipe reads",
        add_preprocess_arguments,
        _preprocess,
    ),
    "demo": Command("the whole pipeline on a small Apex, on CPU, in minutes", add_demo_arguments, _demo),
    "eval": Command(
        "evaluate a saved model with lm-eval-harness (local answer tasks or lm-eval's own)", _eval_arguments, _eval
    ),
    "verify": Command("check a folder's files against its manifest (SHA-256 and size)", _verify_arguments, _verify),
}


if __name__ == "__main__":
    sys.exit(main())
