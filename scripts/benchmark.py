"""Apex against transformers' own MoE and dense models, side by side, in one run on one GPU.

Rows at the anchor shape (hidden 2048, 8 layers, 16 heads / 4 KV of 128, 64 experts top-8 of width 768, vocab
32000): Apex `bench-moe` (K = 1), `bench-moe-k3` (K = 3 with memory), `bench-dense`, and transformers'
`Qwen3MoeForCausalLM` and `LlamaForCausalLM` (dense SwiGLU of the same active width, 6144). Each MoE model runs its
default experts implementation on a GPU (`--experts` overrides both): transformers' grouped_mm for Qwen3-MoE, which
`generate` swaps for batched_mm while decoding, and Apex's own "apex_grouped_mm" for Apex.

* Training step: fp32 master weights under bf16 autocast, fused AdamW, `--batch` x `--seq-len` random tokens, router
  logits on (the load-balancing loss is part of the step). Tokens/s over the timed steps after warm-up; MFU in
  torchtitan's convention (`6 * active non-embedding params + 6 * L * H * (d_qk + d_v) * S` FLOPs per token, against
  the GPU's dense bf16 peak); peak memory.
* Training is measured eager and with each decoder layer compiled (`torch.compile`, regional, as the pre-training
  recipe's `torch_compile: true` does), for every model alike.
* LoRA: `lora:apex-7b-lora:TOKENS` fine-tunes the 7B-class preset with PEFT LoRA on one sequence of 4,096 and of
  16,384 tokens, the process capped at 24 GiB (`torch.cuda.set_per_process_memory_fraction`): tokens/s and peak
  memory, or the out-of-memory.
* Greedy decode: bf16 weights, a 32-token prompt, 128 new tokens, batch 1 and 32; `generate` with the dynamic cache,
  and with a static cache, for which transformers compiles the forward itself; and `apex_hf.decoding.GreedyDecoder`
  (the step compiled and captured as one CUDA graph), for every model alike.

Each model and mode runs in its own process (clean memory counters, no compiled graphs carried over). Prints a
markdown table and writes JSON, after every row. All rows take about 7 minutes on an H200 with warm torch.compile
caches and about 10.5 with cold ones (most of it compiling each model's decode step at both batch sizes); the
training modes can run apart, and a run stopped early (a time limit) finishes with `--resume`, which keeps the rows
it wrote:

    python scripts/benchmark.py --out runs/benchmark.json
    python scripts/benchmark.py --out runs/benchmark.json --resume
    python scripts/benchmark.py --training-modes compiled --out runs/benchmark_compiled.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from apex_hf import ApexForCausalLM
from apex_hf.counting import count, peak_flops_per_device
from apex_hf.decoding import GreedyDecoder
from apex_hf.presets import get_preset


PROMPT_TOKENS, NEW_TOKENS = 32, 128
TRAINING_LABELS = {"eager": "eager", "compiled": "compiled layers"}  # `--training-modes` -> the table's column
# the arguments a row's numbers depend on: `--resume` keeps an earlier row only where they are the same
ROW_SETTINGS = ("experts", "batch", "seq_len", "warmup", "steps", "train", "decode", "decode_batches")
DECODE_BATCHES = (1, 32)


def reference_configs() -> dict[str, object]:
    """transformers' Qwen3-MoE and Llama at bench-moe's shape."""
    shape = get_preset("bench-moe")
    trunk = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rope_parameters=dict(shape.rope_parameters),
        tie_word_embeddings=False,
    )
    return {
        "qwen3_moe": Qwen3MoeConfig(
            **trunk,
            num_experts=shape.num_experts,
            num_experts_per_tok=shape.num_experts_per_tok,
            moe_intermediate_size=shape.moe_intermediate_size,
            norm_topk_prob=True,
        ),
        "llama": LlamaConfig(**trunk, intermediate_size=shape.num_experts_per_tok * shape.moe_intermediate_size),
    }


def reference_flops_per_token(model: torch.nn.Module, seq_len: int) -> int:
    """torchtitan's convention for a plain decoder: routed experts count `k / E` of their weights."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    active = 0
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param is embedding:
                continue
            share = (config.num_experts_per_tok, config.num_experts) if name.endswith("mlp.experts") else (1, 1)
            active += param.numel() * share[0] // share[1]
    head_dim = config.head_dim
    return 6 * active + 6 * config.num_hidden_layers * config.num_attention_heads * 2 * head_dim * seq_len


