"""Held-out accuracy by generation: greedy answers to chat prompts, scored with a reward function.

Trainers evaluate losses (and GRPO a sampled reward); whether the model now *answers* correctly needs generation.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def as_prompt(row: dict) -> list[dict]:
    """The conversation to answer: a `prompt` column (GRPO/DPO rows), or the `messages` before the last reply."""
    if "prompt" in row:
        return row["prompt"]
    return row["messages"][:-1]


def reference_answer(row: dict) -> str:
    """The reference: an `answer` column, or the last `\\boxed{}` of the reference reply."""
    from .posttrain.rewards import completion_text, extract_answer

    if "answer" in row:
        return str(row["answer"])
    return extract_answer(completion_text(row["messages"])) or ""


@torch.no_grad()
def generation_accuracy(
    model,
    tokenizer,
    rows: list[dict],
    reward: Callable | None = None,
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> tuple[float, list[str]]:
    """Mean `reward` (default: `accuracy_reward`) of greedy completions of the rows' prompts, and the completions."""
    from .posttrain.rewards import accuracy_reward

    reward = reward or accuracy_reward
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    completions = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [
                tokenizer.apply_chat_template(as_prompt(row), add_generation_prompt=True, tokenize=False)
                for row in rows[start : start + batch_size]
            ]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = output[:, inputs["input_ids"].shape[1] :]
            completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        model.train(was_training)
        tokenizer.padding_side = padding_side
    scores = reward(completions=completions, answer=[reference_answer(row) for row in rows])
    return sum(scores) / max(len(scores), 1), completions
