"""The paper's tables from lm-eval results (Tables 1-4: tasks as columns, AVERAGE last, a row per run and stage)
as Markdown and JSON, and ``compare``, which writes them and Figure 2 for several runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dwmtrain.eval.figures import figure2
from dwmtrain.eval.tasks import LAMBADA_TASK, REPORTED_METRIC
from dwmtrain.fileio import atomic_write_text

# The paper's column order (Tables 1-4) and the names shown.
COLUMNS = {
    "arc_challenge": "ARC-C",
    "arc_easy": "ARC-E",
    "boolq": "BoolQ",
    "hellaswag": "HellaSwag",
    "logiqa": "LogiQA",
    "openbookqa": "OBQA",
    "piqa": "PIQA",
    "sciq": "SciQ",
    "winogrande": "WinoGrande",
}


def score(task_result: dict, task: str = "") -> float | None:
    """The number the paper reports for a task, in percent: its ``REPORTED_METRIC`` (acc_norm where the task
    has it, else acc); for a task outside that table, acc_norm if present, else acc."""
    for m in (REPORTED_METRIC[task],) if task in REPORTED_METRIC else ("acc_norm", "acc"):
        if isinstance(task_result.get(m), (int, float)):
            return 100.0 * task_result[m]
    return None


def table_rows(runs: dict[str, dict[tuple[int, int], dict]], shots: int, tasks: list[str]) -> list[dict]:
    """One row per (run, stage): task scores, AVERAGE over the 9 tasks, LAMBADA acc/perplexity (0-shot)."""
    rows = []
    for label, res in runs.items():
        for stage, k in sorted(res):
            if k != shots:
                continue
            r = res[(stage, k)]["results"]
            vals = {t: score(r[t], t) for t in tasks if t in r}
            row = {"run": label, "stage": stage, "step": res[(stage, k)]["step"], **vals}  # percent
            got = [v for v in vals.values() if v is not None]
            row["AVERAGE"] = sum(got) / len(got) if got and len(got) == len(tasks) else None
            if LAMBADA_TASK in r:
                row["LAMBADA acc"] = score(r[LAMBADA_TASK], LAMBADA_TASK)
                row["LAMBADA ppl"] = r[LAMBADA_TASK].get("perplexity")
            rows.append(row)
    return rows


def markdown_table(rows: list[dict], tasks: list[str], title: str) -> str:
    """The paper's layout: tasks as columns, AVERAGE after them (LAMBADA last, when evaluated)."""
    extra = [c for c in ("LAMBADA acc", "LAMBADA ppl") if any(c in r for r in rows)]
    cols = ["run", "stage", *[COLUMNS.get(t, t) for t in tasks], "AVERAGE", *extra]
    keys = ["run", "stage", *tasks, "AVERAGE", *extra]
    lines = [f"### {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("–" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare(
    runs: dict[str, dict[tuple[int, int], dict]], out: str | os.PathLike, shots: tuple[int, ...], tasks: list[str]
) -> dict[str, Path]:
    """Write the per-stage tables (Markdown + JSON, one per shot setting) and figure2.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, by_shots, md = {}, {}, []
    for k in shots:
        rows = table_rows(runs, k, tasks)
        by_shots[k] = rows
        title = f"{'Zero' if k == 0 else k}-shot performance per stage (%; acc_norm where the task has it, else acc)"
        md.append(markdown_table(rows, tasks, title))
    atomic_write_text(out / "results.md", "\n".join(md))
    atomic_write_text(out / "results.json", json.dumps({f"{k}shot": rows for k, rows in by_shots.items()}, indent=1))
    written["markdown"], written["json"] = out / "results.md", out / "results.json"
    written["figure"] = figure2(by_shots, out / "figure2.png")
    return written