def build(name: str, experts: str | None, seq_len: int) -> tuple[torch.nn.Module, int]:
    """The model in fp32 (training), initialized on the GPU, and its FLOPs per token at the benchmark's sequence
    length."""
    if name.startswith("apex:"):
        config = get_preset(name.removeprefix("apex:"))
        with torch.device("cuda"):
            model = ApexForCausalLM._from_config(config, attn_implementation="sdpa", experts_implementation=experts)
        return model, count(config, seq_len=seq_len).train_flops_per_token
    config = reference_configs()[name]
    model_class = Qwen3MoeForCausalLM if name == "qwen3_moe" else LlamaForCausalLM
    kwargs = {"experts_implementation": experts} if name == "qwen3_moe" and experts else {}
    with torch.device("cuda"):
        model = model_class._from_config(config, attn_implementation="sdpa", **kwargs)
    return model, reference_flops_per_token(model, seq_len)


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def training_step(model: torch.nn.Module, batch: int, seq_len: int) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), device="cuda")
    moe = getattr(model.config, "num_experts", 0) > 0

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, output_router_logits=moe).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def train(model: torch.nn.Module, flops_per_token: int, args: argparse.Namespace) -> dict:
    model.train()
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(training_step(model, args.batch, args.seq_len), args.warmup, args.steps)
    tokens_per_second = args.batch * args.seq_len / seconds
    peak = peak_flops_per_device("cuda")
    return {
        "train_tokens_per_s": round(tokens_per_second),
        "mfu": tokens_per_second * flops_per_token / peak if peak else None,
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "flops_per_token": flops_per_token,
    }


def greedy_generation(model: torch.nn.Module, batch: int, static: bool) -> Callable[[], None]:
    """One `generate` call: a random `PROMPT_TOKENS` prompt, exactly `NEW_TOKENS` new tokens."""
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), device="cuda")
    kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    return lambda: model.generate(prompt, **kwargs)


def for_decoding(model: torch.nn.Module) -> torch.nn.Module:
    """The trained model as it is served: bf16 weights, eval mode, no router logits."""
    model.config.output_router_logits = False
    return model.to(torch.bfloat16).eval()


def decode(model: torch.nn.Module, batch: int, static: bool) -> float:
    seconds = timed(greedy_generation(model, batch, static), warmup=2 if static else 1, steps=2)
    return batch * NEW_TOKENS / seconds


def graphed_decode(model: torch.nn.Module, batch: int) -> dict:
    """The same generation through the device-side loop (its first call compiles and captures the step): tokens/s,
    and the share of its tokens equal to static-cache `generate`'s (both compiled, bf16)."""
    decoder = GreedyDecoder(model, max_length=PROMPT_TOKENS + NEW_TOKENS, batch_size=batch)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), device="cuda")
    seconds = timed(lambda: decoder.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True), warmup=2, steps=3)
    graphed = decoder.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    reference = model.generate(prompt, cache_implementation="static", **settings)
    same_tokens = (graphed == reference)[:, PROMPT_TOKENS:].float().mean().item()
    return {"graphed": round(batch * NEW_TOKENS / seconds, 1), "graphed_same_tokens": round(same_tokens, 3)}


def compile_layers(model: torch.nn.Module) -> None:
    """Regional compilation (each decoder layer on its own), as torchtitan does: the layers share one compiled
    graph, and the routing's data-dependent parts stay outside whole-model graph constraints."""
    for layer in model.model.layers:
        layer.compile()


LORA_MEMORY_GIB = 24  # the single-GPU LoRA budget: a 24 GiB card
LORA_SEQ_LEN = 4096  # `lora:PRESET`; `lora:PRESET:TOKENS` sets another length


def measure_lora(preset: str, seq_len: int, args: argparse.Namespace) -> dict:
    """LoRA (Apex's default targets, experts included) on a bf16 `preset`, one sequence of `seq_len` tokens per step,
    with the process capped at `LORA_MEMORY_GIB` as on a 24 GiB card, activation checkpointing on: tokens/s and peak
    memory, or the OOM."""
    from peft import get_peft_model

    from apex_hf.posttrain.lora import default_lora_config

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(LORA_MEMORY_GIB * 2**30 / total)
    with torch.device("cuda"):
        model = ApexForCausalLM._from_config(
            get_preset(preset), attn_implementation="sdpa", experts_implementation=args.experts, dtype=torch.bfloat16
        )
    model.gradient_checkpointing_enable()
    experts = model.config._experts_implementation
    row = {"model": f"lora:{preset}:{seq_len}", "experts": experts, "training": f"LoRA, {LORA_MEMORY_GIB} GiB cap"}
    model = get_peft_model(model, default_lora_config(model)).train()
    torch.cuda.reset_peak_memory_stats()
    try:
        seconds = timed(training_step(model, 1, seq_len), args.warmup, args.steps)
    except torch.OutOfMemoryError:
        return {**row, "train_tokens_per_s": 0, "mfu": None, "train_peak_gib": LORA_MEMORY_GIB, "oom": True}
    return {
        **row,
        "train_tokens_per_s": round(seq_len / seconds),
        "mfu": None,
        "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "seq_len": seq_len,
    }


