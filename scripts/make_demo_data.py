#!/usr/bin/env python3
r"""Build the CPU demo's data sets under data/demo/ (deterministic: the same --seed gives the same bytes).

Every math answer in the corpus is a short worked line and the result in a box: "What is 3 + 4?" -> "3 + 4 = 7.
\boxed{7}". The chat replies of SFT and DPO come in two styles: worked first like that (two in five), or answer first,
"\boxed{7} because 3 + 4 = 7." (three in five). A small model that boxes the result before working it out is right
less often, and greedy decoding follows the majority style, so the SFT model answers first and solves few questions.
GRPO, whose reward is the answer's accuracy alone, then has something to find that every question shares: its samples
that work first are right more often, and the policy turns to working first. (With every reply worked first, GRPO's
only lesson was individual facts, which did not carry over to held-out questions: +2 points on average over seeds.)

- arithmetic_corpus.txt: pre-training prose (practice lists of equations, worked word problems, questions with their
  answers, fact families); documents separated by a blank line. The pre-training stage reads it alone.
- sft_{train,test}.jsonl: chat messages; 60% bare sums and differences, 30% word problems, 10% fixed small talk.
- dpo_{train,test}.jsonl: conversational preference pairs, both replies of a pair in the same style; rejected misreads
  an operand, boxes another number than it worked out, or is off by a little.
- grpo_{train,test}.jsonl: a prompt and the integer answer as a string, for the accuracy reward; grpo_test.jsonl is
  also the held-out arithmetic of the demo's answer accuracy (`apex-hf eval`'s `apex_demo_answers` task).
- lora_{train,test}.jsonl: a number from 2 to 99 times 10 or 100, a skill no earlier file shows (the train file also
  replays sums and differences);
  lora_test_questions.jsonl holds the test rows as questions with their answers, for the answer accuracy.

Addition and subtraction use one-digit operands (differences are never negative); word problems use operands from 2
so that every noun is plural. Knowledge comes from pre-training, as in any language model: the corpus states every
fact. The test questions are held out one by one, as in GSM8K: a stable hash of a question's text puts one question in
eight in the test files (`is_test_question`), and no train file nor corpus document asks one of them; every fact and
every wording is in both splits, so a test measures how well a model answers the task it was taught, not how it guesses
at an unseen phrasing (the held-out-wording test this replaced left the SFT model at 5-9 % with 70 % of GRPO's groups
without signal). A LoRA test number is held out of its train file (`is_held_out_multiplicand`): that skill must
generalise to new numbers.

Usage: python scripts/make_demo_data.py [--scale demo|mini] [--out data/<scale>] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import zlib
from collections.abc import Callable
from pathlib import Path


# Two sizes of the same task. "demo" (data/demo) is the CPU demo's. "mini" (data/mini), for the demo test
# (recipes/apex-mini): operands to 6 (77 facts instead of 190), a third of the corpus, half the rows.
# rows: train and test rows of each stage (the LoRA train file replays as many sums and differences again).
SCALES = {
    "demo": dict(
        max_operand=9,
        corpus_bytes=120_000,
        rows={"sft": (600, 60), "dpo": (300, 40), "grpo": (300, 128), "lora": (300, 40)},
    ),
    "mini": dict(
        max_operand=6,
        corpus_bytes=40_000,
        rows={"sft": (300, 40), "dpo": (150, 40), "grpo": (150, 60), "lora": (300, 40)},
    ),
}
# SFT and DPO replies that work the sum out before they box it; the rest box the answer first. See `draw_style`.
WORKED_FIRST_SHARE = 0.4

NAMES = ("Mia", "Sam", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Priya", "Kenji", "Lucia")
OBJECTS = ("pens", "apples", "marbles", "stickers", "books", "cookies", "cards", "shells")

OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
BARE_QUESTIONS = (
    "What is {a} {op} {b}?",
    "Compute {a} {op} {b}.",
    "{a} {op} {b} = ?",
    "Calculate {a} {op} {b}.",
    "What is {a} {word} {b}?",
)
WORD_QUESTIONS = {
    "+": (
        "{name} has {a} {obj} and buys {b} more. How many {obj} does {name} have now?",
        "There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?",
        "{name} read {a} pages on Monday and {b} pages on Tuesday. How many pages did {name} read in total?",
        "A class has {a} girls and {b} boys. How many children are in the class?",
    ),
    "-": (
        "{name} has {a} {obj} and gives {b} to a friend. How many {obj} does {name} have left?",
        "A shop had {a} {obj}. It sold {b} of them. How many {obj} are left?",
        "There were {a} birds on a tree. Then {b} flew away. How many birds are on the tree now?",
        "{name} had {a} dollars and spent {b} dollars. How many dollars does {name} have left?",
    ),
    "*": (
        "{name} has {a} bags with {b} {obj} in each bag. How many {obj} does {name} have?",
        "There are {a} rows with {b} chairs in each row. How many chairs are there?",
        "{name} buys {a} packs of {obj} with {b} in each pack. How many {obj} does {name} buy?",
        "A box holds {b} {obj}. How many {obj} are in {a} boxes?",
    ),
}

# Small talk keeps the chat model able to answer a plain question without a box.
CHAT = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("How are you?", "I am doing well, thank you. How can I help?"),
    ("Thank you!", "You are welcome!"),
    ("Thanks for the help.", "Happy to help!"),
    ("Goodbye!", "Goodbye! Have a nice day."),
    ("What can you do?", "I can answer short questions and solve simple sums."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("What language is mainly spoken in Brazil?", "Portuguese is the main language of Brazil."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the first letter of the English alphabet?", "The first letter of the English alphabet is A."),
    ("Which season comes after winter?", "Spring comes after winter."),
)


class TaskRandom(random.Random):
    """A random stream that also knows the task's largest one-digit operand: every draw of a sum or difference reads it
    from the stream it draws with."""

    def __init__(self, seed: str, max_operand: int):
        super().__init__(seed)
        self.max_operand = max_operand


def is_held_out_multiplicand(a: int) -> bool:
    """Whether `a` (times 10 or 100) belongs to the LoRA test split: one number in ten, every last digit."""
    return (a * 7) % 10 == 3 if a < 10 else (a // 10 + a) % 10 == 3


def solve(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def worked(a: int, op: str, b: int) -> str:
    c = solve(a, op, b)
    return f"{a} {op} {b} = {c}. \\boxed{{{c}}}"


def answer_first(worked_reply: str) -> str:
    """The same reply with the box first and the worked line after it: "4 + 3 = 7. \\boxed{7}" -> "\\boxed{7} because
    4 + 3 = 7." The model must then produce the result before it has written the sum out."""
    line, boxed = worked_reply.removesuffix("}").split(". \\boxed{")
    return f"\\boxed{{{boxed}}} because {line}."


