"""Pre-training measurements on CUDA GPUs; prints a markdown table and writes JSON.

Runs `apex-hf pretrain` with `recipes/bench-moe/pretrain.yaml` (300 steps of 8 x 2048 tokens, bf16) for each preset,
each in its own process (clean peak-memory counters), on a generated arithmetic corpus of `--corpus-mb` MB plus the
shipped prose corpus, and reads the numbers from each run's `stage_summary.json`: tokens/s in the steady state (after
the first log window, which holds the warm-up and any compilation), over the loop (first evaluation to last step) and
over the whole run (wall clock), MFU (torchtitan's convention, `apex_hf.counting`), peak memory, held-out loss
before and after, and the time a checkpoint takes. Beside each run, in the same invocation, `scripts/benchmark.py`'s
training step of the same preset at the same batch, sequence length and compile mode: the speed the loop is held to.
`--accelerate-config recipes/accelerate/fsdp2.yaml --num-processes 2` runs the same under `accelerate launch`.

    python scripts/measure_pretraining.py --out runs/pretraining
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from apex_hf.pretrain.train import SETUP_PHASES
from apex_hf.stage_folder import read_summary


REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = REPO_ROOT / "recipes" / "bench-moe" / "pretrain.yaml"
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from make_demo_data import SCALES, TaskRandom, corpus  # noqa: E402  (the demo's arithmetic document generators)


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(corpus(TaskRandom(str(seed), SCALES["demo"]["max_operand"]), int(megabytes * 1e6)))
    return path


def command(args: argparse.Namespace) -> list[str]:
    if args.accelerate_config is None:
        return [sys.executable, "-m", "apex_hf.cli"]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        args.accelerate_config,
        "--num_processes",
        str(args.num_processes),
        "-m",
        "apex_hf.cli",
    ]


def run_folder(args: argparse.Namespace, preset: str) -> Path:
    return args.work / f"{preset}-{args.tag}"


def check_outputs_are_new(args: argparse.Namespace) -> None:
    """A measurement is finished work: its JSON and run folders are replaced only with `--overwrite`, and the refusal
    comes before the first run, not after the first preset's."""
    existing = [args.out / f"pretraining-{args.tag}.json", *(run_folder(args, preset) for preset in args.presets)]
    existing = [str(path) for path in existing if path.exists()]
    if existing and not args.overwrite:
        raise SystemExit(f"{', '.join(existing)} exist(s): pass --overwrite to replace, or choose another --tag")


