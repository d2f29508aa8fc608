"""`apex-hf` command line.

`info` / `presets`: sizes of a preset or a saved config. `pretrain` / `sft` / `dpo` / `grpo --config FILE`: one
training stage (`--field value` overrides the file). `pipeline FILE`: the stages in order. `merge-lora`: fold an
adapter into its base model. `convert SRC OUT`: a Llama / Qwen3 / Qwen3-MoE / Mixtral / DeepSeek-V3 / Gemma 3 /
GPT-OSS / GLM-4 checkpoint as Apex; `export SRC OUT --to FAMILY`: back; `upcycle SRC OUT`: dense -> MoE and / or
single pass -> refinement loop, outputs unchanged. `preprocess INPUT... --output OUT`: clean, filter and
deduplicate pre-training text (datatrove). `demo`: the CPU demo. Training commands run the same under
`accelerate launch` (`accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m apex_hf.cli sft --config ...`).
"""

from __future__ import annotations

# The standard library only, here and in `apex_hf/__init__.py`: `--help` and the light commands start in a fraction of
# a second, and each command imports torch / transformers / TRL when it runs.
import argparse
import json
import os
import signal
import sys
from pathlib import Path


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


def _info(args: argparse.Namespace) -> int:
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


def _presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS, TRAINING_SEQ_LEN

    for name in PRESETS:
        print(f"{name:<14} seq {TRAINING_SEQ_LEN.get(name, '-')}")
    return 0


def _convert_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .convert.families import ConversionError, convert_checkpoint, export_checkpoint
    from .convert.upcycle import upcycle_checkpoint

    try:
        if args.command == "convert":
            output = convert_checkpoint(args.source, args.output)
        elif args.command == "export":
            output = export_checkpoint(args.source, args.output, args.to)
        else:
            output = upcycle_checkpoint(
                args.source,
                args.output,
                num_experts=args.experts,
                num_experts_per_tok=args.experts_per_token,
                num_refinement_steps=args.refinement_steps,
                max_refinement_steps=args.max_refinement_steps,
                memory_injection=args.memory,
                num_prelude_layers=args.prelude_layers,
                num_coda_layers=args.coda_layers,
                seed=args.seed,
            )
    except (ConversionError, FileNotFoundError, FileExistsError) as error:
        parser.exit(2, f"apex-hf {args.command}: error: {error}\n")
    print(f"apex-hf {args.command}: wrote {output}")
    return 0