def draw_style(rng: TaskRandom) -> Callable[[str], str]:
    """One of the two reply styles SFT and DPO teach, as a function of the worked-first reply: worked first (kept as it
    is, `WORKED_FIRST_SHARE` of the draws) or answer first."""
    return str if rng.random() < WORKED_FIRST_SHARE else answer_first


def sample_pair(rng: TaskRandom, op: str, held_out: bool = False, low: int = 0) -> tuple[int, int]:
    """Operands for `op`. Sums and differences: any one-digit pair (from `low`). Products, the LoRA skill: a number
    from 2 to 99, from the test numbers or the train ones (`held_out`), times 10 or 100."""
    if op != "*":
        a, b = rng.randint(low, rng.max_operand), rng.randint(low, rng.max_operand)
        return (b, a) if op == "-" and a < b else (a, b)
    while True:
        a, b = rng.randint(2, 99), rng.choice((10, 100))
        if is_held_out_multiplicand(a) == held_out:
            return a, b


def is_test_question(question: str) -> bool:
    """Whether a question belongs to the test files: one question in eight, by a stable hash of its text. No train
    file and no corpus document asks a test question; every fact and every wording is in both splits."""
    return zlib.crc32(question.encode()) % 8 == 0


def bare_question(rng: TaskRandom, op: str, a: int, b: int) -> str:
    return rng.choice(BARE_QUESTIONS).format(a=a, op=op, b=b, word=OP_WORDS[op])


def word_problem(rng: TaskRandom, op: str, a: int, b: int) -> str:
    return rng.choice(WORD_QUESTIONS[op]).format(a=a, b=b, name=rng.choice(NAMES), obj=rng.choice(OBJECTS))


