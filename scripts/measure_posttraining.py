"""Post-training measurements on one CUDA GPU; prints a markdown table and writes JSON.

1. LoRA SFT of a GPU-scale preset (default `apex-7b-lora`, random weights: only speed and memory are measured) at
   4,096 tokens per row, through the same `recipes/apex-7b-lora/lora.yaml` a user runs, on the shipped corpora.
2. GRPO on the demo chain (pre-train → SFT → DPO → GRPO of `apex-small`, on the GPU): held-out mean reward before
   and after a few dozen GRPO steps.

    python scripts/measure_posttraining.py --out runs/posttraining
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import apex_hf  # noqa: F401  (registers apex)
from apex_hf.pipeline import plan_pipeline, run_pipeline
from apex_hf.posttrain.config import load_recipe
from apex_hf.posttrain.stages import run_stage
from apex_hf.presets import get_preset
from apex_hf.stage_folder import read_log_history
from apex_hf.tokenizer import train_bpe_tokenizer


CORPORA = ["data/tiny_corpus.txt", "data/demo/arithmetic_corpus.txt"]


def measure_lora(out: Path, preset: str, seq_len: int, steps: int) -> dict:
    base = out / f"{preset}-random"
    texts = [p for path in CORPORA for p in Path(path).read_text().split("\n\n") if p.strip()]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=8192, model_max_length=seq_len)
    config = get_preset(preset, max_position_embeddings=seq_len, vocab_size=32000)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    data = "[" + ", ".join(f"{{path: text, data_files: {path}}}" for path in CORPORA) + "]"
    recipe = load_recipe(
        "recipes/apex-7b-lora/lora.yaml",
        "sft",
        [
            "--model.name_or_path",
            str(base),
            "--output_dir",
            str(out / "lora"),
            "--data.datasets",
            data,
            "--assistant_only_loss",
            "false",
            "--max_length",
            str(seq_len),
            "--max_steps",
            str(steps),
            "--gradient_accumulation_steps",
            "1",
            "--logging_steps",
            "5",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--warmup_steps",
            "0.0",
        ],
    )
    start = time.perf_counter()
    run_stage(recipe)
    lines = [e for e in read_log_history(out / "lora") if "train_tokens_per_second" in e]
    steady = lines[1:] or lines  # the first window holds compilation and warm-up
    return {
        "preset": preset,
        "seq_len": seq_len,
        "steps": steps,
        "tokens_per_second": sum(e["train_tokens_per_second"] for e in steady) / len(steady),
        "peak_memory_gib": max(e["peak_memory_gib"] for e in lines),
        "loss_first_last": (lines[0]["loss"], lines[-1]["loss"]),
        "wall_seconds": time.perf_counter() - start,
    }


def measure_grpo(out: Path, grpo_steps: int) -> dict:
    on_gpu = {"use_cpu": False}
    plan = plan_pipeline("recipes/apex-small/pipeline.yaml", ["--output_dir", str(out / "chain")])
    for planned in plan[1:4]:  # sft, dpo, grpo (the pre-training stage picks the GPU by itself)
        for key, value in on_gpu.items():
            setattr(planned.recipe.args, key, value)
    plan[3].recipe.args.max_steps = grpo_steps
    run_pipeline(plan[:4])
    rewards = [e["eval_reward"] for e in read_log_history(plan[3].output_dir) if "eval_reward" in e]
    return {"grpo_steps": grpo_steps, "held_out_reward_before": rewards[0], "held_out_reward_after": rewards[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/posttraining")
    parser.add_argument("--preset", default="apex-7b-lora")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--lora-steps", type=int, default=30)
    parser.add_argument("--grpo-steps", type=int, default=40)
    parser.add_argument("--skip", choices=["lora", "grpo"], action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if "lora" not in args.skip:
        result["lora"] = measure_lora(out, args.preset, args.seq_len, args.lora_steps)
    if "grpo" not in args.skip:
        result["grpo"] = measure_grpo(out, args.grpo_steps)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
