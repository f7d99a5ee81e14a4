"""Rank 0's Weights & Biases run (``run.wandb``): the records of metrics.jsonl and eval.jsonl, the resolved config,
the stage boundaries and the meta-update logs. One W&B run per training run: its id is kept in RUN_DIR/wandb_id,
so a rerun (a resume, a requeued job, the next stage's job of a pipeline) continues it.

Every value is logged against the training step (``step``, W&B's x-axis for all of them) rather than W&B's own
counter: a resumed run repeats the steps after its checkpoint, which W&B then shows as a second point at the same
step (metrics.jsonl keeps only the repeated ones), and it sends the records it keeps again (``MetricsWriter``), as
a SIGKILL loses what W&B's own process had not written yet."""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from dwmtrain.errors import ConfigError
from dwmtrain.fileio import atomic_write_text, read_jsonl
from dwmtrain.rundir import RunDir

log = logging.getLogger(__name__)


def wandb_run_id(rd: RunDir) -> str:
    """The run's W&B id: the one a first start wrote to RUN_DIR/wandb_id, else a new one (written now)."""
    path = rd.root / "wandb_id"
    if path.is_file() and (known := path.read_text().strip()):
        return known
    new = secrets.token_hex(4)  # W&B's ids are short lowercase alphanumerics
    atomic_write_text(path, new + "\n")
    return new


class WandbRun:
    """The open W&B run of rank 0; ``log`` takes the records MetricsWriter writes."""

    def __init__(self, cfg, rd: RunDir):
        wb = cfg.run.wandb
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                f"run.wandb.mode={wb.mode}: wandb is not installed (pip install 'dwmtrain[wandb]')"
            ) from None
        self.rd = rd
        # its own W&B service: not one a launching process (a notebook, a test) left in the environment, which
        # would outlive a killed run holding its run id
        os.environ.pop("WANDB_SERVICE", None)
        self.run = _init(wandb, dict(
            project=wb.project,
            entity=wb.entity or None,
            name=wb.name or cfg.run.name,
            mode=wb.mode,
            dir=str(rd.root),
            id=wandb_run_id(rd),
            resume="allow",
            config=cfg.to_dict(),
        ))  # fmt: skip
        if self.run is not None:
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")

    def log(self, rec: dict, kind: str) -> None:
        """One record (``kind``: train, eval, boundary, meta) as ``kind/field`` numbers at its step."""
        if self.run is None:
            return
        nums = {f"{kind}/{k}": v for k, v in rec.items() if k not in ("step", "time") and isinstance(v, (int, float))}
        self.run.log({"step": rec["step"], **nums})

    def boundary(self, step: int, stage: int, pause: dict) -> None:
        """A stage boundary: its pause (seconds by part), the last record of the meta-update job that fitted the
        stage's DWM (one point per boundary), and that job's records and log as files of the run."""
        if self.run is None:
            return
        self.log({"step": step, "stage": stage, **pause}, "boundary")
        if meta := read_jsonl(self.rd.meta_records(stage)):
            self.log({**meta[-1], "step": step, "stage": stage, "meta_steps": len(meta)}, "meta")
        for f in (self.rd.meta_records(stage), self.rd.meta_log(stage)):
            if Path(f).is_file():
                self.run.save(str(f), base_path=str(self.rd.root), policy="now")

    def finish(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


INIT_TRIES, INIT_WAIT_S = 8, 5.0  #: a killed run's W&B process keeps its run id "in use" for a few seconds


def _init(wandb, kwargs: dict):
    """``wandb.init``, tried again while the run id is still held by a killed predecessor's W&B process (a
    requeued job restarts within seconds); if W&B cannot start at all, training goes on without it (said once):
    tracking never stops a run, metrics.jsonl has every record."""
    for attempt in range(INIT_TRIES):
        try:
            return wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - W&B's own errors (in use, no network, bad credentials)
            err = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if "in use" not in str(e) or attempt == INIT_TRIES - 1:
                log.warning(f"W&B could not start ({err}); training goes on without it (metrics.jsonl has "
                            "every record)")  # fmt: skip
                return None
            time.sleep(INIT_WAIT_S)
    return None
