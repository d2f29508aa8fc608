"""Reward functions: accuracy (both the math_verify and the normalised-match path), format, length, resolve_reward."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from apex_hf import rewards
from apex_hf.rewards import (
    REWARD_FUNCTIONS,
    accuracy_reward,
    completion_text,
    extract_answer,
    format_reward,
    length_reward,
    make_length_reward,
    resolve_reward,
)


def message(content):
    return [{"role": "assistant", "content": content}]


@pytest.fixture(params=["normalised match", "math_verify"])
def matcher(request, monkeypatch):
    """Runs a test once per comparison path; the math_verify one only where it is installed."""
    if request.param == "math_verify":
        pytest.importorskip("math_verify")
    else:
        monkeypatch.setattr(rewards, "HAS_MATH_VERIFY", False)
    return request.param


ACCURACY_CASES = [
    # (completion, reference, expected)
    ("23 + 45 = 68. \\boxed{68}", "68", 1.0),
    ("23 + 45 = 69. \\boxed{69}", "68", 0.0),
    ("\\boxed{ 68 }", "68", 1.0),
    ("\\boxed{$68$}.", "68", 1.0),
    ("\\boxed{68.}", "68", 1.0),
    ("\\boxed{+5}", "5", 1.0),
    ("\\boxed{\\text{5}}", "5", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1\\,000}", "1000", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{-7}", "7", 0.0),
    ("\\boxed{0.75}", "3/4", 1.0),
    ("\\boxed{\\frac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{2.50}", "2.5", 1.0),
    ("\\boxed{\\frac{1}{3}}", "3/4", 0.0),
    ("first \\boxed{3}, then \\boxed{68}", "68", 1.0),  # the last box counts
    ("first \\boxed{68}, then \\boxed{3}", "68", 0.0),
    ("\\boxed{\\frac{6}{8}}", "3/4", 1.0),  # nested braces
    ("12 + 7 = 19.", "19", 1.0),  # no box: the last number
    ("The answer is 19, not 18", "19", 0.0),
    ("I think 1,000 apples", "1000", 1.0),
    ("\\boxed{68} and 7", "68", 1.0),  # a box wins over a later number
    ("\\boxed{68", "68", 0.0),  # truncated box
    ("\\boxed{}", "68", 0.0),
    ("", "68", 0.0),
    ("no number here", "68", 0.0),
    ("\\boxed{68}", None, 0.0),
    ("\\boxed{68}", "", 0.0),
    ("\\boxed{1/0}", "68", 0.0),
    ("\\boxed{x}", "68", 0.0),
]


@pytest.mark.parametrize("completion, reference, expected", ACCURACY_CASES)
def test_accuracy_reward(matcher, completion, reference, expected):
    assert accuracy_reward([completion], answer=[reference]) == [expected]
    assert accuracy_reward([message(completion)], answer=[reference]) == [expected]


def test_accuracy_reward_batch_and_odd_inputs(matcher):
    completions = [message("\\boxed{68}"), "\\boxed{68}", None, [], [{"role": "assistant", "content": None}]]
    assert accuracy_reward(completions, answer=["68", 68, "68", "68", "68"], prompts=["q"] * 5) == [1, 1, 0, 0, 0]


def test_completion_text():
    assert completion_text("abc") == "abc"
    assert completion_text(message("abc")) == "abc"
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]) == "b"
    assert completion_text(None) == ""
    assert completion_text([]) == ""


def test_extract_answer():
    assert extract_answer("so \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{1} \\boxed{{2}}") == "{2}"
    assert extract_answer("x = -5") == "-5"
    assert extract_answer("23-45") == "45"
    assert extract_answer("nothing") is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("23 + 45 = 68. \\boxed{68}", 1.0),
        ("\\boxed{68}", 1.0),
        ("\\boxed{68}.", 1.0),
        ("\\boxed{68} \n", 1.0),
        ("\\boxed{\\frac{3}{4}}", 1.0),
        ("23 + 45 = 68.", 0.0),
        ("\\boxed{68} is the answer", 0.0),
        ("\\boxed{6} \\boxed{68}", 0.0),
        ("\\boxed{\\boxed{68}}", 0.0),
        ("\\boxed{68", 0.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{68}..", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([message(completion)]) == [expected]


def test_length_reward():
    assert length_reward.__name__ == "length_reward"
    ids = [[0] * n for n in (0, 16, 20, 24, 32, 100)]
    assert length_reward([""] * len(ids), completion_ids=ids) == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0]
    short = make_length_reward(target_tokens=2, max_tokens=4)
    assert short.__name__ == "length_reward"
    assert short(["", "", ""], completion_ids=[[1, 2], [1, 2, 3], [1, 2, 3, 4]]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        make_length_reward(target_tokens=8, max_tokens=8)


def test_resolve_reward():
    for name, function in REWARD_FUNCTIONS.items():
        assert resolve_reward(name) is function
    assert set(REWARD_FUNCTIONS) == {"accuracy", "format", "length"}
    assert resolve_reward("apex_hf.rewards.format_reward") is format_reward
    assert resolve_reward("apex_hf.rewards:accuracy_reward") is accuracy_reward
    assert resolve_reward("os.path.join") is os.path.join


@pytest.mark.parametrize(
    "spec, message_part",
    [
        ("accurracy", "dotted path"),
        ("", "dotted path"),
        ("apex_hf.no_such_module.reward", "apex_hf.no_such_module.reward"),
        ("apex_hf.rewards.no_such_reward", "apex_hf.rewards.no_such_reward"),
        ("apex_hf.rewards:", "apex_hf.rewards:"),
        (".rewards", ".rewards"),
        ("apex_hf.rewards.BOXED", "not callable"),
    ],
)
def test_resolve_reward_errors(spec, message_part):
    with pytest.raises(ValueError, match="accuracy" if message_part == "dotted path" else None) as err:
        resolve_reward(spec)
    assert message_part in str(err.value)


def test_accuracy_reward_off_the_main_thread(matcher):
    # math_verify cannot time out through signal.alarm there; the reward must still score
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(accuracy_reward, ["\\boxed{68}", "\\boxed{67}"], answer=["68", "68"]).result()
    assert result == [1.0, 0.0]


def test_accuracy_reward_reads_a_solution_column_and_names_a_missing_one():
    assert accuracy_reward(completions=["so \\boxed{3/4}"], solution=["\\frac{3}{4}"]) == [1.0]
    with pytest.raises(ValueError, match="`answer` or `solution` column"):
        accuracy_reward(completions=["\\boxed{1}"])
