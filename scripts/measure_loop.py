"""Does the refinement loop earn its compute? Pre-trains loop variants on real text and compares them, in one run.

The text is the Python source of installed packages (default: transformers, torch, accelerate; never the standard
library), byte-level (vocabulary 256), split *by file* into train and held-out (a file is held out when the CRC32 of
its path modulo 10 is 0), so no held-out file was seen in training. Every variant trains on the same windows in the
same order, with the same optimizer and schedule (AdamW, warm-up then cosine, bf16 autocast on CUDA), through a plain
PyTorch loop: the loop recipe lives in the model (`ApexConfig.refinement_*`), so nothing here implements it.

Variants (the rows of the table; `--variants` picks some; ablations run only when named):
    k1                 K = 1, the P + C + D stack once
    k3_plain           K = 3 with verifier and spiral memory, no loop recipe (the model before the recipe)
    k3_recipe          K = 3 with the loop recipe (`LOOP_RECIPE`): what the presets with K > 1 use
    k3_recipe_memory   the recipe plus the spiral memory
    k3_no_exit_loss    the recipe without the exit loss (an ablation)
    k3_sampled         the recipe with 2..4 passes drawn per training step (an ablation)
    k3_state_norm      the recipe with the loop state normalised after every pass (an ablation)
    k3_sampled_deeper  the recipe with 3..6 passes drawn per training step, backpropagating through the last 3 (an
                       ablation)
    k3_coda_norm       the recipe with the loop's output normalised before the coda and the exits (an ablation)
    k3_recipe_mtp      the recipe with two multi-token prediction depths (an ablation; their drafts are what
                       `scripts/measure_decoding.py` speculates with)
    unique_depth       K = 1 with 3 x C unique core layers: the unrolled depth of K = 3, with ~2 x the parameters
    k1_equal_flops     K = 1 trained for as many steps as its FLOPs take to match K = 3's

It prints markdown tables and writes JSON: held-out loss (nats per byte and bits per byte) per variant and seed, the
change against K = 1 on the same seed, the seed-to-seed spread, each K = 3 model evaluated at K = 1 .. 2 x 3, training
tokens/s, and for the models with a verifier the early-exit curve: per `refinement_exit_threshold`, at the trained K
and at one pass fewer, held-out loss, the share of core passes skipped and batch-1 decode tokens/s (greedy, cached,
against fixed K).

    python scripts/measure_loop.py --steps 1200 --seeds 0 1 --out loop.json   # on a GPU
    python scripts/measure_loop.py --steps 1200 --seeds 1 --parallel --out loop.json  # variants side by side
    python scripts/measure_loop.py --smoke                                   # seconds, CPU, for the tests
    python scripts/measure_loop.py --scale cpu --steps 600 --seeds 1          # a smaller model, minutes on a CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from apex_hf import ApexConfig, ApexForCausalLM
from apex_hf.presets import LOOP_RECIPE


TRAINED_PASSES = 3
EVAL_PASSES = tuple(range(1, 2 * TRAINED_PASSES + 1))
HELD_OUT_MODULUS = 10
# Points of the early-exit curve: (passes, exit threshold). The scores are exp(-KL), so the useful thresholds are near
# 1; exits also combine with fewer passes than trained. The first point, fixed trained K, is the reference.
EXIT_SETTINGS = (
    (TRAINED_PASSES, None),
    *((TRAINED_PASSES, t) for t in (0.999, 0.995, 0.99, 0.95, 0.9, 0.7, 0.5)),
    (TRAINED_PASSES - 1, None),
    *((TRAINED_PASSES - 1, t) for t in (0.999, 0.99)),
    # More passes than trained, each token leaving once its prediction has settled: does the exit make extra test-time
    # compute safe where fixed extra passes raise the loss? (Skipped shares below 0 mean more passes than trained.)
    *((2 * TRAINED_PASSES, t) for t in (0.999, 0.99)),
)
EXIT_SETTING_KEYS = ("num_refinement_steps", "refinement_exit_threshold")  # how a curve point calls the model
PROGRESS_EVERY = 200  # training steps between progress lines

# The recipe under test is the presets' (`apex_hf.presets.LOOP_RECIPE`). A random number of passes per step
# (uniform 1..6 with backpropagation through the last 3, or uniform 2..4) cost held-out loss at every length tried:
# an ablation (`k3_sampled`), not the recipe.
SAMPLED = dict(
    refinement_sampling="uniform",
    refinement_sampling_min=TRAINED_PASSES - 1,
    refinement_sampling_max=TRAINED_PASSES + 1,
)
# At least the trained K, up to the 2 x K the evaluation runs, gradients through the last K passes only (Huginn trains
# this way, with a heavier tail): the extra passes are seen in training at the cost of their forward alone.
SAMPLED_DEEPER = dict(
    refinement_sampling="uniform",
    refinement_sampling_min=TRAINED_PASSES,
    refinement_sampling_max=2 * TRAINED_PASSES,
    refinement_backprop_steps=TRAINED_PASSES,
)


@dataclass
class Scale:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    moe_intermediate_size: int
    seq_len: int
    batch_size: int
    eval_windows: int
    core_layers: int = 4

    def config(self, **overrides) -> ApexConfig:
        fields = dict(
            vocab_size=256,
            hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            num_experts=self.num_experts,
            num_experts_per_tok=2,
            moe_intermediate_size=self.moe_intermediate_size,
            num_prelude_layers=2,
            num_core_layers=self.core_layers,
            num_coda_layers=2,
            # RMSNorm on every attention and MLP output (Gemma 3, Ouro, Huginn): measured to help every variant here,
            # K = 1 by 3 %, and the looped and deeper ones most (without it they trail K = 1 at 600 steps).
            sandwich_norms=True,
            max_position_embeddings=self.seq_len,
            pad_token_id=None,
            bos_token_id=None,
            eos_token_id=None,
        )
        fields.update(overrides)
        return ApexConfig(**fields)


SCALES = {
    "gpu": Scale(512, 8, 2, 16, 512, seq_len=1024, batch_size=16, eval_windows=256),
    "cpu": Scale(128, 4, 2, 8, 128, seq_len=128, batch_size=8, eval_windows=64),
    "smoke": Scale(32, 4, 2, 4, 32, seq_len=64, batch_size=4, eval_windows=4),
}


@dataclass
class Variant:
    name: str
    overrides: dict = field(default_factory=dict)
    core_multiplier: int = 1  # unique core layers x this
    step_multiplier: float = 1.0
    evaluate_passes: bool = False  # evaluate at every K in EVAL_PASSES
    ablation: bool = False  # trained only when named in --variants


LOOPED = dict(num_refinement_steps=TRAINED_PASSES, max_refinement_steps=max(EVAL_PASSES))
ABLATION = dict(evaluate_passes=True, ablation=True)
VARIANTS = {
    v.name: v
    for v in (
        Variant("k1"),
        Variant("k3_plain", dict(LOOPED, memory_injection="gated_add"), evaluate_passes=True),
        Variant("k3_recipe", dict(LOOPED, **LOOP_RECIPE), evaluate_passes=True),
        Variant("k3_recipe_memory", dict(LOOPED, **LOOP_RECIPE, memory_injection="gated_add"), evaluate_passes=True),
        Variant("k3_no_exit_loss", {**LOOPED, **LOOP_RECIPE, "refinement_exit_loss_coef": 0.0}, **ABLATION),
        Variant("k3_sampled", dict(LOOPED, **LOOP_RECIPE, **SAMPLED), **ABLATION),
        Variant("k3_state_norm", dict(LOOPED, **LOOP_RECIPE, refinement_state_norm="every_pass"), **ABLATION),
        Variant("k3_sampled_deeper", dict(LOOPED, **LOOP_RECIPE, **SAMPLED_DEEPER), **ABLATION),
        Variant("k3_coda_norm", dict(LOOPED, **LOOP_RECIPE, refinement_state_norm="before_coda"), **ABLATION),
        Variant("k3_recipe_mtp", dict(LOOPED, **LOOP_RECIPE, num_mtp_layers=2), **ABLATION),
        Variant(
            "k3_scaled_injection", {**LOOPED, **LOOP_RECIPE, "refinement_input_injection": "scaled_add"}, **ABLATION
        ),
        Variant("unique_depth", core_multiplier=TRAINED_PASSES),
        # Layers run per token, K = 3 with the recipe (P + 3C + D, and D again for each of the 2 earlier exits)
        # against K = 1 (P + C + D): the step multiplier that equals the recipe's training FLOPs.
        Variant("k1_equal_flops", step_multiplier=(2 + 3 * 4 + 2 + 2 * 2) / (2 + 4 + 2)),
    )
}


# --------------------------------------------------------------------------------------------------------------------
# Data: Python sources of installed packages, split by file


def package_files(packages: list[str]) -> list[tuple[str, Path]]:
    files = []
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"package {package!r} is not installed here; choose others with --packages")
        root = Path(next(iter(spec.submodule_search_locations)))
        files += [(f"{package}/{p.relative_to(root).as_posix()}", p) for p in sorted(root.rglob("*.py"))]
    return files


def byte_streams(packages: list[str], max_megabytes: float) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, held-out bytes, description). Files are joined with blank lines; a file is held out by its path,
    so both sides keep whole files."""
    train, held_out, budget = [], [], int(max_megabytes * 1e6)
    files = package_files(packages)
    for name, path in files:
        side = held_out if zlib.crc32(name.encode()) % HELD_OUT_MODULUS == 0 else train
        side.append(path.read_bytes() + b"\n\n")
        budget -= len(side[-1])
        if budget <= 0:
            break
    as_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()  # noqa: E731
    info = {"packages": packages, "files": len(train) + len(held_out), "held_out_files": len(held_out)}
    return as_tensor(train), as_tensor(held_out), info


