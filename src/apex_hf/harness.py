"""`apex-hf eval`: lm-eval-harness on a saved Apex folder, with the held-out answer tasks shipped here.

lm-eval loads the folder as any Hugging Face model (`HFLM`, remote code: its config.json's auto_map and the modeling
files saved next to it), so what it measures is what a user of the folder gets, without apex_hf. The local tasks
(`lm_eval_tasks/*.yaml`, scored by `apex_hf.answer_task`) read a JSONL file of `{"prompt": [...], "answer": ...}` rows;
the YAML files are copied into a temporary include folder with that file's absolute path added, so that the tasks
work from an installed wheel and whatever the working directory. Any other task name goes to lm-eval as it is.

lm-eval is the `eval` extra: without it, `run_lm_eval` raises an ImportError naming the install command.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from pathlib import Path

from .stage_folder import check_model_folder


LOCAL_TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
LOCAL_TASKS = tuple(sorted(path.stem for path in LOCAL_TASKS_DIR.glob("*.yaml")))
# the demo's held-out questions, present in a checkout of the repository (an installed wheel has no data/)
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "demo" / "grpo_test.jsonl"
LM_EVAL_MISSING = "apex-hf eval runs lm-eval-harness, which is not installed: pip install 'apex-hf[eval]'"


def require_lm_eval() -> None:
    """Import lm-eval, or raise an ImportError naming the extra that installs it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ImportError(LM_EVAL_MISSING) from None


def check_saved_model(folder: str | Path) -> Path:
    """A saved model folder: it exists, holds config.json, and passes the manifest check every command that loads a
    model makes (`stage_folder.check_model_folder`): a half-copied or edited folder is not measured without a word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} not found (or not a folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (it is not a saved model folder)")
    check_model_folder(folder)
    return folder


def check_limit(limit: int | float | None) -> None:
    """lm-eval's `limit`: a number of rows per task (>= 1), or a fraction of them (0 < limit < 1)."""
    if limit is not None and not (limit >= 1 or 0 < limit < 1):
        raise ValueError(f"limit must be a number of rows (>= 1) or a fraction (0 < limit < 1), got {limit}")


def answer_data_file(data: str | Path | None) -> Path:
    """The JSONL file the local tasks read, checked: `data`, else the repository's demo test file."""
    if data is None and not DEFAULT_DATA.is_file():
        raise FileNotFoundError(
            f"the local tasks' default data {DEFAULT_DATA} is absent (it ships with the repository, not the"
            " package): pass the JSONL file of prompt / answer rows (--data FILE)"
        )
    path = DEFAULT_DATA if data is None else Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    check_answer_rows(path)
    return path.resolve()


def check_answer_rows(path: Path) -> None:
    """Every line of `path` is a JSON row with one user message as `prompt` and an `answer`: a bad row is named by
    its line before the model loads, rather than by a data set builder's traceback after."""
    from .answer_task import doc_to_text

    rows = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}") from None
        if not isinstance(row, dict) or "answer" not in row:
            raise ValueError(f"{path} line {number}: a row needs an `answer` field, got {line.strip()[:80]}")
        try:
            doc_to_text(row)
        except ValueError as error:
            raise ValueError(f"{path} line {number}: {error}") from None
        rows += 1
    if rows == 0:
        raise ValueError(f"{path} holds no rows")


