"""The paper's lm-eval tasks, read from local JSONL files instead of the Hugging Face hub.

Each task is lm-eval's own installed YAML, ``include:``-d by absolute path, with only the dataset fields overridden
(``dataset_path: json`` and ``dataset_kwargs.data_files``), so prompts, targets and metrics stay lm-eval's.
Local layout: ``DATA_DIR/<task>/<split>.jsonl`` in the record format of the task's hub dataset (docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dwmtrain.errors import ConfigError, DWMTrainError

DOCS = "docs/evaluation.md"


class EvalDataError(DWMTrainError, FileNotFoundError):
    """A task's local lm-eval data file is missing or empty; the message names the task and the file."""

    hint = "tools/fetch_eval_data.py --out DATA_DIR writes that layout, on a machine with network"


@dataclass(frozen=True)
class TaskSpec:
    """One lm-eval task: its installed YAML, the hub dataset it names, and the metrics the paper reports."""

    name: str  #: lm-eval task name, kept as is (see docs/evaluation.md, "Task names")
    yaml: str  #: the task's YAML, relative to the installed ``lm_eval/tasks`` directory
    hub_path: str  #: ``dataset_path`` in that YAML: where tools/fetch_eval_data.py downloads from
    hub_name: str | None  #: ``dataset_name`` in that YAML
    metrics: tuple[str, ...]  #: reported metrics, the first being the headline one


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("arc_easy", "arc/arc_easy.yaml", "allenai/ai2_arc", "ARC-Easy", ("acc_norm",)),
        TaskSpec("arc_challenge", "arc/arc_challenge.yaml", "allenai/ai2_arc", "ARC-Challenge", ("acc_norm",)),
        TaskSpec("boolq", "super_glue/boolq/default.yaml", "aps/super_glue", "boolq", ("acc",)),
        TaskSpec("hellaswag", "hellaswag/hellaswag.yaml", "Rowan/hellaswag", None, ("acc_norm",)),
        # the hub dataset is a loading script (which datasets>=4 no longer runs) over lgw863/LogiQA-dataset's text
        TaskSpec("logiqa", "logiqa/logiqa.yaml", "EleutherAI/logiqa", "logiqa", ("acc_norm",)),
        TaskSpec("openbookqa", "openbookqa/openbookqa.yaml", "allenai/openbookqa", "main", ("acc_norm",)),
        TaskSpec("piqa", "piqa/piqa.yaml", "baber/piqa", None, ("acc_norm",)),
        TaskSpec("sciq", "sciq/sciq.yaml", "allenai/sciq", None, ("acc_norm",)),
        TaskSpec("winogrande", "winogrande/default.yaml", "allenai/winogrande", "winogrande_xl", ("acc",)),
        TaskSpec(
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            "EleutherAI/lambada_openai",
            "default",
            ("acc", "perplexity"),
        ),
    )
}
PAPER_TASKS: tuple[str, ...] = (
    "arc_easy", "arc_challenge", "boolq", "hellaswag", "logiqa", "openbookqa", "piqa", "sciq", "winogrande",
)  # fmt: skip
LAMBADA_TASK = "lambada_openai"
#: the metric each task is reported with (normalized accuracy where the task has it)
REPORTED_METRIC: dict[str, str] = {name: spec.metrics[0] for name, spec in TASKS.items()}

_SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


def lm_eval_tasks_dir() -> Path:
    """The installed ``lm_eval/tasks`` directory."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def spec(task: str) -> TaskSpec:
    """The TaskSpec of ``task``, or a ConfigError naming the known tasks."""
    try:
        return TASKS[task]
    except KeyError:
        raise ConfigError(f"unknown lm-eval task {task!r}; known: {', '.join(TASKS)}") from None


def task_yaml(task: str) -> Path:
    """Absolute path of the installed lm-eval YAML of ``task``."""
    return lm_eval_tasks_dir() / spec(task).yaml


def task_config(task: str) -> dict[str, Any]:
    """The installed YAML of ``task`` with its includes merged (``!function`` left unresolved), as lm-eval reads it."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_yaml(task), resolve_func=False, recursive=True)


