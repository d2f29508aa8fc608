"""Reward functions: accuracy (math_verify, required: a clear error without it), format, length, resolve_reward."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from apex_hf.posttrain import rewards
from apex_hf.posttrain.rewards import (
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


@pytest.fixture
def without_math_verify(monkeypatch):
    """As if math_verify were not installed: importing it fails and find_spec does not find it."""
    monkeypatch.setitem(sys.modules, "math_verify", None)


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
def test_accuracy_reward(completion, reference, expected):
    assert accuracy_reward([completion], answer=[reference]) == [expected]
    assert accuracy_reward([message(completion)], answer=[reference]) == [expected]


def test_accuracy_reward_batch_and_odd_inputs():
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
    assert resolve_reward("apex_hf.posttrain.rewards.format_reward") is format_reward
    assert resolve_reward("apex_hf.posttrain.rewards:accuracy_reward") is accuracy_reward
    assert resolve_reward("os.path.join") is os.path.join


@pytest.mark.parametrize(
    "spec, message_part",
    [
        ("accurracy", "dotted path"),
        ("", "dotted path"),
        ("apex_hf.no_such_module.reward", "apex_hf.no_such_module.reward"),
        ("apex_hf.posttrain.rewards.no_such_reward", "apex_hf.posttrain.rewards.no_such_reward"),
        ("apex_hf.posttrain.rewards:", "apex_hf.posttrain.rewards:"),
        (".rewards", ".rewards"),
        ("apex_hf.posttrain.rewards.BOXED", "not callable"),
    ],
)
def test_resolve_reward_errors(spec, message_part):
    with pytest.raises(ValueError, match="accuracy" if message_part == "dotted path" else None) as err:
        resolve_reward(spec)
    assert message_part in str(err.value)


def test_accuracy_reward_off_the_main_thread():
    # math_verify cannot time out through signal.alarm there; the reward must still score
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(accuracy_reward, ["\\boxed{68}", "\\boxed{67}"], answer=["68", "68"]).result()
    assert result == [1.0, 0.0]


def test_accuracy_reward_reads_a_solution_column_and_names_a_missing_one():
    assert accuracy_reward(completions=["so \\boxed{3/4}"], solution=["\\frac{3}{4}"]) == [1.0]
    with pytest.raises(ValueError, match="`answer` or `solution` column"):
        accuracy_reward(completions=["\\boxed{1}"])


def test_the_accuracy_reward_reports_its_verifier(caplog):
    rewards.log_verifier.cache_clear()
    with caplog.at_level(logging.INFO, logger="apex_hf.posttrain.rewards"):
        assert resolve_reward("accuracy").verifier == "math_verify"
        resolve_reward("apex_hf.posttrain.rewards.accuracy_reward")
    version = importlib.metadata.version("math-verify")
    assert [record.getMessage() for record in caplog.records] == [f"accuracy reward: verifier math_verify {version}"]


@pytest.mark.parametrize("spec", ["accuracy", "apex_hf.posttrain.rewards:accuracy_reward"])
def test_without_math_verify_resolving_the_accuracy_reward_fails_clearly(without_math_verify, spec):
    with pytest.raises(ImportError, match=r'pip install "apex-hf\[train\]" \(or pip install math-verify\)'):
        resolve_reward(spec)
    assert resolve_reward("format") is format_reward  # the other rewards do not need it


def test_without_math_verify_the_accuracy_reward_fails_clearly_when_called(without_math_verify):
    with pytest.raises(ImportError, match="accuracy reward compares answers with math_verify, which is not installed"):
        accuracy_reward(["\\boxed{68}"], answer=["68"])


def test_the_module_imports_without_math_verify():
    # the error belongs to the point of use: a process that never resolves the accuracy reward does not need it
    code = "import sys; sys.modules['math_verify'] = None; import apex_hf.posttrain.rewards"
    subprocess.run([sys.executable, "-c", code], check=True)
