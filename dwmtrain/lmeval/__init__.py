"""lm-evaluation-harness on the paper's tasks, offline from local JSONL files (docs/evaluation.md)."""

from dwmtrain.lmeval.runner import LMEvalError, offline, run_lm_eval
from dwmtrain.lmeval.tasks import (
    LAMBADA_TASK,
    PAPER_TASKS,
    REPORTED_METRIC,
    TASKS,
    EvalDataError,
    TaskSpec,
    required_splits,
)

__all__ = [
    "LAMBADA_TASK",
    "PAPER_TASKS",
    "REPORTED_METRIC",
    "TASKS",
    "EvalDataError",
    "LMEvalError",
    "TaskSpec",
    "offline",
    "required_splits",
    "run_lm_eval",
]
