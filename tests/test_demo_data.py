"""The demo data: scripts/make_demo_data.py is deterministic, data/demo is its output, and every answer is right."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from apex_hf.posttrain.rewards import accuracy_reward, format_reward


REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = REPO_ROOT / "data" / "demo"
ROW_COUNTS = {
    "sft_train.jsonl": 600,
    "sft_test.jsonl": 60,
    "dpo_train.jsonl": 300,
    "dpo_test.jsonl": 40,
    "grpo_train.jsonl": 300,
    "grpo_test.jsonl": 128,
    "lora_train.jsonl": 600,
    "lora_test.jsonl": 40,
    "lora_test_questions.jsonl": 40,
}
# the words that give away the operation of a question, bare ("What is 7 minus 3?") or worded
OP_KEYWORDS = {
    "+": ("+", "plus", "more", "in total", "children"),
    "-": ("-", "minus", "gives", "sold", "flew away", "spent"),
    "*": ("*", "times", "each", "holds"),
}
WORKED_FIRST = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\. \\boxed\{(\d+)\}")
ANSWER_FIRST = re.compile(r"\\boxed\{(\d+)\} because (\d+) ([-+*]) (\d+) = (\d+)\.")


def load_script():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "scripts" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_demo_data = load_script()


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo_data.main(["--out", str(out)])
    return out


def read_rows(name: str) -> list[dict]:
    with open(SHIPPED / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def recompute(question: str) -> tuple[int, str, int, int]:
    """(a, op, b, result) read off a question: its two numbers and the one operation its wording names."""
    numbers = [int(n) for n in re.findall(r"\d+", question)]
    ops = [op for op, words in OP_KEYWORDS.items() if any(word in question for word in words)]
    assert len(numbers) == 2 and len(ops) == 1, question
    (a, b), op = numbers, ops[0]
    assert op != "-" or a >= b, question
    return a, op, b, make_demo_data.solve(a, op, b)


def is_worked_first(reply: str) -> bool:
    return WORKED_FIRST.fullmatch(reply) is not None


def check_reply(question: str, reply: str) -> str:
    """Asserts that `reply` is the worked line of `question` and its result in a box, in either order; returns the
    result."""
    a, op, b, result = recompute(question)
    if match := WORKED_FIRST.fullmatch(reply):
        x, reply_op, y, c, boxed = match.groups()
    else:
        match = ANSWER_FIRST.fullmatch(reply)
        assert match, reply
        boxed, x, reply_op, y, c = match.groups()
    assert reply_op == op and sorted((int(x), int(y))) == sorted((a, b)) and int(c) == int(boxed) == result, reply
    return str(result)


def test_generator_is_deterministic(generated, tmp_path):
    make_demo_data.main(["--out", str(tmp_path)])
    names = sorted(path.name for path in generated.iterdir())
    assert names == sorted(path.name for path in tmp_path.iterdir())
    for name in names:
        assert (generated / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_shipped_data_matches_generator(generated):
    names = sorted(path.name for path in generated.iterdir())
    assert names == sorted(["arithmetic_corpus.txt", *ROW_COUNTS])
    assert sorted(path.name for path in SHIPPED.iterdir()) == sorted([*names, "README.md"])
    for name in names:
        assert (SHIPPED / name).read_bytes() == (generated / name).read_bytes(), f"{name}: rerun the script"


@pytest.mark.parametrize("scale", ["mini"])
def test_shipped_smaller_scale_matches_generator(scale, tmp_path):
    """data/mini, the demo test's data: the generator's output at that scale, operands up to its `max_operand`."""
    make_demo_data.main(["--scale", scale, "--out", str(tmp_path)])
    shipped = REPO_ROOT / "data" / scale
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == sorted(path.name for path in shipped.iterdir()) == sorted(["arithmetic_corpus.txt", *ROW_COUNTS])
    for name in names:
        assert (shipped / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name}: rerun the script"
    largest = make_demo_data.SCALES[scale]["max_operand"]
    for name in ("sft_test.jsonl", "grpo_test.jsonl", "dpo_train.jsonl"):
        for line in (shipped / name).read_text(encoding="utf-8").splitlines():
            question = json.loads(line)
            question = (question["messages"] if "messages" in question else question["prompt"])[0]["content"]
            if question not in dict(make_demo_data.CHAT):
                assert max(recompute(question)[:3:2]) <= largest, question


def test_sizes_and_row_counts():
    for name, count in ROW_COUNTS.items():
        assert len(read_rows(name)) == count, name
    corpus = (SHIPPED / "arithmetic_corpus.txt").read_text(encoding="utf-8")
    assert 100_000 < len(corpus) < 200_000
    assert corpus.count("\n\n") > 300  # documents separated by blank lines
    assert sum(path.stat().st_size for path in SHIPPED.iterdir()) < 450_000


def questions_of(name: str) -> list[str]:
    """The math questions a file asks (its small talk left out)."""
    chat = dict(make_demo_data.CHAT)
    rows = [(row["messages"] if "messages" in row else row["prompt"])[0]["content"] for row in read_rows(name)]
    return [question for question in rows if question not in chat]


def test_is_test_question_splits_one_question_in_eight():
    questions = [f"What is {a} + {b}?" for a in range(100) for b in range(100)]
    share = sum(map(make_demo_data.is_test_question, questions)) / len(questions)
    assert 0.10 < share < 0.15
    # a checksum of the text, not Python's salted hash(): the split is the same in every process and on every machine
    assert make_demo_data.is_test_question("4 - 0 = ?") and not make_demo_data.is_test_question("What is 2 + 2?")


@pytest.mark.parametrize("stage", ["sft", "dpo", "grpo"])
def test_test_questions_are_held_out(stage):
    train, test = questions_of(f"{stage}_train.jsonl"), questions_of(f"{stage}_test.jsonl")
    assert train and test
    assert all(make_demo_data.is_test_question(q) for q in test)
    assert not any(make_demo_data.is_test_question(q) for q in train)
    asked = [(q, recompute(q)[:3]) for q in questions_of("grpo_test.jsonl")]
    assert len({fact for _, fact in asked}) >= 60  # the test covers the facts, not a handful of them
    wordings = {
        template
        for template in make_demo_data.BARE_QUESTIONS
        for question, (a, op, b) in asked
        if question == template.format(a=a, op=op, b=b, word=make_demo_data.OP_WORDS[op])
    }
    assert len(wordings) >= 4  # and the bare wordings, not one of them


def multiplicands(name: str) -> set[int]:
    """The numbers multiplied by 10 or 100 in a LoRA file, read off the worked replies."""
    replies = [row["messages"][1]["content"] for row in read_rows(name)]
    return {int(match[1]) for reply in replies if (match := re.match(r"(\d+) \* (?:10|100) =", reply))}


def test_held_out_multiplicands():
    train, test = multiplicands("lora_train.jsonl"), multiplicands("lora_test.jsonl")
    assert train and test and not train & test
    assert all(make_demo_data.is_held_out_multiplicand(a) for a in test)
    assert not any(make_demo_data.is_held_out_multiplicand(a) for a in train)
    questions = read_rows("lora_test_questions.jsonl")
    assert [row["prompt"] for row in questions] == [row["messages"][:1] for row in read_rows("lora_test.jsonl")]


def test_corpus_never_asks_a_test_question():
    corpus = (SHIPPED / "arithmetic_corpus.txt").read_text(encoding="utf-8")
    questions = re.findall(r"^Question: (.*)$", corpus, flags=re.M)  # bare questions
    questions += re.findall(r"^([^\n?]*\?) \d", corpus, flags=re.M)  # word problems and their worked answers
    assert len(questions) > 300
    for question in questions:
        assert not make_demo_data.is_test_question(question.strip()), question
    for question in questions_of("grpo_test.jsonl"):
        assert question not in corpus, question


@pytest.mark.parametrize("name", ["sft_train.jsonl", "sft_test.jsonl", "lora_train.jsonl", "lora_test.jsonl"])
def test_chat_answers_are_right(name):
    chat = dict(make_demo_data.CHAT)
    rows = read_rows(name)
    math_messages, answers = [], []
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        if user["content"] in chat:  # small talk
            assert assistant["content"] == chat[user["content"]]
            continue
        answers.append(check_reply(user["content"], assistant["content"]))
        math_messages.append([assistant])
    assert len(math_messages) >= 0.85 * len(rows)
    assert accuracy_reward(math_messages, answer=answers) == [1.0] * len(answers)
    worked_first = [is_worked_first(message["content"]) for [message] in math_messages]
    # format_reward: the reply ends with its box, which only the worked-first style does
    assert format_reward(math_messages) == [float(w) for w in worked_first]
    if name.startswith("lora"):  # the LoRA data teaches one style: the one GRPO settles on
        assert all(worked_first)
    else:  # SFT teaches both styles, worked first in about WORKED_FIRST_SHARE of the replies
        share = sum(worked_first) / len(worked_first)
        assert abs(share - make_demo_data.WORKED_FIRST_SHARE) < (0.06 if name.endswith("train.jsonl") else 0.2), share


@pytest.mark.parametrize("name", ["grpo_train.jsonl", "grpo_test.jsonl"])
def test_grpo_answers_are_right(name):
    rows = read_rows(name)
    for row in rows:
        assert row["answer"] == str(recompute(row["prompt"][0]["content"])[3])
    gold = [[{"role": "assistant", "content": f"\\boxed{{{row['answer']}}}"}] for row in rows]
    assert accuracy_reward(gold, answer=[row["answer"] for row in rows]) == [1.0] * len(rows)


@pytest.mark.parametrize("name", ["dpo_train.jsonl", "dpo_test.jsonl"])
def test_dpo_chosen_beats_rejected(name):
    rows = read_rows(name)
    answers = [check_reply(row["prompt"][0]["content"], row["chosen"][0]["content"]) for row in rows]
    chosen, rejected = [row["chosen"] for row in rows], [row["rejected"] for row in rows]
    assert accuracy_reward(chosen, answer=answers) == [1.0] * len(rows)
    assert accuracy_reward(rejected, answer=answers) == [0.0] * len(rows)
    # both replies of a pair in one style, so that DPO does not learn which style to use
    styles = [(is_worked_first(c[0]["content"]), is_worked_first(r[0]["content"])) for c, r in zip(chosen, rejected)]
    assert all(c == r for c, r in styles)
    assert 0 < sum(c for c, _ in styles) < len(rows)  # and both styles among the pairs


def test_multiplication_only_in_lora_files():
    names = ["arithmetic_corpus.txt"] + [name for name in ROW_COUNTS if not name.startswith("lora")]
    for name in names:
        text = (SHIPPED / name).read_text(encoding="utf-8")
        assert "*" not in text and " times " not in text, name
