r"""What lm-eval calls for the held-out answer tasks (`lm_eval_tasks/*.yaml`, through their `!function` hooks).

A row is `{"prompt": [{"role": "user", "content": "Compute 5 + 13."}], "answer": "18"}`, the format of the demo's
data/demo/grpo_test.jsonl. lm-eval puts `doc_to_text` in a user turn and applies the model's chat template, as
`apex_hf.evaluation.generation_accuracy` does.

* `apex_demo_answers` (generation): a completion scores 1 when its final answer (the last `\boxed{...}`, else its
  last number) equals the `answer` field under GRPO's accuracy reward (`accuracy_reward`). The same function
  scores `generation_accuracy`, so the two accuracies agree on the same completions.
* `apex_demo_answers_loglik` (log-likelihood): multiple choice between `\boxed{answer}` and `\boxed{}` of the four
  integers nearest to it. Multiple choice rather than the log-likelihood of a reference reply: the rows hold an
  answer, not a reply, and the choice accuracy is a fraction in [0, 1] that compares models, where a summed
  log-likelihood does not. The distractors are a function of the answer alone, so every run asks the same question.
"""

from __future__ import annotations


DISTRACTOR_OFFSETS = (-2, -1, 1, 2)


def doc_to_text(doc: dict) -> str:
    """The question: the content of the row's one user message (lm-eval wraps it in the chat template itself)."""
    prompt = doc.get("prompt")
    if not (isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user"):
        raise ValueError(f"an answer-task row needs `prompt` = one user message, got prompt={prompt!r}")
    return prompt[0]["content"]


def doc_to_target(doc: dict) -> str:
    """The reference answer, as text (JSON may hold it as a number)."""
    return str(doc["answer"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """`exact_match` of one greedy completion: GRPO's accuracy reward of it against the row's answer."""
    from .posttrain.rewards import accuracy_reward

    return {"exact_match": accuracy_reward(completions=results[:1], answer=[doc_to_target(doc)])[0]}


def boxed(answer: str | int) -> str:
    return f"\\boxed{{{answer}}}"


def answer_choices(doc: dict) -> list[str]:
    """The answer and its distractors, each boxed, in increasing order (the answer is `answer_index`)."""
    answer = doc_to_target(doc).strip()
    try:
        value = int(answer)
    except ValueError:
        raise ValueError(
            f"apex_demo_answers_loglik needs integer answers (its distractors are the nearest integers), got"
            f" answer={answer!r}"
        ) from None
    return [boxed(value + offset) for offset in sorted((0, *DISTRACTOR_OFFSETS))]


def answer_index(doc: dict) -> int:
    """Where the right answer sits among `answer_choices`: after the distractors below it."""
    return sum(offset < 0 for offset in DISTRACTOR_OFFSETS)
