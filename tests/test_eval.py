r"""`apex-hf eval`: lm-eval-harness on a saved tiny Apex folder (remote code) with the local answer tasks, their
scoring, the agreement of `apex_demo_answers` with `evaluation.generation_accuracy` (the demo's accuracy column comes
from lm-eval), and bad input ending in one line and exit status 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from apex_hf.answer_task import answer_choices, answer_index, doc_to_text, process_results
from apex_hf.cli import main


REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"prompt": [{"role": "user", "content": "Compute 5 + 13."}], "answer": "18"},
    {"prompt": [{"role": "user", "content": "Calculate 11 - 11."}], "answer": "0"},
    {"prompt": [{"role": "user", "content": "3 - 0 = ?"}], "answer": "3"},
    {
        "prompt": [{"role": "user", "content": "There were 19 birds on a tree. Then 17 flew away. How many?"}],
        "answer": "2",
    },
    {"prompt": [{"role": "user", "content": "What is 3 + 17?"}], "answer": "20"},
    {"prompt": [{"role": "user", "content": "Add 4 and 9."}], "answer": "13"},
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: a tiny model's ops are too small to share, and on a busy machine two threads wait on each
    other (a 24-token generation takes seconds instead of milliseconds)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def chat_model(tiny_tokenizer, tmp_path_factory):
    """A saved tiny plain Apex with the ChatML template (as a stage after SFT saves it): remote code for lm-eval.

    The output (and input) rows of `<|im_end|>` and ` clause`, a token the random model often writes, are swapped, so
    that some greedy replies end their turn early and others run to the token limit, as a trained model's would;
    those of `7` and `ssi`, another, so that replies hold numbers to score."""
    import torch
    from tiny_configs import tiny_config
    from transformers import AutoTokenizer

    from apex_hf import ApexForCausalLM
    from apex_hf.tokenizer import prepare_chat_tokenizer

    path = tmp_path_factory.mktemp("chat_model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer.name_or_path)  # a copy: the session's stays as it is
    torch.manual_seed(0)
    model = ApexForCausalLM(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=256))
    prepare_chat_tokenizer(tokenizer, model)
    with torch.no_grad():
        for pair in (["<|im_end|>", "Ġclause"], ["7", "ssi"]):
            swap = tokenizer.convert_tokens_to_ids(pair)
            for embedding in (model.get_input_embeddings(), model.get_output_embeddings()):  # untied
                embedding.weight[swap] = embedding.weight[swap[::-1]]
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def eval_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("apex-hf eval: error: "), error
    return error


# --------------------------------------------------------------------------------------------------------------------
# the command end to end


def test_eval_of_both_local_tasks_prints_the_table_and_writes_the_metrics(chat_model, data_file, tmp_path, capsys):
    output = tmp_path / "results.json"
    tasks = ["apex_demo_answers", "apex_demo_answers_loglik"]
    argv = ["eval", str(chat_model), "--tasks", ",".join(tasks), "--limit", "4", "--data", str(data_file)]
    assert main([*argv, "--batch-size", "2", "--output", str(output)]) == 0

    printed = capsys.readouterr().out
    assert "|apex_demo_answers " in printed and "exact_match" in printed and f"wrote {output}" in printed
    results = json.loads(output.read_text())["results"]
    assert set(results) == set(tasks)
    for task, metrics in (("apex_demo_answers", ["exact_match"]), ("apex_demo_answers_loglik", ["acc", "acc_norm"])):
        for metric in metrics:
            assert 0.0 <= results[task][f"{metric},none"] <= 1.0
    samples = json.loads(output.read_text())["n-samples"]
    assert {task: samples[task]["effective"] for task in tasks} == dict.fromkeys(tasks, 4)


def test_apex_demo_answers_agrees_with_generation_accuracy(chat_model, tmp_path):
    """Same completions (greedy, 24 new tokens, the chat template, no added BOS, stop at the end of the turn) and
    same accuracy, though lm-eval batches and left-pads the rows differently. The rows' answers are the model's own
    final answers for every other row and wrong for the rest, so that the accuracy is neither 0 nor 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apex_hf.evaluation import generation_accuracy
    from apex_hf.harness import answer_accuracy, metric_summary, run_lm_eval
    from apex_hf.posttrain.rewards import extract_answer

    model = AutoModelForCausalLM.from_pretrained(chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    _, completions = generation_accuracy(model, tokenizer, ROWS)
    rows = [
        {**row, "answer": (extract_answer(completion) or "-1") if i % 2 == 0 else "-1"}
        for i, (row, completion) in enumerate(zip(ROWS, completions))
    ]
    data_file = tmp_path / "own_answers.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    accuracy, _ = generation_accuracy(model, tokenizer, rows)

    results = run_lm_eval(chat_model, ["apex_demo_answers"], data=data_file, batch_size=4, log_samples=True)
    samples = sorted(results["samples"]["apex_demo_answers"], key=lambda sample: sample["doc_id"])
    assert [sample["filtered_resps"][0] for sample in samples] == completions
    lengths = {len(tokenizer(completion)["input_ids"]) for completion in completions}
    assert min(lengths) < 20 and max(lengths) >= 20  # some replies ended their turn, others ran to the limit
    assert 0 < accuracy < 1
    assert metric_summary(results)["apex_demo_answers"]["exact_match"] == accuracy
    assert answer_accuracy(chat_model, data_file) == accuracy  # what the demo's accuracy column reads


# --------------------------------------------------------------------------------------------------------------------
# scoring


def test_exact_match_is_the_final_boxed_answer_against_the_answer_field():
    doc = ROWS[0]  # answer 18

    def score(completion: str) -> float:
        return process_results(doc, [completion])["exact_match"]

    assert score("5 + 13 = 18. \\boxed{18}") == 1.0
    assert score("5 + 13 = 17. \\boxed{17}") == 0.0
    assert score("\\boxed{18} no, \\boxed{17}") == 0.0  # the last box is the answer
    assert score("\\boxed{17} no, \\boxed{18}") == 1.0
    assert score("the sum is 18") == 1.0  # no box: the last number, as GRPO's accuracy reward reads it
    assert score("\\boxed{18") == 0.0  # a box cut off by the token limit answers nothing
    assert process_results({**doc, "answer": 18}, ["\\boxed{18}"])["exact_match"] == 1.0  # a JSON number


def test_the_loglik_choices_are_the_boxed_answer_and_its_nearest_integers():
    choices = answer_choices(ROWS[0])
    assert choices == ["\\boxed{16}", "\\boxed{17}", "\\boxed{18}", "\\boxed{19}", "\\boxed{20}"]
    assert choices[answer_index(ROWS[0])] == "\\boxed{18}"
    assert answer_choices(ROWS[1]) == ["\\boxed{-2}", "\\boxed{-1}", "\\boxed{0}", "\\boxed{1}", "\\boxed{2}"]
    with pytest.raises(ValueError, match="integer answers .* answer='3/4'"):
        answer_choices({**ROWS[0], "answer": "3/4"})


def test_the_default_data_is_the_demo_test_file_of_the_repository():
    from apex_hf.harness import answer_data_file

    assert answer_data_file(None) == (REPO_ROOT / "data" / "demo" / "grpo_test.jsonl").resolve()


def test_a_row_needs_one_user_message():
    assert doc_to_text(ROWS[0]) == "Compute 5 + 13."
    two_turns = {"prompt": [{"role": "system", "content": "Be brief."}, *ROWS[0]["prompt"]], "answer": "18"}
    with pytest.raises(ValueError, match="one user message"):
        doc_to_text(two_turns)


# --------------------------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2, before the model loads


def test_a_missing_folder_and_a_folder_without_config(tmp_path, capsys):
    assert "model folder " in eval_error([str(tmp_path / "missing"), "--tasks", "apex_demo_answers"], capsys)
    assert "has no config.json" in eval_error([str(tmp_path), "--tasks", "apex_demo_answers"], capsys)


def test_a_limit_below_one_row(chat_model, capsys):
    from apex_hf.harness import run_lm_eval

    assert "argument --limit: 0 is invalid: must be >= 1" in eval_error(
        [str(chat_model), "--tasks", "apex_demo_answers", "--limit", "0"], capsys
    )
    with pytest.raises(ValueError, match="limit must be a number of rows .* got -0.5"):
        run_lm_eval(chat_model, ["apex_demo_answers"], limit=-0.5)


def test_a_folder_that_no_longer_matches_its_manifest(chat_model, tmp_path, capsys):
    import shutil

    from apex_hf.stage_folder import write_manifest

    folder = tmp_path / "stage"
    shutil.copytree(chat_model, folder)
    write_manifest(folder)
    (folder / "tokenizer_config.json").write_text("{}")
    assert "tokenizer_config.json" in eval_error([str(folder), "--tasks", "apex_demo_answers"], capsys)


def test_an_unknown_task_is_named_with_its_close_matches(chat_model, capsys):
    error = eval_error([str(chat_model), "--tasks", "apex_demo_answer"], capsys)
    assert "unknown lm-eval task 'apex_demo_answer'; did you mean apex_demo_answers" in error


def test_an_existing_output_file_is_refused_and_kept(chat_model, tmp_path, capsys):
    output = tmp_path / "results.json"
    output.write_text("earlier results")
    argv = [str(chat_model), "--tasks", "apex_demo_answers", "--output", str(output)]
    assert f"results file {output} already exists" in eval_error(argv, capsys)
    assert output.read_text() == "earlier results"


def test_a_missing_data_file(chat_model, tmp_path, capsys):
    argv = [str(chat_model), "--tasks", "apex_demo_answers", "--data", str(tmp_path / "none.jsonl")]
    assert f"data file {tmp_path / 'none.jsonl'} not found" in eval_error(argv, capsys)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{", "line 2 is not JSON"),
        ('{"prompt": [{"role": "user", "content": "1 + 1?"}]}', "line 2: a row needs an `answer` field"),
        ('{"prompt": "1 + 1?", "answer": "2"}', "line 2: an answer-task row needs `prompt` = one user message"),
    ],
    ids=["not JSON", "no answer", "prompt not a conversation"],
)
def test_a_bad_data_row_is_named_by_its_line(chat_model, tmp_path, line, message, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    argv = [str(chat_model), "--tasks", "apex_demo_answers", "--data", str(data)]
    assert f"{data} {message}" in eval_error(argv, capsys)


def test_without_lm_eval_the_error_names_the_extra(chat_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    error = eval_error([str(chat_model), "--tasks", "apex_demo_answers"], capsys)
    assert "pip install 'apex-hf[eval]'" in error


def test_a_public_task_goes_to_lm_eval(chat_model, capsys):
    """arc_easy is lm-eval's own: offline without its data set, datasets' error in one line; with it, a result."""
    try:
        status = main(["eval", str(chat_model), "--tasks", "arc_easy", "--limit", "2"])
    except SystemExit as exit_info:
        status = exit_info.code
    captured = capsys.readouterr()
    if status == 0:
        assert "|arc_easy|" in captured.out
    else:
        assert status == 2 and "Traceback" not in captured.err
        last_line = captured.err.strip().splitlines()[-1]
        assert last_line.startswith("apex-hf eval: error: ") and "ai2_arc" in last_line, captured.err