def training_batches(stream: torch.Tensor, scale: Scale, steps: int, seed: int):
    """Random windows, the same for every variant of a seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - scale.seq_len, (scale.batch_size,), generator=generator)
        yield torch.stack([stream[s : s + scale.seq_len] for s in starts.tolist()])


def held_out_windows(stream: torch.Tensor, scale: Scale) -> torch.Tensor:
    """Evenly spaced windows over the held-out files, the same for every variant and seed."""
    starts = torch.linspace(0, len(stream) - scale.seq_len - 1, scale.eval_windows).long()
    return torch.stack([stream[s : s + scale.seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def held_out_loss(model, windows: torch.Tensor, device: torch.device, **call) -> float:
    """Mean next-byte cross-entropy in nats over the held-out windows (`call`: per-call loop settings)."""
    return held_out_loss_and_passes(model, windows, device, **call)[0]


@torch.no_grad()
def held_out_loss_and_passes(model, windows: torch.Tensor, device: torch.device, **call) -> tuple[float, float]:
    """Mean next-byte cross-entropy in nats, and the mean core passes a token ran."""
    model.eval()
    loss, passes = 0.0, 0.0
    for chunk in windows.split(16):
        chunk = chunk.to(device)
        with autocast(device):
            out = model(chunk, labels=chunk, **call)
        loss += out.loss.item() * len(chunk)
        passes += out.refinement_steps_used.float().mean().item() * len(chunk)
    model.train()
    return loss / len(windows), passes / len(windows)


@torch.no_grad()
def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int, device: torch.device, **call) -> float:
    """Greedy batch-1 decoding speed with the cache, after a short warm-up generation."""
    model.eval()
    settings = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **call)
    prompt = prompt.to(device)
    with autocast(device):
        model.generate(prompt, **{**settings, "max_new_tokens": 4, "min_new_tokens": 4})
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(prompt, **settings)
        if device.type == "cuda":
            torch.cuda.synchronize()
    model.train()
    return new_tokens / (time.perf_counter() - started)


def exit_curve(model, windows: torch.Tensor, device: torch.device, decode: bool) -> list[dict]:
    """Per point of `EXIT_SETTINGS`: held-out loss, the share of the trained K's core passes skipped and, with
    `decode`, batch-1 decode tokens/s (see `add_decode_speeds`)."""
    curve = []
    for num_passes, threshold in EXIT_SETTINGS:
        settings = dict(zip(EXIT_SETTING_KEYS, (num_passes, threshold)))
        loss, passes = held_out_loss_and_passes(model, windows, device, **settings)
        curve.append({**settings, "held_out_loss": loss, "passes_skipped": 1 - passes / TRAINED_PASSES})
    if decode:
        add_decode_speeds(model, windows, device, curve)
    return curve


def add_decode_speeds(model, windows: torch.Tensor, device: torch.device, curve: list[dict], rounds: int = 2) -> None:
    """Batch-1 decode tokens/s of every point of an exit curve: a quarter window of held-out prompt, up to 32 bytes
    generated (eager batch-1 decoding is slow). Measured in rounds over all points, keeping each one's median, so
    a change in the machine's load hits every point alike."""
    quarter = windows.shape[1] // 4
    prompt, new_tokens = windows[:1, :quarter], min(quarter, 32)
    speeds = [[] for _ in curve]
    for _ in range(rounds):
        for point, measured in zip(curve, speeds):
            settings = {key: point[key] for key in EXIT_SETTING_KEYS}
            measured.append(decode_tokens_per_s(model, prompt, new_tokens, device, **settings))
    for point, measured in zip(curve, speeds):
        point["decode_tokens_per_s"] = statistics.median(measured)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_variant(variant: Variant, args, scale: Scale, train_stream, windows, seed: int) -> dict:
    device = torch.device(args.device)
    overrides = {**variant.overrides, **args.override}
    config = scale.config(num_core_layers=scale.core_layers * variant.core_multiplier, **overrides)
    torch.manual_seed(seed)
    model = ApexForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = round(args.steps * variant.step_multiplier)
    started, tokens = time.perf_counter(), 0
    for step, batch in enumerate(training_batches(train_stream, scale, steps, seed)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, args.lr, warmup=max(steps // 20, 1))
        batch = batch.to(device, non_blocking=True)
        with autocast(device):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch.numel()
        if (step + 1) % PROGRESS_EVERY == 0:  # the loss read syncs; rarely, so a long run shows it is alive
            elapsed = time.perf_counter() - started
            print(f"    {variant.name} seed {seed} step {step + 1}/{steps}: loss {loss.item():.3f}, {elapsed:.0f} s")
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {
        "variant": variant.name,
        "seed": seed,
        "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_per_s": tokens / seconds,
        "held_out_loss": held_out_loss(model, windows, device),
    }
    if variant.evaluate_passes:
        result["held_out_loss_by_passes"] = {
            k: held_out_loss(model, windows, device, num_refinement_steps=k) for k in EVAL_PASSES
        }
    if config.has_refinement_verifier:
        result["exit_curve"] = exit_curve(model, windows, device, decode=not args.no_decode)
    if args.models is not None:
        model.save_pretrained(args.models / run_name(result))
    print(f"  {variant.name} seed {seed}: {json.dumps(result)}", flush=True)
    return result


def train_in_parallel(args, work: Path, models: Path) -> list[dict]:
    """Every (seed, variant) trained by its own process of this script at once, each saving its model to `models`
    and its report to `work`; their runs, in the usual order. A failed process ends the measurement with its log."""
    processes = []
    for seed in args.seeds:
        for name in args.variants:
            out, log = work / f"{name}-seed{seed}.json", work / f"{name}-seed{seed}.log"
            command = [sys.executable, __file__, *child_arguments(args), "--seeds", str(seed), "--variants", name]
            command += ["--no-decode", "--models", str(models), "--out", str(out)]
            with log.open("w") as log_file:
                processes.append((out, log, subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)))
    for out, log, process in processes:
        if process.wait() != 0:
            raise SystemExit(f"{out.stem} failed (exit status {process.returncode}):\n{log.read_text()[-3000:]}")
        print(log.read_text(), end="", flush=True)
    return read_runs([out for out, _, _ in processes])


def child_arguments(args) -> list[str]:
    """The settings a training process of `train_in_parallel` shares with this one."""
    arguments = ["--steps", str(args.steps), "--lr", str(args.lr), "--packages", *args.packages]
    arguments += ["--max-megabytes", str(args.max_megabytes), "--device", args.device]
    if args.override:
        arguments += ["--override", *(f"{name}={json.dumps(value)}" for name, value in args.override.items())]
    return arguments + (["--smoke"] if args.smoke else ["--scale", args.scale])


def read_runs(paths: list[Path]) -> list[dict]:
    """The runs of earlier `--out` reports, as `train_variant` returned them."""
    runs = [run for path in paths for run in json.loads(path.read_text())["runs"]]
    for run in runs:  # JSON made the pass counts strings
        if "held_out_loss_by_passes" in run:
            run["held_out_loss_by_passes"] = {int(k): v for k, v in run["held_out_loss_by_passes"].items()}
    return runs


def run_name(result: dict) -> str:
    return f"{result['variant']}-seed{result['seed']}"


def measure_saved_decode_speeds(runs: list[dict], models: Path, windows: torch.Tensor, device: torch.device) -> None:
    """Decode speeds for runs trained with `--no-decode`, from the models they saved: for one GPU shared by several
    training processes, speeds are measured afterwards, alone."""
    for run in runs:
        curve = run.get("exit_curve")
        if curve and "decode_tokens_per_s" not in curve[0]:
            if not (models / run_name(run)).is_dir():
                print(f"  decode {run_name(run)}: no saved model in {models}, speeds not measured", flush=True)
                continue
            model = ApexForCausalLM.from_pretrained(models / run_name(run)).to(device)
            add_decode_speeds(model, windows, device, curve)
            print(f"  decode {run_name(run)}: {[round(p['decode_tokens_per_s'], 1) for p in curve]}", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Report


def bits_per_byte(nats: float) -> float:
    return nats / math.log(2)


def paired_change_vs_k1(runs: list[dict], results: list[dict]) -> list[float]:
    """Relative held-out loss change against K = 1 trained on the same seed (same data order): the seed-to-seed
    spread of either side is larger than the differences between variants, the paired change is not."""
    k1 = {r["seed"]: r["held_out_loss"] for r in results if r["variant"] == "k1"}
    return [r["held_out_loss"] / k1[r["seed"]] - 1 for r in runs if r["seed"] in k1]


def mean_exit_curve(runs: list[dict]) -> list[dict]:
    """The exit curve averaged over seeds, with each point's change against the first (fixed trained K)."""
    curve = []
    for points in zip(*(r["exit_curve"] for r in runs)):
        point = {key: points[0][key] for key in EXIT_SETTING_KEYS}
        for key in ("held_out_loss", "passes_skipped", "decode_tokens_per_s"):
            if all(key in p for p in points):
                point[key] = statistics.mean(p[key] for p in points)
        curve.append(point)
    fixed = curve[0]
    for point in curve:
        point["loss_change"] = point["held_out_loss"] / fixed["held_out_loss"] - 1
        if "decode_tokens_per_s" in point:
            point["decode_speedup"] = point["decode_tokens_per_s"] / fixed["decode_tokens_per_s"]
    return curve


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        losses = [bits_per_byte(r["held_out_loss"]) for r in runs]
        row = {
            "variant": name,
            "parameters": runs[0]["parameters"],
            "steps": runs[0]["steps"],
            "seeds": len(runs),
            "held_out_bpb": statistics.mean(losses),
            "seed_spread_bpb": max(losses) - min(losses),
            "change_vs_k1_per_seed": paired_change_vs_k1(runs, results),
            "train_tokens_per_s": statistics.mean(r["train_tokens_per_s"] for r in runs),
        }
        if "exit_curve" in runs[0]:
            row["exit_curve"] = mean_exit_curve(runs)
        if "held_out_loss_by_passes" in runs[0]:
            row["bpb_by_passes"] = {
                k: statistics.mean(bits_per_byte(r["held_out_loss_by_passes"][k]) for r in runs) for k in EVAL_PASSES
            }
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    passes = " | ".join(f"K={k}" for k in EVAL_PASSES)
    header = "| variant | params | steps | seeds | held-out bits/byte | vs k1, each seed | seed spread | tokens/s"
    print(f"{header} | {passes} |")
    print("|---|---|---|---|---|---|---|---|" + "---|" * len(EVAL_PASSES))
    for r in rows:
        versus = ", ".join(f"{100 * change:+.1f} %" for change in r["change_vs_k1_per_seed"]) or "-"
        by_passes = r.get("bpb_by_passes", {})
        cells = " | ".join(f"{by_passes[k]:.3f}" if k in by_passes else "-" for k in EVAL_PASSES)
        print(
            f"| {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['steps']} | {r['seeds']} | {r['held_out_bpb']:.4f} "
            f"| {versus} | {r['seed_spread_bpb']:.4f} | {r['train_tokens_per_s']:,.0f} | {cells} |"
        )


def print_exit_table(rows: list[dict]) -> None:
    print("\n| variant | passes, exit | held-out bits/byte | vs fixed K | passes skipped | decode b1 tokens/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for p in r.get("exit_curve", []):
            threshold = p["refinement_exit_threshold"]
            setting = f"K = {p['num_refinement_steps']}" + ("" if threshold is None else f", exit at {threshold}")
            decode = f"{p['decode_tokens_per_s']:,.1f} ({p['decode_speedup']:.2f}x)" if "decode_speedup" in p else "-"
            print(
                f"| {r['variant']} | {setting} | {bits_per_byte(p['held_out_loss']):.4f} | "
                f"{100 * p['loss_change']:+.2f} % | {100 * p['passes_skipped']:.1f} % | {decode} |"
            )


def parse_override(parser: argparse.ArgumentParser, item: str) -> tuple[str, object]:
    name, separator, value = item.partition("=")
    if not separator or name not in ApexConfig.__dataclass_fields__:
        parser.error(f"--override {item!r}: expected FIELD=VALUE with FIELD an ApexConfig field")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value  # a bare string, e.g. memory_injection=gated_add


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_variants = [name for name, variant in VARIANTS.items() if not variant.ablation]
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=default_variants)
    parser.add_argument("--steps", type=int, default=1200, help="training steps of the K = 1 variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--packages", nargs="+", default=["transformers", "torch", "accelerate"])
    parser.add_argument("--max-megabytes", type=float, default=200.0, help="read at most this much source")
    parser.add_argument(
        "--override",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="ApexConfig fields set in every variant (VALUE is JSON, e.g. sandwich_norms=true)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (refuses an existing file)")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="report the runs of these earlier --out files together instead of training (one GPU can train several "
        "variants in parallel processes, one --out each)",
    )
    parser.add_argument("--models", type=Path, help="save each trained model here; with --merge, load them from here")
    parser.add_argument(
        "--no-decode",
        action="store_true",
        help="leave decode speeds out of the exit curve (measure them later, alone: --merge with --models)",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="train every (seed, variant) in its own process at once, then measure decode speeds alone: one GPU "
        "trains several of these small models faster side by side than one after the other",
    )
    parser.add_argument("--scale", choices=[name for name in SCALES if name != "smoke"], default="gpu")
    parser.add_argument("--smoke", action="store_true", help="a tiny model for a few steps on CPU: checks the script")
    args = parser.parse_args(argv)
    if args.parallel and args.merge:
        parser.error("--parallel trains, --merge reports earlier runs: one or the other")
    if args.out is not None and args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new path")
    for path in args.merge or []:
        if not path.is_file():
            parser.error(f"--merge {path}: no such file")
    args.override = dict(parse_override(parser, item) for item in args.override)
    if args.smoke:
        args.steps, args.seeds, args.max_megabytes, args.packages = 3, [0], 2.0, ["transformers"]
        args.scale = "smoke"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scale = SCALES[args.scale]
    train_stream, held_out_stream, data = byte_streams(args.packages, args.max_megabytes)
    windows = held_out_windows(held_out_stream, scale)
    print(f"data: {json.dumps(data)}; {len(train_stream):,} train bytes, {len(held_out_stream):,} held-out bytes")
    if args.merge:
        results = read_runs(args.merge)
        if args.models is not None:
            measure_saved_decode_speeds(results, args.models, windows, torch.device(args.device))
    elif args.parallel:
        with tempfile.TemporaryDirectory() as work:
            models = args.models or Path(work) / "models"
            results = train_in_parallel(args, Path(work), models)
            if not args.no_decode:
                measure_saved_decode_speeds(results, models, windows, torch.device(args.device))
    else:
        results = [
            train_variant(VARIANTS[name], args, scale, train_stream, windows, seed)
            for seed in args.seeds
            for name in args.variants
        ]
    rows = summarise(results)
    print_table(rows)
    print_exit_table(rows)
    if args.out is not None:
        report = {
            "data": data,
            "scale": scale.__dict__,
            "recipe": LOOP_RECIPE,
            "override": args.override,
            "rows": rows,
            "runs": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
