r"""Reward functions for GRPO: open-r1's accuracy and format rewards, adapted to the demo's `\boxed{}` answers.

TRL's `GRPOTrainer` calls each reward as `f(prompts=..., completions=..., completion_ids=..., **columns)` and expects
one float (or None, to leave that completion out) per completion. `completions` holds strings for plain-text datasets
and message lists (`[{"role": "assistant", "content": ...}]`) for conversational ones; every other dataset column
(e.g. `answer`) arrives as a keyword list. TRL logs each reward under its `__name__`: `rewards/<name>/mean` and `/std`.

The final answer of a completion is the content of its last `\boxed{...}`, or, when it has no box at all, its last
number. Answers compare with `math_verify` (symbolic equivalence: `0.75` == `\frac{3}{4}`), which the `train` extra
installs. Without it the accuracy reward fails with an ImportError naming the install command, when it is resolved
for a GRPO recipe or first called: a silently weaker comparison would change what GRPO trains towards.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import logging
import re
import threading
from collections.abc import Callable


logger = logging.getLogger(__name__)

VERIFIER = "math_verify"
MATH_VERIFY_MISSING = (
    "GRPO's accuracy reward compares answers with math_verify, which is not installed: "
    'pip install "apex-hf[train]" (or pip install math-verify)'
)
BOXED = "\\boxed{"
LAST_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
FINAL_TAIL = re.compile(r"\s*\.?\s*")


def completion_text(completion: str | list[dict] | None) -> str:
    """The text of a completion: the string itself, or the content of the last message of a conversational one."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def closing_brace(text: str, start: int) -> int:
    """Index of the brace that closes the one at `text[start]`, or -1 when it is never closed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def extract_answer(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces allowed), else the last number; None when neither.

    A last box that is never closed (a truncated completion) gives None rather than an earlier box or number.
    """
    start = text.rfind(BOXED)
    if start < 0:
        numbers = LAST_NUMBER.findall(text)
        return numbers[-1] if numbers else None
    end = closing_brace(text, start + len(BOXED) - 1)
    return text[start + len(BOXED) : end] if end >= 0 else None


def normalize_answer(answer: str) -> str:
    """Strip what decorates an answer: `$`, `\\text{}`, LaTeX spaces, thousands commas, a trailing `.`, a `+`."""
    answer = re.sub(r"\\text\{([^{}]*)\}", r"\1", answer)
    answer = re.sub(r"\\[,!;: ]", "", answer)
    answer = re.sub(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"\1/\2", answer)
    answer = re.sub(r"\s+", "", answer.replace("$", ""))
    answer = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", answer)
    return answer.rstrip(".").removeprefix("+")


def require_math_verify() -> None:
    """Raise an ImportError naming the install command when math_verify is missing (rather than a bare
    ModuleNotFoundError from deep inside a GRPO step)."""
    if importlib.util.find_spec("math_verify") is None:
        raise ImportError(MATH_VERIFY_MISSING)


@functools.cache  # once per process: a GRPO run resolves its rewards twice (recipe check, trainer)
def log_verifier(version: str) -> None:
    logger.info("accuracy reward: verifier %s %s", VERIFIER, version)


def report_verifier() -> None:
    """Check that the accuracy reward's verifier is installed and log which one (and its version) it is."""
    require_math_verify()
    log_verifier(importlib.metadata.version("math-verify"))


def answers_match(prediction: str, reference: str) -> bool:
    prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    if not prediction or not reference:
        return False
    return math_verify_match(prediction, reference)


def math_verify_match(prediction: str, reference: str) -> bool:
    # imported on use: `import apex_hf.posttrain.rewards` must work without it, and it loads sympy (~0.5 s)
    from math_verify import parse, verify

    # math_verify times out through signal.alarm, which only works in the main thread (TRL runs async rewards in
    # others): there it runs without a timeout, and without its warning about that on every call.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)
    # the box anchors the parse, so that a bare "68" is read as the number 68 on both sides
    parsed_reference = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
    parsed_prediction = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout)
    if not parsed_reference or not parsed_prediction:
        return False
    return verify(parsed_reference, parsed_prediction, timeout_seconds=timeout)


def accuracy_reward(
    completions: list, answer: list | None = None, solution: list | None = None, **kwargs
) -> list[float]:
    """1.0 where the completion's final answer equals the reference, else 0.0 (also when either is missing or
    unparsable). The reference column is `answer`, or `solution` as in open-r1 / TRL math data sets."""
    references = answer if answer is not None else solution
    if references is None:
        raise ValueError(
            "accuracy_reward needs the reference answers: the data set has no `answer` or `solution` column"
        )
    require_math_verify()  # where it was called without being resolved (e.g. by evaluation.generation_accuracy)
    rewards = []
    for completion, reference in zip(completions, references):
        prediction = extract_answer(completion_text(completion))
        correct = prediction is not None and reference is not None and answers_match(prediction, str(reference))
        rewards.append(float(correct))
    return rewards


accuracy_reward.verifier = VERIFIER  # which comparison decides "correct"; logged with its version when resolved


def ends_with_one_box(text: str) -> bool:
    start = text.find(BOXED)
    if start < 0 or text.count(BOXED) > 1:
        return False
    end = closing_brace(text, start + len(BOXED) - 1)
    if end < 0 or not text[start + len(BOXED) : end].strip():
        return False
    return FINAL_TAIL.fullmatch(text[end + 1 :]) is not None


def format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 where the completion ends with its only, non-empty `\\boxed{...}` (then at most a period and whitespace)."""
    return [float(ends_with_one_box(completion_text(completion))) for completion in completions]


def make_length_reward(target_tokens: int = 16, max_tokens: int = 32) -> Callable[..., list[float]]:
    """A reward of 1.0 up to `target_tokens` completion tokens, falling linearly to 0.0 at `max_tokens` and beyond."""
    if not 0 <= target_tokens < max_tokens:
        raise ValueError(f"Need 0 <= target_tokens < max_tokens, got {target_tokens} and {max_tokens}.")

    def length_reward(completions: list, completion_ids: list[list[int]], **kwargs) -> list[float]:
        return [min(1.0, max(0.0, (max_tokens - len(ids)) / (max_tokens - target_tokens))) for ids in completion_ids]

    return length_reward


length_reward = make_length_reward()

REWARD_FUNCTIONS: dict[str, Callable[..., list[float]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "length": length_reward,
}


def resolve_reward(spec: str) -> Callable:
    """A reward from its registry name (`REWARD_FUNCTIONS`) or its dotted path (`package.module.function` or
    `package.module:function`). The accuracy reward is checked here, so that a GRPO recipe without math_verify fails
    when it is read, not at its first step."""
    function = lookup_reward(spec)
    if function is accuracy_reward:
        report_verifier()
    return function


def lookup_reward(spec: str) -> Callable:
    if spec in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[spec]
    if ":" in spec:
        module_name, _, name = spec.partition(":")
    elif "." in spec:
        module_name, _, name = spec.rpartition(".")
    else:
        raise ValueError(
            f"Unknown reward {spec!r}: use one of {sorted(REWARD_FUNCTIONS)} "
            "or a dotted path ('package.module.function' or 'package.module:function')."
        )
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, TypeError, ValueError) as err:  # TypeError/ValueError: ".x", "" module names
        raise ValueError(f"Cannot load reward {spec!r}: {err}") from err
    if not callable(function):
        raise ValueError(f"Reward {spec!r} is not callable (got {type(function).__name__}).")
    return function
