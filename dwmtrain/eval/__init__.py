"""``dwmtrain eval``: lm-eval on the paper's tasks, offline from local JSONL files (docs/evaluation.md), for every
stage-end checkpoint of one or more runs, cached; the paper's tables and Figure 2.

    tasks.py    the paper's tasks: lm-eval's own YAMLs pointed at local files
    runner.py   one lm-eval run of a Hugging Face model directory, offline
    runs.py     every stage-end checkpoint of a run: exported, evaluated, cached
    parallel.py the evaluations on every device of the node, one lm-eval process each
    tables.py   the per-stage tables (Markdown, JSON) and ``compare``     figures.py  Figure 2
"""

from dwmtrain.eval.runner import LMEvalError, offline, run_lm_eval
from dwmtrain.eval.tasks import LAMBADA_TASK, PAPER_TASKS, REPORTED_METRIC, TASKS, EvalDataError, TaskSpec

__all__ = [
    "LAMBADA_TASK",
    "PAPER_TASKS",
    "REPORTED_METRIC",
    "TASKS",
    "EvalDataError",
    "LMEvalError",
    "TaskSpec",
    "offline",
    "run_lm_eval",
]