def write_local_tasks(include_dir: Path, data_file: Path) -> None:
    """Copy the local task YAML files into `include_dir`, each reading `data_file` as its test split."""
    # a JSON string is a valid YAML double-quoted scalar: any path, escaped
    dataset_kwargs = f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data_file))}\n"
    for name in LOCAL_TASKS:
        text = (LOCAL_TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8")
        (include_dir / f"{name}.yaml").write_text(text + dataset_kwargs, encoding="utf-8")


def task_manager(tasks: list[str], include_dir: Path):
    """lm-eval's task index: the local tasks, and its own ~15,000 only when a task outside them is asked for
    (indexing those takes seconds)."""
    from lm_eval.tasks import TaskManager

    needs_public = any(task not in LOCAL_TASKS for task in tasks)
    return TaskManager(include_path=str(include_dir), include_defaults=needs_public)


def check_task_names(tasks: list[str], manager) -> None:
    """Every task is a name lm-eval knows (a task, group or tag); an unknown one is named with its close matches."""
    if not tasks:
        raise ValueError(f"no task given; the local tasks are {', '.join(LOCAL_TASKS)}")
    for task in tasks:
        if task not in manager.all_tasks:
            close = difflib.get_close_matches(task, manager.all_tasks, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown lm-eval task {task!r}{hint} (the local tasks: {', '.join(LOCAL_TASKS)})")


def load_model(folder: Path, batch_size: int, device: str):
    """The folder as lm-eval's Hugging Face model, through its remote code."""
    from lm_eval.models.huggingface import HFLM

    # add_bos_token=False: the chat template's text is the whole prompt, as in evaluation.generation_accuracy
    return HFLM(
        pretrained=str(folder), trust_remote_code=True, batch_size=batch_size, device=device, add_bos_token=False
    )


def run_lm_eval(
    folder: str | Path,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    apply_chat_template: bool = True,
    num_fewshot: int | None = None,
    data: str | Path | None = None,
    log_samples: bool = False,
) -> dict:
    """lm-eval's results dict (`results`, `configs`, ... and `samples` with `log_samples`) for the saved model
    `folder` on `tasks`. The local tasks read `data` (default: the repository's data/demo/grpo_test.jsonl).
    lm-eval seeds Python's, NumPy's and torch's random generators (its defaults) before it runs."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)  # a lone name, not its letters
    check_limit(limit)
    folder = check_saved_model(folder)
    require_lm_eval()
    # without a local task asked for, the local tasks are still indexed (an unknown name's close matches include
    # them) but their data file is never read
    data_file = answer_data_file(data) if set(tasks) & set(LOCAL_TASKS) else DEFAULT_DATA
    with tempfile.TemporaryDirectory(prefix="apex-lm-eval-tasks-") as include_dir:
        write_local_tasks(Path(include_dir), data_file)
        manager = task_manager(tasks, Path(include_dir))
        check_task_names(tasks, manager)  # before the model loads
        return evaluate(
            load_model(folder, batch_size, device),
            tasks,
            manager,
            limit=limit,
            apply_chat_template=apply_chat_template,
            num_fewshot=num_fewshot,
            log_samples=log_samples,
        )


def evaluate(
    model,
    tasks: list[str],
    manager,
    *,
    limit: int | float | None,
    apply_chat_template: bool,
    num_fewshot: int | None,
    log_samples: bool,
) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        log_samples=log_samples,
    )


def metric_summary(results: dict) -> dict[str, dict[str, float]]:
    """Task -> metric -> value, from lm-eval's results (`acc,none` read as `acc`; stderr and aliases left out)."""
    summary = {}
    for task, values in results["results"].items():
        metrics = {}
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and filter_name and not metric.endswith("_stderr"):
                metrics[metric if filter_name == "none" else key] = value
        summary[task] = metrics
    return summary


def results_table(results: dict) -> str:
    """lm-eval's own Markdown table of the results (and of the groups, when a task was a group)."""
    from lm_eval.utils import make_table

    tables = [make_table(results)]
    if "groups" in results:
        tables.append(make_table(results, "groups"))
    return "\n".join(tables)


def check_new_results_file(path: str | Path) -> Path:
    """A results file must not exist yet: a finished evaluation is never overwritten."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"results file {path} already exists; choose another file or delete it first")
    return path


def write_results(results: dict, path: str | Path) -> Path:
    """lm-eval's results as JSON in the new file `path` (as lm-eval's own command writes them)."""
    from lm_eval.utils import handle_non_serializable

    path = check_new_results_file(path)
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "x", encoding="utf-8") as file:  # "x": fails rather than overwrite a file made meanwhile
        file.write(text + "\n")
    return path


def answer_accuracy(folder: str | Path, data: str | Path, *, batch_size: int = 32, device: str = "cpu") -> float:
    """The `apex_demo_answers` exact match of the saved model `folder` on the JSONL rows of `data`: the demo's held-out
    answer accuracy, measured by lm-eval (equal to `evaluation.generation_accuracy` on the same rows). 32 questions
    a call give the same exact matches as 8 in about half the time on two cores (2 s instead of 3.5 for the demo's
    128 questions)."""
    results = run_lm_eval(folder, ["apex_demo_answers"], data=data, batch_size=batch_size, device=device)
    return metric_summary(results)["apex_demo_answers"]["exact_match"]