def measure(name: str, compiled: bool, args: argparse.Namespace) -> dict:
    if name.startswith("lora:"):
        preset, _, seq_len = name.removeprefix("lora:").partition(":")
        return measure_lora(preset, int(seq_len or LORA_SEQ_LEN), args)
    model, flops = build(name, args.experts, args.seq_len)
    if compiled:
        compile_layers(model)
    experts = model.config._experts_implementation if getattr(model.config, "num_experts", 0) else None
    row = {"model": name, "experts": experts, "training": TRAINING_LABELS["compiled" if compiled else "eager"]}
    if args.train:
        row.update(train(model, flops, args))
    gc.collect()
    torch.cuda.empty_cache()
    if compiled or not args.decode:  # compiled layers would recompile for every decode shape; decode compiles apart
        return row
    model = for_decoding(model)
    for batch in args.decode_batches:
        cells = {"dynamic": round(decode(model, batch, static=False), 1)}
        cells |= compiled_cells(name, "static_compile", static_cache_decode, model, batch)
        cells |= compiled_cells(name, "graphed", graphed_decode, model, batch)
        row |= {f"decode_b{batch}_{way}": value for way, value in cells.items()}
    return row


def static_cache_decode(model: torch.nn.Module, batch: int) -> dict:
    """transformers compiles the forward itself when generating with a static cache on a GPU."""
    return {"static_compile": round(decode(model, batch, static=True), 1)}


def compiled_cells(name: str, way: str, measure: Callable[..., dict], *args) -> dict:
    """A compiled way's cells, or how it failed: a model that does not compile is a result to report."""
    try:
        return measure(*args)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        print(f"{name}: {error}", flush=True)
        return {way: f"failed: {type(error).__name__}"}