def measure(args: argparse.Namespace, preset: str, corpus_path: Path) -> dict:
    output_dir = run_folder(args, preset)
    datasets = (
        f"[{{path: text, data_files: data/tiny_corpus.txt, sample_by: paragraph, source: prose, weight: 0.1}}, "
        f"{{path: text, data_files: {corpus_path}, sample_by: paragraph, source: arithmetic, weight: 0.9}}]"
    )
    overrides = [
        "--model.preset",
        preset,
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(args.steps),
        "--data.datasets",
        datasets,
        *args.overrides,
    ]
    started = time.perf_counter()
    run = subprocess.run(
        # with --overwrite, a measurement run again with the same tag replaces the earlier one (whole, once it is
        # complete); without it, `check_outputs_are_new` has refused an earlier one before anything ran
        [
            *command(args),
            "pretrain",
            "--config",
            str(RECIPE),
            *(["--overwrite"] if args.overwrite else []),
            *overrides,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    (args.out / f"{preset}-{args.tag}.log").write_text(run.stdout + run.stderr)
    if run.returncode != 0:
        return {"preset": preset, "error": (run.stdout + run.stderr)[-3000:]}
    summary = read_summary(output_dir)
    config = json.loads((output_dir / "config.json").read_text())
    recipe = summary["config"]
    batch, seq_len = recipe["per_device_train_batch_size"], recipe["seq_len"]
    benchmark = benchmark_step(preset, batch, seq_len, recipe["torch_compile"], args.out / "benchmark-step.json")
    if "failed" in benchmark:  # the run's own numbers stay in its folder's stage_summary.json
        return {"preset": preset, "error": f"the benchmark step failed, {benchmark['failed']}"}
    return {
        "preset": preset,
        "processes": summary["num_processes"],
        "parameters": summary["num_parameters"],
        "active_parameters": summary["num_active_parameters"],
        "vocab_size": config["vocab_size"],
        "steps": args.steps,
        "tokens_per_step": summary["num_input_tokens_seen"] // args.steps,
        "tokens_per_second": summary["train_tokens_per_second"],
        "mfu_percent": summary["mfu"],
        "steady_tokens_per_second": summary["steady_tokens_per_second"],
        "steady_mfu_percent": summary["steady_mfu"],
        "warmup_seconds": summary["warmup_seconds"],
        "graphs_compiled_after_warmup": summary["graphs_compiled_after_warmup"],
        "loop_tokens_per_second": summary["loop_tokens_per_second"],
        "whole_run_tokens_per_second": summary["whole_run_tokens_per_second"],
        "compiled": recipe["torch_compile"],
        "benchmark_step_tokens_per_second": benchmark["train_tokens_per_s"],
        "benchmark_step_mfu_percent": 100 * benchmark["mfu"] if benchmark["mfu"] else None,
        "peak_memory_gib": summary["peak_memory_gib"],
        "eval_loss_before": summary["eval_loss_before"],
        "eval_loss_after": summary["eval_loss_after"],
        "wall_seconds_by_phase": summary["wall_seconds_by_phase"],
        "checkpoint_publishing_seconds": summary["checkpoint_publishing_seconds"],
        "wall_seconds": time.perf_counter() - started,
    }


def benchmark_step(preset: str, batch: int, seq_len: int, compiled: bool, out: Path) -> dict:
    """`scripts/benchmark.py`'s training step of the preset at the run's shape (one GPU, compiled layers where the
    run compiles), measured in its own process: the reference the loop is held to."""
    from benchmark import run_isolated

    settings = dict(experts=None, batch=batch, seq_len=seq_len, warmup=3, steps=10, train=True, decode=False, out=out)
    return run_isolated(f"apex:{preset}", "compiled" if compiled else "eager", argparse.Namespace(**settings))


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)  # no MFU / peak memory without a known GPU


def table(rows: list[dict]) -> str:
    """Tokens/s per GPU: steady state (after the first log window), the loop (first evaluation to last step:
    warm-up, evaluations and checkpoints included) and the whole run (the process's wall clock: setup and final save
    too), beside the benchmark step at the same shape; their ratios are the loop's overheads."""
    columns = [
        *("preset", "GPUs", "params (active)", "steady tokens/s per GPU (MFU %)", "loop", "whole run"),
        *("benchmark step (MFU %)", "steady / benchmark", "loop / steady", "whole / steady"),
        *("warm-up (graphs compiled after it)", "peak GiB", "held-out loss"),
        "seconds outside the steps: setup (model) / evaluation / checkpoints (publishing beside the steps) "
        "/ final save",
    ]
    lines = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | failed: see JSON |" + " |" * (len(columns) - 2))
            continue
        phases = r["wall_seconds_by_phase"]
        setup = sum(phases.get(name, 0.0) for name in SETUP_PHASES)
        outside = (
            f"{setup:.0f} ({phases['model']:.0f}) / {phases.get('evaluation', 0.0):.0f} / "
            f"{phases.get('checkpoints', 0.0):.0f} ({r['checkpoint_publishing_seconds']:.0f}) / "
            f"{phases.get('final_save', 0.0):.0f}"
        )
        recompiled = r["graphs_compiled_after_warmup"]
        warmup = f"{_number(r['warmup_seconds'], '.0f')} s" + ("" if recompiled is None else f" ({recompiled})")
        steady = (r["steady_tokens_per_second"] or r["tokens_per_second"]) / r["processes"]
        loop = r["loop_tokens_per_second"] / r["processes"]
        whole = r["whole_run_tokens_per_second"] / r["processes"]
        benchmark = r["benchmark_step_tokens_per_second"]
        lines.append(
            f"| {r['preset']}{' (compiled)' if r['compiled'] else ''} | {r['processes']} "
            f"| {r['parameters'] / 1e9:.2f}B ({r['active_parameters'] / 1e9:.2f}B) "
            f"| {steady:,.0f} ({_number(r['steady_mfu_percent'], '.1f')}) | {loop:,.0f} | {whole:,.0f} "
            f"| {benchmark:,.0f} ({_number(r['benchmark_step_mfu_percent'], '.1f')}) "
            f"| {steady / benchmark:.2f} | {loop / steady:.2f} | {whole / steady:.2f} | {warmup} "
            f"| {_number(r['peak_memory_gib'], '.1f')} "
            f"| {r['eval_loss_before']:.2f} -> {r['eval_loss_after']:.2f} | {outside} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/pretraining"))
    parser.add_argument("--work", type=Path, default=Path("outputs/measure-pretraining"), help="run folders")
    parser.add_argument("--presets", nargs="+", default=["bench-moe", "bench-moe-k3"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--corpus-mb", type=float, default=24.0)
    parser.add_argument("--accelerate-config", default=None)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--tag", default="1gpu", help="suffix of the run folders and the JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier measurement with the same tag")
    args, args.overrides = parser.parse_known_args()
    check_outputs_are_new(args)
    args.out.mkdir(parents=True, exist_ok=True)
    corpus_path = write_corpus(args.work / "arithmetic_corpus.txt", args.corpus_mb)
    rows = [measure(args, preset, corpus_path) for preset in args.presets]
    (args.out / f"pretraining-{args.tag}.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