def _prepare_job(args: argparse.Namespace, overrides: list[str]):
    """Read and check everything a training command needs, and return the call that runs it. Errors here are bad
    input (a recipe, a path) and get a one-line message; errors while training keep their traceback."""
    if args.command in ("pretrain", "sft", "dpo", "grpo") and args.resume:
        overrides = [*overrides, "--resume_from_checkpoint", "latest"]
    if args.command == "pretrain":
        from .pretrain.config import load_pretrain_config
        from .pretrain.train import run_pretrain

        config = load_pretrain_config(args.config, overrides)
        return lambda: run_pretrain(config)
    if args.command == "pipeline":
        from .pipeline import plan_pipeline, run_pipeline

        plan = plan_pipeline(args.file, overrides)
        return lambda: run_pipeline(plan, resume=args.resume)
    if args.command == "merge-lora":
        from .posttrain.lora import merge_lora

        return lambda: merge_lora(args.adapter, args.output, base_model=args.base)
    from .posttrain.config import load_recipe
    from .posttrain.stages import run_stage

    recipe = load_recipe(args.config, args.command, overrides)
    return lambda: run_stage(recipe)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="apex-hf", description="Apex (MoE + iterative refinement) tools")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, KV cache and FLOPs of a preset or a saved config")
    info.add_argument("model", help="a preset name (see `apex-hf presets`), a saved model folder or its config.json")
    info.add_argument("--seq-len", type=int, default=None, help="default: the preset's training length")
    info.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached value (2 = bf16)")
    commands.add_parser("presets", help="list the preset names")

    for stage, description in (
        ("pretrain", "pre-train (or continue pre-training) with Accelerate"),
        ("sft", "supervised fine-tuning (TRL SFTTrainer)"),
        ("dpo", "preference optimisation (TRL DPOTrainer)"),
        ("grpo", "reinforcement learning with verifiable rewards (TRL GRPOTrainer)"),
    ):
        command = commands.add_parser(stage, help=description, description=f"{description}; --field value overrides")
        command.add_argument("--config", required=True, help=f"recipe YAML, e.g. recipes/apex-small/{stage}.yaml")
        command.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    pipeline = commands.add_parser("pipeline", help="run a pipeline of stages, each feeding the next")
    pipeline.add_argument("file", help="pipeline YAML, e.g. recipes/apex-small/pipeline.yaml")
    pipeline.add_argument("--resume", action="store_true", help="skip finished stages, resume an unfinished one")

    merge = commands.add_parser("merge-lora", help="merge a LoRA adapter into its base model and save the result")
    merge.add_argument("adapter", help="adapter folder (adapter_config.json + weights)")
    merge.add_argument("output", help="new folder for the merged model")
    merge.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")

    convert = commands.add_parser("convert", help="convert a checkpoint of an open model family to Apex")
    convert.add_argument("source", help="transformers checkpoint folder (config.json + weights)")
    convert.add_argument("output", help="new folder for the Apex checkpoint")
    export = commands.add_parser("export", help="export an Apex checkpoint to a model family's own format")
    export.add_argument("source", help="Apex checkpoint folder")
    export.add_argument("output", help="new folder for the exported checkpoint")
    export.add_argument("--to", required=True, help="model_type of the target family, e.g. llama, mixtral")
    upcycle = commands.add_parser(
        "upcycle", help="grow a model into an MoE and / or a refinement loop with its outputs unchanged at init"
    )
    upcycle.add_argument("source", help="Apex checkpoint folder, or any folder `apex-hf convert` reads")
    upcycle.add_argument("output", help="new folder for the upcycled Apex checkpoint")
    upcycle.add_argument("--experts", type=int, default=None, help="dense -> MoE with this many experts per layer")
    upcycle.add_argument("--experts-per-token", type=int, default=2, help="experts each token is routed to")
    upcycle.add_argument("--refinement-steps", type=int, default=None, help="single pass -> this many core passes")
    upcycle.add_argument("--max-refinement-steps", type=int, default=None, help="passes the cache has room for")
    upcycle.add_argument("--memory", default="gated_add", help="memory_injection of the loop (default gated_add)")
    upcycle.add_argument("--prelude-layers", type=int, default=None, help="layers before the loop (default: kept)")
    upcycle.add_argument("--coda-layers", type=int, default=None, help="layers after the loop (default: kept)")
    upcycle.add_argument("--seed", type=int, default=0, help="seed of the new routers")

    # ---- preprocess: owned by src/apex_hf/pretrain/preprocess.py, imported only when asked (it needs datatrove) ----
    preprocess_command = commands.add_parser(
        "preprocess", help="clean, quality-filter and deduplicate pre-training text into files a recipe reads"
    )
    if argv[:1] == ["preprocess"]:
        from .pretrain.preprocess import add_preprocess_arguments

        add_preprocess_arguments(preprocess_command)
    # ----------------------------------------------------------------------------------------------------------

    # ---- demo: owned by src/apex_hf/demo.py, imported only when asked so the rest works without it ----
    demo = commands.add_parser("demo", help="the whole pipeline on a small Apex, on CPU, in minutes")
    if argv[:1] == ["demo"]:
        from .demo import add_demo_arguments

        add_demo_arguments(demo)
    # ---------------------------------------------------------------------------------------------------

    args, overrides = parser.parse_known_args(argv)
    if overrides and args.command not in ("pretrain", "sft", "dpo", "grpo", "pipeline"):
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if args.command == "info":
        try:
            return _info(args)
        except (ValueError, FileNotFoundError) as error:  # an unknown preset or a bad path: a message, no traceback
            parser.exit(2, f"apex-hf info: error: {error}\n")
    if args.command == "presets":
        return _presets(args)
    if args.command == "preprocess":
        from .pretrain.preprocess import PreprocessError, config_from_args, preprocess

        try:
            config = config_from_args(args)
        except (ValueError, FileNotFoundError) as error:  # a bad flag or path
            parser.exit(2, f"apex-hf preprocess: error: {error}\n")
        try:
            preprocess(config)
        except (PreprocessError, ImportError) as error:  # the data (nothing read or kept), or orjson missing
            parser.exit(2, f"apex-hf preprocess: error: {error}\n")
        return 0
    if args.command in ("convert", "export", "upcycle"):
        return _convert_command(args, parser)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(args)
        return 0
    try:
        job = _prepare_job(args, overrides)
    except (ValueError, FileNotFoundError, ImportError) as error:  # ImportError: an extra's package is missing
        parser.exit(2, f"apex-hf {args.command}: error: {error}\n")
    from .pretrain.checkpoint import TrainingStopped

    try:
        job()
    except TrainingStopped as stopped:  # a SIGTERM, answered with a checkpoint: the shell's code for "terminated"
        print(f"apex-hf {args.command}: {stopped}", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