def draw_problem(rng: TaskRandom, op: str, is_word: bool, held_out: bool) -> tuple[str, int, int]:
    """(question, a, b) for `op`, drawn again until it belongs to the split `held_out` asks for. Sums and differences:
    the question is held out (`is_test_question`); products (the LoRA skill): the number is."""
    ask = word_problem if is_word else bare_question
    while True:
        a, b = sample_pair(rng, op, held_out, low=2 if is_word else 0)
        question = ask(rng, op, a, b)
        if op == "*" or is_test_question(question) == held_out:
            return question, a, b


def math_problems(rng: TaskRandom, n: int, ops: str, held_out: bool) -> list[tuple[str, int, str, int]]:
    """`n` distinct (question, a, op, b), shuffled: two bare questions for every word problem."""
    problems, seen = [], set()
    while len(problems) < n:
        op = rng.choice(ops)
        question, a, b = draw_problem(rng, op, is_word=len(problems) % 3 == 2, held_out=held_out)
        if question not in seen:
            seen.add(question)
            problems.append((question, a, op, b))
    rng.shuffle(problems)
    return problems


def chat_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def sft_rows(rng: TaskRandom, n: int, held_out: bool) -> list[dict]:
    n_chat = n // 10
    # train cycles through every small-talk pair; test samples a few of them (they are fixed facts, not held out)
    chat = [CHAT[i % len(CHAT)] for i in range(n_chat)] if n_chat >= len(CHAT) else rng.sample(CHAT, n_chat)
    problems = math_problems(rng, n - n_chat, "+-", held_out)
    rows = [chat_row(q, draw_style(rng)(worked(a, op, b))) for q, a, op, b in problems]
    rows += [chat_row(q, answer) for q, answer in chat]
    rng.shuffle(rows)
    return rows


def rejected_answer(rng: TaskRandom, kind: int, a: int, op: str, b: int) -> str:
    """A wrong reply of the kinds a small chat model makes, each consistent with itself except where noted."""
    c = solve(a, op, b)
    if kind == 0:  # an operand misread from the question (and the result of the misread sum)
        other = rng.choice([n for n in range(rng.max_operand + 1) if n != b and (op == "+" or n <= a)])
        return worked(a, op, other)
    if kind == 1:  # the worked line right, the box not
        wrong = rng.choice([n for n in range(max(c - 3, 0), c + 4) if n != c])
        return f"{a} {op} {b} = {c}. \\boxed{{{wrong}}}"
    delta = rng.choice((-3, -2, -1, 1, 2, 3))  # a near miss, consistent in the worked line and the box
    wrong = c + delta if c + delta >= 0 else c - delta
    return f"{a} {op} {b} = {wrong}. \\boxed{{{wrong}}}"


