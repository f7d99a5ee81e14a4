"""``dwmtrain eval``: lm-eval on every stage-end checkpoint of one or more runs, cached, as the paper reports it.

For each run and each stage k, the checkpoint taken at the end of stage k is exported to a Hugging Face
directory (``dwmtrain.export``) and evaluated by lm-evaluation-harness on the paper's 9 tasks, zero-shot
and two-shot, plus LAMBADA (zero-shot). Results are cached per checkpoint and setting under
``RUN_DIR/lm_eval/<tag>/`` together with what produced them (the checkpoint's marker, the tasks, the task
data's digest, limit, lm-eval version), so a rerun only evaluates what is new. The tables follow the
paper's layout (tasks as columns, AVERAGE last; a row per run and stage) as Markdown and JSON, and
``figure2.png`` draws the per-stage average of each run (the paper's Figure 2: RANDOM vs RANDOM+DWM).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.errors import DWMTrainError
from dwmtrain.export import export_checkpoint, run_config
from dwmtrain.fileio import atomic_write_text, sha256_file
from dwmtrain.lmeval.tasks import LAMBADA_TASK, REPORTED_METRIC
from dwmtrain.rundir import RunDir

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
LAMBADA = LAMBADA_TASK


class EvalError(DWMTrainError):
    """A run cannot be evaluated (no stage-end checkpoint, missing task data, ...)."""


@dataclass(frozen=True)
class StageCheckpoint:
    """The checkpoint that ends stage ``stage`` of a run."""

    stage: int
    tag: str
    step: int


def stage_end_checkpoints(run_dir: str | os.PathLike) -> tuple[list[StageCheckpoint], list[str]]:
    """(complete checkpoints that end a stage, notes on stages without one), read from the checkpoints' own
    markers: a stage-boundary checkpoint ends the stage it records, the run's last step ends the last stage.
    (Not from config.yaml: a resume may have changed the schedule since those checkpoints were taken.)"""
    rd = RunDir(run_dir)
    cfg = run_config(rd.root)
    ends: dict[int, StageCheckpoint] = {}
    for tag in rd.complete_tags():
        m = json.loads(rd.marker(tag).read_text())
        total = m.get("compat", {}).get("total_steps", cfg.stages.total_steps)
        if m.get("stage_boundary") or m["step"] == total:
            ends[m["stage"]] = StageCheckpoint(m["stage"], tag, m["step"])
    notes = [
        f"{rd.root}: stage {k}: no complete stage-end checkpoint (not reached yet, or pruned)"
        for k in range(1, cfg.stages.num_stages + 1)
        if k not in ends
    ]
    return [ends[k] for k in sorted(ends)], notes


def task_data_digest(files: dict[str, dict[str, Path]]) -> str:
    """sha256 over the local task files lm-eval reads (``check_data``'s answer): a cached result is reused only
    for the same data."""
    h = hashlib.sha256()
    for task in sorted(files):
        for split, path in sorted(files[task].items()):
            h.update(f"{task}/{split}:{sha256_file(path)}".encode())
    return h.hexdigest()


def cache_key(rd: RunDir, ck: StageCheckpoint, tasks: list[str], shots: int, data_sha: str, settings: dict) -> dict:
    """What a cached result depends on; any difference means evaluating again (into its own file)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        lm_eval_version = version("lm_eval")
    except PackageNotFoundError:
        lm_eval_version = "not installed"
    marker = json.loads(rd.marker(ck.tag).read_text())
    return {
        "checkpoint": ck.tag,
        "saved_at": marker.get("saved_at"),  # a checkpoint rewritten after a resume is a new one
        "config_sha256": marker.get("config_sha256"),
        "tasks": sorted(tasks),
        "num_fewshot": shots,
        "task_data_sha256": data_sha,
        **settings,  # limit, dtype, batch size
        "lm_eval": lm_eval_version,
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def evaluate_run(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    shots: tuple[int, ...] = (0, 2),
    tasks: list[str] | None = None,
    lambada: bool = True,
    checkpoint: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    log=print,
) -> dict[tuple[int, int], dict]:
    """lm-eval results of every stage-end checkpoint (or one ``checkpoint``): {(stage, shots): result}."""
    from dwmtrain.lmeval.runner import run_lm_eval
    from dwmtrain.lmeval.tasks import check_data

    rd = RunDir(run_dir)
    tasks = list(tasks or COLUMNS)
    names_of = {k: tasks + ([LAMBADA] if lambada and k == 0 else []) for k in shots}
    # checked before any export, hashed once for every checkpoint
    data_sha = {k: task_data_digest(check_data(names, data_dir)) for k, names in names_of.items()}
    settings = {"limit": limit, "dtype": dtype, "batch_size": batch_size}
    if checkpoint:
        from dwmtrain.export import resolve_tag

        tag = resolve_tag(rd, checkpoint)
        marker = json.loads(rd.marker(tag).read_text())
        cks = [StageCheckpoint(marker["stage"], tag, marker["step"])]
    else:
        cks, notes = stage_end_checkpoints(rd.root)
        for n in notes:
            log(f"[dwmtrain eval] {n}")
        if not cks:
            raise EvalError(f"{rd.root}: no stage-end checkpoint to evaluate yet")
    out: dict[tuple[int, int], dict] = {}
    for ck in cks:
        todo = {}
        for k in shots:
            names = names_of[k]
            key = cache_key(rd, ck, names, k, data_sha[k], settings)
            path = rd.lm_eval_result(ck.tag, k, key_hash(key))
            cached = json.loads(path.read_text()) if path.is_file() else None
            if cached and cached.get("key") == key:
                log(f"[dwmtrain eval] {rd.root.name} stage {ck.stage} ({ck.tag}) {k}-shot: cached")
                out[(ck.stage, k)] = cached
            else:
                todo[k] = (names, key, path)
        if not todo:
            continue
        rd.lm_eval_dir.mkdir(parents=True, exist_ok=True)  # exports are large: one at a time, on the run's disk
        with tempfile.TemporaryDirectory(prefix=".export-", dir=rd.lm_eval_dir) as tmp:
            hf = Path(tmp) / "hf"
            export_checkpoint(rd.root, hf, ck.tag, dtype="float32")
            for k, (names, key, path) in todo.items():
                log(f"[dwmtrain eval] {rd.root.name} stage {ck.stage} ({ck.tag}) {k}-shot: {len(names)} tasks")
                res = run_lm_eval(
                    hf, names, k, data_dir, batch_size=batch_size, device=device, dtype=dtype, limit=limit
                )
                rec = {"key": key, "run": str(rd.root), "stage": ck.stage, "step": ck.step, **res}
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(rec, indent=1))
                out[(ck.stage, k)] = rec
    return out


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
            if LAMBADA in r:
                row["LAMBADA acc"] = score(r[LAMBADA], LAMBADA)
                row["LAMBADA ppl"] = r[LAMBADA].get("perplexity")
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


def figure2(rows_by_shots: dict[int, list[dict]], path: Path) -> Path:
    """Per-stage AVERAGE of every run, one panel per shot setting (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows_by_shots), figsize=(5.2 * len(rows_by_shots), 3.8), squeeze=False)
    for ax, (k, rows) in zip(axes[0], sorted(rows_by_shots.items())):
        styles = [("--", "o", 7), ("-", "s", 5), (":", "^", 6), ("-.", "D", 4)]
        labels = list(dict.fromkeys(r["run"] for r in rows))
        for i, label in enumerate(labels):
            dodge = (i - (len(labels) - 1) / 2) * 0.05  # runs with equal scores stay side by side, not hidden
            pts = [(r["stage"] + dodge, r["AVERAGE"]) for r in rows if r["run"] == label and r["AVERAGE"] is not None]
            ls, marker, size = styles[i % len(styles)]
            if pts:
                ax.plot(*zip(*pts), linestyle=ls, marker=marker, markersize=size, linewidth=1.8, label=label)
        ax.set_title(f"{'Zero' if k == 0 else k}-shot: average over the {len(COLUMNS)} tasks")
        ax.set_xlabel("stage")
        ax.set_ylabel("average accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


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