def top_kernels(step: Callable[[], None], rows: int) -> str:
    """A markdown table of the CUDA kernels of one `step` (run after warm-up), by total time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        step()
        torch.cuda.synchronize()
    events = [e for e in profiler.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    lines = [f"GPU time {total / 1e3:.1f} ms", "", "| kernel | ms | share | calls |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:rows]:
        share = e.self_device_time_total / total
        lines.append(f"| `{e.key[:90]}` | {e.self_device_time_total / 1e3:.2f} | {100 * share:.1f} % | {e.count} |")
    return "\n".join(lines)


def profile(name: str, compiled: bool, args: argparse.Namespace, rows: int = 25) -> str:
    """Where the GPU time goes: the top kernels of one training step (eager, or with compiled layers), and of one
    static-cache greedy generation of `NEW_TOKENS` at batch 1 and 32 (bf16)."""
    model, _ = build(name, args.experts, args.seq_len)
    if compiled:
        compile_layers(model)
    step = training_step(model.train(), args.batch, args.seq_len)
    timed(step, warmup=3, steps=1)
    report = [f"### {name}: one training step ({'compiled layers' if compiled else 'eager'})", top_kernels(step, rows)]
    if compiled:
        return "\n\n".join(report)
    model = for_decoding(model)
    for batch in args.decode_batches:
        generate = greedy_generation(model, batch, static=True)
        timed(generate, warmup=2, steps=1)
        report += [f"### {name}: static-cache decode, batch {batch}", top_kernels(generate, rows)]
    return "\n\n".join(report)


ROW_PREFIX = "BENCHMARK_ROW "


def run_isolated(name: str, mode: str, args: argparse.Namespace) -> dict:
    """Measure one model in a fresh process: clean peak-memory counters, and no compiled graphs or recompilation
    budget (`torch._dynamo`'s caches) carried over from the models before it."""
    command = [sys.executable, __file__, "--single", "--models", name, "--training-modes", mode]
    command += ["--experts", args.experts] if args.experts else []
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--out", str(args.out)]
    command += [] if args.train else ["--no-train"]
    command += ["--decode-batches", *map(str, args.decode_batches)] if args.decode else ["--no-decode"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    rows = [line.removeprefix(ROW_PREFIX) for line in result.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if result.returncode != 0 or not rows:
        # The rows after it still run (GPU time is scarce, and one model's failure says nothing about the next);
        # the failure is printed here, kept in the JSON and the table, and `main` exits non-zero at the end.
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"measuring {name} ({mode}) failed with exit code {result.returncode}: {last_line}", flush=True)
        return {
            "model": name,
            "training": TRAINING_LABELS[mode],
            "failed": f"exit code {result.returncode}: {last_line[:200]}",
        }
    print(f"{rows[0]}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return json.loads(rows[0])


def earlier_rows(out: Path, report: dict, resume: bool) -> dict[tuple[str, str], dict]:
    """The rows a run that stopped early (a time limit, a crash) wrote to `out`, by (model, training), for `--resume`
    to keep: only from the same GPU, torch and `ROW_SETTINGS`, and never its failed rows (the models and modes may
    differ: a resumed run can also add rows). Without `--resume` an existing `out` is refused: it holds a finished
    measurement."""
    if not out.exists():
        return {}
    if not resume:
        raise SystemExit(f"{out} exists; choose another --out, or pass --resume to finish the run that wrote it")
    written = json.loads(out.read_text())
    for key in ("device", "torch"):
        if written.get(key) != report[key]:
            raise SystemExit(
                f"--resume: {out} was measured with {key} {written.get(key)!r}, this run has {report[key]!r}"
            )
    for key in ROW_SETTINGS:
        value = report["args"][key]
        if written["args"].get(key) != value:
            raise SystemExit(
                f"--resume: {out} was measured with {key} = {written['args'].get(key)!r}, this run has {value!r}"
            )
    return {(row["model"], row["training"]): row for row in written["rows"] if "failed" not in row}


def table(rows: list[dict]) -> str:
    """One line per model and training mode; "vs Llama" compares with Llama trained the same way."""
    lines = [
        "| model | training | train tokens/s | vs Llama | MFU | peak GiB | decode b1 dynamic / static+compile / "
        "graphed | decode b32 dynamic / static+compile / graphed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = next((d for d in rows if d["model"] == "llama" and d["training"] == r["training"]), None)
        training_cells = ["-"] * 4  # decode-only rows (`--no-train`)
        if "failed" in r:
            lines.append(f"| {r['model']} | {r['training']} | failed: {r['failed']} |" + " - |" * 5)
            continue
        if "train_tokens_per_s" in r:
            training_cells = [
                f"{r['train_tokens_per_s']:,}",
                f"{r['train_tokens_per_s'] / dense['train_tokens_per_s']:.2f}x" if dense else "-",
                f"{100 * r['mfu']:.1f} %" if r["mfu"] else "-",
                f"{r['train_peak_gib']:.1f}",
            ]
        decode_cells = [
            " / ".join(str(r.get(f"decode_b{b}_{way}", "-")) for way in ("dynamic", "static_compile", "graphed"))
            for b in DECODE_BATCHES
        ]
        lines.append(f"| {r['model']} | {r['training']} | " + " | ".join(training_cells + decode_cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models",
        nargs="+",
        default=[
            *("llama", "qwen3_moe", "apex:bench-dense", "apex:bench-moe", "apex:bench-moe-k3"),
            *("lora:apex-7b-lora:4096", "lora:apex-7b-lora:16384"),
        ],
        help="`llama`, `qwen3_moe`, `apex:<preset>` or `lora:<preset>[:<tokens>]` (LoRA under a 24 GiB cap, one "
        "sequence of 4,096 tokens unless given)",
    )
    parser.add_argument("--experts", help="experts implementation of the MoE models (default: each model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-train", dest="train", action="store_false", help="decode rows only")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="training rows only")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    parser.add_argument(
        "--training-modes",
        nargs="+",
        choices=list(TRAINING_LABELS),
        default=["eager", "compiled"],
        help="eager, and/or torch.compile of each decoder layer (compiled rows measure training only)",
    )
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--profile",
        nargs="*",
        default=[],
        help="models whose training step and decode are also profiled (top kernels)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/benchmark.json"),
        help="JSON, written after every row; an existing file is refused unless --resume",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows that an interrupted run with the same GPU and arguments wrote to --out; measure the rest",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("scripts/benchmark.py measures a CUDA GPU; none is available")
    if args.single:  # one row, in this process: the parent reads it from stdout
        print(ROW_PREFIX + json.dumps(measure(args.models[0], args.training_modes[0] == "compiled", args)))
        return
    device = torch.cuda.get_device_name()
    report = {"device": device, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    earlier = earlier_rows(args.out, report, args.resume)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.training_modes:
        if mode == "compiled" and not args.train:
            continue  # compiled rows measure training only: with `--no-train` they would be empty
        for name in args.models:
            if mode == "eager" or not name.startswith("lora:"):
                row = earlier.get((name, TRAINING_LABELS[mode])) or run_isolated(name, mode, args)
                rows.append(row)
                args.out.write_text(json.dumps({**report, "rows": rows}, indent=2))  # kept if a later row fails
    print(f"\n{device}, torch {torch.__version__}, batch {args.batch} x {args.seq_len}\n")
    print(table(rows))
    for name in args.profile:
        for mode in args.training_modes:
            print(f"\n{profile(name, mode == 'compiled', args)}", flush=True)
    failed = [f"{r['model']} ({r['training']})" for r in rows if "failed" in r]
    if failed:
        raise SystemExit(f"failed rows: {', '.join(failed)}")


if __name__ == "__main__":
    main()
