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

from dwmtrain.checkpoint.state import read_marker
from dwmtrain.errors import DWMTrainError
from dwmtrain.eval.tasks import LAMBADA_TASK, PAPER_TASKS, check_data
from dwmtrain.export import export_checkpoint, resolve_tag, run_config
from dwmtrain.fileio import atomic_write_text, sha256_file
from dwmtrain.rundir import RunDir


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
        m = read_marker(rd.marker(tag))
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
    marker = read_marker(rd.marker(ck.tag))
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


def evaluate_runs(
    run_dirs: list[str | os.PathLike],
    data_dir: str | os.PathLike,
    *,
    shots: tuple[int, ...] = (0, 2),
    tasks: list[str] | None = None,
    lambada: bool = True,
    checkpoint: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    devices: tuple[str, ...] = ("cpu",),
    dtype: str = "float32",
    log=print,
) -> list[dict[tuple[int, int], dict]]:
    """lm-eval results of every stage-end checkpoint (or one ``checkpoint``) of each run: {(stage, shots): result}
    per run. What is not cached is evaluated on ``devices``: one lm-eval process per device, each taking the next
    checkpoint (or checkpoint and shot setting) to evaluate (``eval.parallel``)."""
    tasks = list(tasks or PAPER_TASKS)
    names_of = {k: tasks + ([LAMBADA_TASK] if lambada and k == 0 else []) for k in shots}
    # checked before any export, hashed once for every checkpoint
    data_sha = {k: task_data_digest(check_data(names, data_dir)) for k, names in names_of.items()}
    settings = {"limit": limit, "dtype": dtype, "batch_size": batch_size}
    lm_eval = {"data_dir": data_dir, "batch_size": batch_size, "dtype": dtype, "limit": limit}
    outs: list[dict[tuple[int, int], dict]] = []
    jobs = []  # (run index, run dir, checkpoint, {shots: (tasks, key, cache path)})
    for r, run_dir in enumerate(run_dirs):
        rd, out = RunDir(run_dir), {}
        for ck in checkpoints_to_evaluate(rd, checkpoint, log):
            todo = {}
            for k in shots:
                key = cache_key(rd, ck, names_of[k], k, data_sha[k], settings)
                path = rd.lm_eval_result(ck.tag, k, key_hash(key))
                cached = json.loads(path.read_text()) if path.is_file() else None
                if cached and cached.get("key") == key:
                    log(f"[dwmtrain eval] {rd.root.name} stage {ck.stage} ({ck.tag}) {k}-shot: cached")
                    out[(ck.stage, k)] = cached
                else:
                    todo[k] = (names_of[k], key, path)
            if todo:
                jobs.append((r, str(rd.root), ck, todo))
        outs.append(out)
    from dwmtrain.eval.parallel import run_jobs

    for r, res in run_jobs(evaluate_checkpoint, jobs, list(devices), lm_eval, log):
        outs[r].update(res)
    return outs


def checkpoints_to_evaluate(rd: RunDir, checkpoint: str | None, log) -> list[StageCheckpoint]:
    """``checkpoint`` alone, else every stage-end checkpoint (stages without one are said)."""
    if checkpoint:
        tag = resolve_tag(rd, checkpoint)
        marker = read_marker(rd.marker(tag))
        return [StageCheckpoint(marker["stage"], tag, marker["step"])]
    cks, notes = stage_end_checkpoints(rd.root)
    for n in notes:
        log(f"[dwmtrain eval] {n}")
    if not cks:
        raise EvalError(f"{rd.root}: no stage-end checkpoint to evaluate yet")
    return cks


def evaluate_checkpoint(rd: RunDir, ck: StageCheckpoint, todo: dict, lm_eval: dict, log) -> dict:
    """Export ``ck`` once and run lm-eval for each shot setting of ``todo`` ({shots: (tasks, key, cache path)});
    each result is cached as it comes."""
    from dwmtrain.eval.runner import run_lm_eval

    out = {}
    rd.lm_eval_dir.mkdir(parents=True, exist_ok=True)  # exports are large: one at a time, on the run's disk
    with tempfile.TemporaryDirectory(prefix=".export-", dir=rd.lm_eval_dir) as tmp:
        hf = Path(tmp) / "hf"
        export_checkpoint(rd.root, hf, ck.tag, dtype="float32")
        for k, (names, key, path) in todo.items():
            log(f"[dwmtrain eval] {rd.root.name} stage {ck.stage} ({ck.tag}) {k}-shot: {len(names)} tasks")
            res = run_lm_eval(hf, names, k, **lm_eval)
            rec = {"key": key, "run": str(rd.root), "stage": ck.stage, "step": ck.step, **res}
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(rec, indent=1))
            out[(ck.stage, k)] = rec
    return out