def dpo_rows(rng: TaskRandom, n: int, held_out: bool) -> list[dict]:
    """Preference pairs in SFT's mix of styles, both replies of a pair in the same style: a pair then says nothing
    about which style to use (its first tokens cancel in DPO's log-ratio), so DPO leaves the style to GRPO."""
    rows = []
    for i, (q, a, op, b) in enumerate(math_problems(rng, n, "+-", held_out)):
        chosen, rejected = worked(a, op, b), rejected_answer(rng, i % 3, a, op, b)
        style = draw_style(rng)
        chosen, rejected = style(chosen), style(rejected)
        rows.append(
            {
                "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return rows


def grpo_rows(rng: TaskRandom, n: int, held_out: bool) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": q}], "answer": str(solve(a, op, b))}
        for q, a, op, b in math_problems(rng, n, "+-", held_out)
    ]


def lora_rows(rng: TaskRandom, n: int, held_out: bool) -> list[dict]:
    """`n` multiplication chats; the train file also replays as many sums and differences, so that the adapter adds the
    skill with less forgetting of the ones it had (without them it answered every sum with a product; with a third as
    many, held-out arithmetic fell from 49 % to 14 %; with as many, from 46 % to 31 %: one demo run each)."""
    rows = [chat_row(q, worked(a, op, b)) for q, a, op, b in math_problems(rng, n, "*", held_out)]
    if not held_out:
        rows += [chat_row(q, worked(a, op, b)) for q, a, op, b in math_problems(rng, n, "+-", False)]
        rng.shuffle(rows)
    return rows


def as_question(row: dict) -> dict:
    """A chat row as a question for the answer accuracy (`apex-hf eval`'s task format): prompt and boxed answer."""
    user, assistant = row["messages"]
    return {"prompt": [user], "answer": assistant["content"].rsplit("\\boxed{", 1)[1].rstrip("}")}


def practice_doc(rng: TaskRandom) -> str:
    op = rng.choice("+-")
    title = {"+": "Addition practice.", "-": "Subtraction practice."}[op]
    pairs = [sample_pair(rng, op) for _ in range(rng.randint(5, 8))]
    return "\n".join([title] + [worked(a, op, b) for a, b in pairs])


def training_problems(rng: TaskRandom, is_word: bool) -> list[tuple[str, int, str, int]]:
    """3 to 5 train questions (bare or word problems) with their sums or differences, as (question, a, op, b)."""
    problems = []
    for _ in range(rng.randint(3, 5)):
        op = rng.choice("+-")
        question, a, b = draw_problem(rng, op, is_word, held_out=False)
        problems.append((question, a, op, b))
    return problems


def word_problems_doc(rng: TaskRandom) -> str:
    return "\n".join(f"{q} {worked(a, op, b)}" for q, a, op, b in training_problems(rng, is_word=True))


def question_answer_doc(rng: TaskRandom) -> str:
    lines = []
    for q, a, op, b in training_problems(rng, is_word=False):
        lines += [f"Question: {q}", f"Answer: {worked(a, op, b)}"]
    return "\n".join(lines)


def fact_family_doc(rng: TaskRandom) -> str:
    while True:
        a, b = sample_pair(rng, "+", low=1)
        c = a + b
        if c <= rng.max_operand:
            break
    return (
        f"The numbers {a}, {b} and {c} make a fact family.\n"
        f"{a} + {b} = {c} and {b} + {a} = {c}.\n"
        f"{c} - {b} = {a} and {c} - {a} = {b}.\n"
        f"So if you know that {a} + {b} = {c}, you also know that {c} - {a} = {b}. \\boxed{{{b}}}"
    )


# Every document states sums and differences: a 6M-parameter model learns the facts in four minutes, from many small
# steps (recipes/apex-small/pretrain.yaml says how that was measured). Counting runs, numbers in words and number
# facts also made up three sevenths of the corpus once; without them, the SFT model's held-out answer accuracy went
# from 37.5 % to 45.3 % (one run each, same seed).
CORPUS_DOCS = (practice_doc, word_problems_doc, question_answer_doc, fact_family_doc)


def corpus(rng: TaskRandom, max_bytes: int) -> str:
    docs, size = [], 0
    while size < max_bytes:
        doc = rng.choice(CORPUS_DOCS)(rng)
        docs.append(doc)
        size += len(doc) + 2
    return "\n\n".join(docs) + "\n"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    path.write_text(text, encoding="utf-8", newline="\n")


def build(out: Path, seed: int, scale: str = "demo") -> list[Path]:
    size = SCALES[scale]
    out.mkdir(parents=True, exist_ok=True)

    # one stream per file, so that changing one file's recipe leaves the other files as they are
    def rng(name: str) -> TaskRandom:
        return TaskRandom(f"{seed}:{name}", size["max_operand"])

    path = out / "arithmetic_corpus.txt"
    path.write_text(corpus(rng(path.name), size["corpus_bytes"]), encoding="utf-8", newline="\n")
    paths = [path]
    for stage, make_rows in (("sft", sft_rows), ("dpo", dpo_rows), ("grpo", grpo_rows), ("lora", lora_rows)):
        for split, n in zip(("train", "test"), size["rows"][stage]):
            path = out / f"{stage}_{split}.jsonl"
            write_jsonl(path, make_rows(rng(path.name), n, held_out=split == "test"))
            paths.append(path)
    # the LoRA test rows again, as questions with their answers: what the demo's answer accuracy reads
    path = out / "lora_test_questions.jsonl"
    write_jsonl(path, [as_question(row) for row in read_jsonl(out / "lora_test.jsonl")])
    return paths + [path]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scale", choices=sorted(SCALES), default="demo", help="the task's size (default: demo)")
    p.add_argument("--out", default=None, help="output folder (default: data/<scale>)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(__file__).resolve().parent.parent / "data" / args.scale
    for path in build(out, args.seed, args.scale):
        text = path.read_text(encoding="utf-8")
        print(f"wrote {path} ({len(text.encode())} bytes, {text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