def eval_split(cfg: dict[str, Any]) -> str:
    """The split lm-eval scores: test if the YAML names one, else validation (``ConfigurableTask.eval_docs``)."""
    split = cfg.get("test_split") or cfg.get("validation_split")
    if not split:
        raise ValueError(f"task {cfg.get('task')} names neither a test nor a validation split")
    return split


def fewshot_split(cfg: dict[str, Any]) -> str:
    """The split lm-eval draws few-shot examples from: fewshot_split, else train, else validation, else test."""
    # same order as ConfigurableTask.fewshot_docs / Task.fewshot_docs
    return cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split") or eval_split(cfg)


def required_splits(task: str) -> tuple[str, ...]:
    """Splits ``task`` needs locally: the evaluated split, then the few-shot split if it is another one."""
    cfg = task_config(task)
    ev, fs = eval_split(cfg), fewshot_split(cfg)
    return (ev,) if fs == ev else (ev, fs)


def data_files(task: str, data_dir: str | Path) -> dict[str, Path]:
    """``{split: DATA_DIR/<task>/<split>.jsonl}`` for the splits ``task`` needs; EvalDataError if one is missing."""
    files = {s: Path(data_dir).resolve() / task / f"{s}.jsonl" for s in required_splits(task)}
    for path in files.values():
        if not path.is_file():
            raise EvalDataError(f"lm-eval data for task {task}: {path} not found (see {DOCS} to prepare it)")
        if path.stat().st_size == 0:
            raise EvalDataError(f"lm-eval data for task {task}: {path} is empty (see {DOCS} to prepare it)")
    return files


def check_data(tasks: list[str] | tuple[str, ...], data_dir: str | Path) -> dict[str, dict[str, Path]]:
    """``data_files`` of every task, raising one EvalDataError that lists every missing file."""
    found, problems = {}, []
    for task in tasks:
        try:
            found[task] = data_files(task, data_dir)
        except EvalDataError as e:
            problems.append(str(e).removesuffix(f" (see {DOCS} to prepare it)"))
    if problems:
        raise EvalDataError("; ".join(problems) + f" (see {DOCS} to prepare it)")
    return found


def override_config(task: str, files: dict[str, Path], datasets_cache: str | Path | None = None) -> dict[str, Any]:
    """The override YAML of ``task``: lm-eval's YAML included by absolute path, reading ``files`` as JSON."""
    cfg = task_config(task)
    kwargs: dict[str, Any] = {"data_files": {s: str(p) for s, p in files.items()}}
    if datasets_cache is not None:
        kwargs["cache_dir"] = str(datasets_cache)
    out: dict[str, Any] = {
        # An absolute include: load_yaml loads the included file with its own directory as the base of its
        # `!function utils.x` references and its own relative includes, so those still resolve.
        "include": str(task_yaml(task)),
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": kwargs,
    }
    # A split the YAML names but the task never reads (e.g. ARC's validation: it scores test, shots from train)
    # has no local file; unset it so nothing asks the json builder for it. Scored and few-shot splits are unchanged.
    for key in _SPLIT_KEYS:
        if cfg.get(key) and cfg[key] not in files:
            out[key] = None
    # A task with no training split (lambada_openai) falls back to drawing its shots from the scored test split,
    # but lm-eval leaves the scored document out of its own shots only when fewshot_split names the test split
    # (ConfigurableTask.fewshot_context); naming the same split explicitly keeps the answer out of the prompt.
    ev = eval_split(cfg)
    if not cfg.get("fewshot_split") and fewshot_split(cfg) == ev:
        out["fewshot_split"] = ev
    return out


def write_task_dir(
    tasks: list[str] | tuple[str, ...],
    data_dir: str | Path,
    out_dir: str | Path,
    datasets_cache: str | Path | None = None,
) -> Path:
    """Write one override YAML per task into ``out_dir`` (for ``TaskManager(include_path=out_dir)``); return it."""
    found = check_data(tasks, data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.yaml"):  # the TaskManager indexes every YAML here: only this call's tasks
        stale.unlink()
    for task in tasks:
        text = yaml.safe_dump(override_config(task, found[task], datasets_cache), sort_keys=False)
        (out / f"{task}.yaml").write_text(text, encoding="utf-8")
    return out
