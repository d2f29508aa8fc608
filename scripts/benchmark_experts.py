"""One MoE layer of the benchmark preset (64 experts of width 768, top-8, hidden 2048, bf16) through each experts
path, on one GPU: where `apex_grouped_mm` takes its thresholds from.

* Decode-sized calls (1 to 128 tokens), each replayed as a CUDA graph, eager and compiled (compiled static-cache
  decoding runs them compiled): transformers' batched_mm and grouped_mm forwards, and Apex's every-expert and grouped
  paths, and its gathered path, which only compiled code takes.
* A training-sized call (8 x 2048 tokens), forward + backward, eager and compiled: transformers' grouped_mm forward
  against Apex's grouped path.

    python scripts/benchmark_experts.py
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from benchmark import timed  # scripts/benchmark.py: the same warm-up, synchronize and average
from transformers.integrations.moe import batched_mm_experts_forward, grouped_mm_experts_forward

from apex_hf.modeling.modeling_apex import (
    ApexExperts,
    _every_expert_forward,
    _gathered_experts_forward,
    _grouped_experts_forward,
)
from apex_hf.presets import get_preset


PATHS = {
    "transformers batched_mm": batched_mm_experts_forward,
    "transformers grouped_mm": grouped_mm_experts_forward,
    "apex every expert": _every_expert_forward,
    "apex grouped": _grouped_experts_forward,
}
COMPILED_ONLY_PATHS = {"apex gathered": _gathered_experts_forward}
DECODE_TOKENS = (1, 4, 8, 32, 128)
TRAIN_TOKENS = 8 * 2048


def cuda_graph_ms(call: Callable[[], object], replays: int = 100) -> float:
    """Milliseconds per replay of `call` captured as a CUDA graph (after warm-up on a side stream)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return timed(graph.replay, warmup=3, steps=replays) * 1e3


def layer_and_routing(num_tokens: int, requires_grad: bool = False) -> tuple[ApexExperts, list[torch.Tensor]]:
    """One layer's experts in bf16 (random weights), random hidden states and a random top-k routing."""
    config = get_preset("bench-moe")
    experts = ApexExperts(config)
    for weight in experts.parameters():
        torch.nn.init.normal_(weight, std=config.initializer_range)
    experts = experts.to("cuda", torch.bfloat16).requires_grad_(requires_grad)
    hidden_states = torch.randn(num_tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    scores = torch.randn(num_tokens, config.num_experts, device="cuda").softmax(-1)
    top_k_weights, top_k_index = scores.topk(config.num_experts_per_tok, dim=-1)
    top_k_weights = (top_k_weights / top_k_weights.sum(-1, keepdim=True)).bfloat16()
    inputs = [hidden_states.requires_grad_(requires_grad), top_k_index, top_k_weights.requires_grad_(requires_grad)]
    return experts, inputs


def backward_step(path: Callable, experts: ApexExperts, inputs: list[torch.Tensor]) -> Callable[[], None]:
    return lambda: path(experts, *inputs).float().square().mean().backward()


@torch.no_grad()
def decode_table(compiled: bool) -> str:
    lines = [
        "| path | " + " | ".join(f"{t} tokens" for t in DECODE_TOKENS) + " |",
        "|---" * (1 + len(DECODE_TOKENS)) + "|",
    ]
    paths = {**PATHS, **COMPILED_ONLY_PATHS} if compiled else PATHS
    paths = {name: torch.compile(path, dynamic=False) if compiled else path for name, path in paths.items()}
    cells = {name: [] for name in paths}
    for num_tokens in DECODE_TOKENS:
        experts, inputs = layer_and_routing(num_tokens)
        for name, path in paths.items():
            cells[name].append(f"{cuda_graph_ms(functools.partial(path, experts, *inputs)):.3f} ms")
    lines += [f"| {name} | " + " | ".join(row) + " |" for name, row in cells.items()]
    return "\n".join(lines)


def training_table() -> str:
    experts, inputs = layer_and_routing(TRAIN_TOKENS, requires_grad=True)
    lines = ["| path | eager | compiled |", "|---|---|---|"]
    for name in ("transformers grouped_mm", "apex grouped"):
        cells = []
        for path in (PATHS[name], torch.compile(PATHS[name])):
            cells.append(f"{timed(backward_step(path, experts, inputs), warmup=3, steps=20) * 1e3:.2f} ms")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("scripts/benchmark_experts.py measures a CUDA GPU; none is available")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for compiled in (False, True):
        mode = "compiled" if compiled else "eager"
        print(f"Decode-sized calls, one layer, {mode}, per CUDA-graph replay:\n\n{decode_table(compiled)}\n")
    print(f"{TRAIN_TOKENS} tokens, one layer, forward + backward:\n\n{training_table()}")


if __name__ == "__main__":
    main()
