"""Batch-1 greedy decoding of a trained looped model: `generate`, the graphed loop and self-speculation, in one run.

Acceptance rates mean nothing on random weights, so this loads a trained model: `scripts/measure_loop.py --models DIR`
saves one per variant and seed (the K = 3 recipe model of seed 1 is `DIR/k3_recipe-seed1`). The prompts are held-out
windows of the text it was trained on (measure_loop's split by file). bf16 weights, fixed K (early exits off), every
way decoding the same prompts for the same number of new tokens:

* `generate`, dynamic cache (eager), and static cache (transformers compiles the forward);
* `generate` with transformers' assisted generation, drafting with the same model at K = 1
  (`assistant_model=model.fewer_passes_draft(1)`);
* `GreedyDecoder`: the step compiled and captured as one CUDA graph;
* `SelfSpeculativeDecoder` for each `--drafts` setting PASSESxTOKENS: drafts of that many tokens with that many passes,
  verified at the full K;
* `MultiTokenSpeculativeDecoder`, for a model with multi-token prediction layers (`measure_loop --variants
  k3_recipe_mtp`): a draft a round from the first MTP depth, and from each further depth.

On a GPU the weights are bf16 and the decoders compiled and captured as CUDA graphs. `--device cpu` measures the
same ways in fp32, eager and without graphs (and without the static-cache `generate`, which transformers compiles for
GPUs): its acceptance rates are the model's, its speeds only the CPU's.

Tokens/s is over all prompts, after one warm-up prompt per way (compiling and capturing). "same tokens" is the share
of prompts whose new tokens equal `generate`'s (dynamic cache) exactly, and "agree" the mean share of new tokens
before the first difference. Prints a markdown table and writes JSON.

    python scripts/measure_loop.py --variants k3_recipe --seeds 1 --steps 1200 --no-decode --models runs/loop_models
    python scripts/measure_decoding.py --model runs/loop_models/k3_recipe-seed1 --out runs/decoding.json
    python scripts/measure_loop.py --scale cpu --variants k3_recipe_mtp --seeds 1 --steps 600 --no-decode --models m
    python scripts/measure_decoding.py --model m/k3_recipe_mtp-seed1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from apex_hf import ApexForCausalLM
from apex_hf.decoding import (
    GreedyDecoder,
    MultiTokenSpeculativeDecoder,
    SelfSpeculativeDecoder,
    SpeculationStats,
    SpeculativeDecoder,
)
from apex_hf.modeling.modeling_apex import crop_skips_empty_layers


sys.path.insert(0, str(Path(__file__).parent))
from measure_loop import byte_streams  # noqa: E402  (the same held-out files as the model's own evaluation)


def held_out_prompts(packages: list[str], count: int, length: int) -> torch.Tensor:
    held_out = byte_streams(packages, max_megabytes=200.0)[1]
    starts = torch.linspace(0, len(held_out) - length - 1, count + 1).long()  # the first is the warm-up prompt
    return torch.stack([held_out[s : s + length] for s in starts.tolist()])


def measure_way(decode: Callable[[torch.Tensor], torch.Tensor], prompts: torch.Tensor, new_tokens: int) -> dict:
    decode(prompts[:1])  # warm-up: compiles, captures
    synchronize(prompts.device)
    outputs, started = [], time.perf_counter()
    for prompt in prompts[1:]:
        outputs.append(decode(prompt[None])[0, prompt.shape[0] :])
    synchronize(prompts.device)
    seconds = time.perf_counter() - started
    return {"tokens_per_s": new_tokens * len(outputs) / seconds, "outputs": outputs}


def agreement(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    same, prefix = 0, 0.0
    for out, ref in zip(outputs, reference):
        differ = (out != ref).nonzero()
        same += len(differ) == 0
        prefix += (int(differ[0]) if len(differ) else len(ref)) / len(ref)
    return same / len(reference), prefix / len(reference)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speculative_way(decoder: SpeculativeDecoder, new_tokens: int, seen: list) -> Callable:
    """The decoder as a way to measure, keeping each call's counts in `seen`."""

    def decode(prompt: torch.Tensor) -> torch.Tensor:
        output = decoder.generate(prompt, max_new_tokens=new_tokens, ignore_eos=True)
        seen.append(decoder.stats)
        return output

    return decode


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a saved looped Apex model (measure_loop --models)")
    parser.add_argument("--packages", nargs="+", default=["transformers", "torch", "accelerate"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--drafts", nargs="+", default=["1x2", "1x4", "2x4"], help="PASSESxTOKENS per round")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (refuses an existing file)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is available here; measure on one, or pass --device cpu")
    if args.out is not None and args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another --out")
    drafts = [tuple(int(n) for n in setting.split("x")) for setting in args.drafts]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = ApexForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    model.config.refinement_exit_threshold = None  # fixed K: the graphed loops cannot exit per token
    prompts = held_out_prompts(args.packages, args.prompts, args.prompt_length).to(args.device)
    max_length, new = args.prompt_length + args.new_tokens, args.new_tokens
    settings = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    ways = {"generate, dynamic cache": lambda p: model.generate(p, **settings)}
    if args.device == "cuda":
        static = dict(settings, cache_implementation="static")
        ways["generate, static cache (compiled)"] = lambda p: model.generate(p, **static)
    if crop_skips_empty_layers():  # transformers' assisted generation, drafting at K = 1
        draft = model.fewer_passes_draft(1)
        ways["generate, assisted by K = 1"] = lambda p: model.generate(p, assistant_model=draft, **settings)
    else:
        print("generate, assisted by K = 1: not timed, this transformers cannot run it (5.22 on can)", flush=True)
    graphed = GreedyDecoder(model, max_length=max_length)
    ways["graphed greedy"] = lambda p: graphed.generate(p, max_new_tokens=new, ignore_eos=True)
    decoders = {
        f"self-speculative, {tokens} drafts at K = {passes}": partial(
            SelfSpeculativeDecoder, draft_passes=passes, draft_tokens=tokens
        )
        for passes, tokens in drafts
    }
    for depths in range(1, model.config.num_mtp_layers + 1):
        name = f"multi-token speculative, {depths} MTP draft{'s' * (depths > 1)}"
        decoders[name] = partial(MultiTokenSpeculativeDecoder, draft_tokens=depths)
    speculative = {}  # name: the counts of each call
    for name, make_decoder in decoders.items():
        speculative[name] = []
        ways[name] = speculative_way(make_decoder(model, max_length=max_length), new, speculative[name])
    rows, reference = [], None
    for name, decode in ways.items():
        result = measure_way(decode, prompts, new)
        reference = reference or result["outputs"]
        same, agree = agreement(result["outputs"], reference)
        row = {"way": name, "tokens_per_s": round(result["tokens_per_s"], 1), "same_tokens": same, "agree": agree}
        if name in speculative:
            timed_calls = speculative[name][1:]  # after the warm-up prompt
            fields = ("rounds", "drafted", "accepted")
            total = SpeculationStats(*(sum(getattr(call, f) for call in timed_calls) for f in fields))
            row.update(acceptance=round(total.acceptance, 3), tokens_per_round=round(total.tokens_per_round, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    speeds = {row["way"]: row["tokens_per_s"] for row in rows}
    plain, graphed_speed = speeds["generate, dynamic cache"], speeds["graphed greedy"]
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{device}, {args.model}, K = {model.config.num_refinement_steps}, batch 1\n")
    print("| way | tokens/s | vs generate (dynamic) | vs graphed greedy | same tokens | agree | acceptance |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['way']} | {row['tokens_per_s']:,} | {row['tokens_per_s'] / plain:.2f} x "
            f"| {row['tokens_per_s'] / graphed_speed:.2f} x | {100 * row['same_tokens']:.0f} % "
            f"| {100 * row['agree']:.0f} % | {row.get('acceptance', '-')} |"
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"device": device, "args": vars(args), "rows": rows}
        args.out.write_text(json.dumps(report, default=str, indent=2))


if __name__ == "__main__":
    main()
