"""metrics.jsonl (one record per optimizer step), eval.jsonl, TensorBoard, Weights & Biases; rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path

from dwmtrain.errors import PlannedStop
from dwmtrain.fileio import atomic_write_text, read_jsonl
from dwmtrain.rundir import RunDir


def mfu(tokens_per_s: float, flops_per_token: float, n_devices: int, peak: float | None) -> float | None:
    """The share of the devices' dense bf16 peak (``accelerators.peak_flops``) that ``flops_per_token`` at this rate
    is: the LM's model FLOPs (``models.spec.model_flops_per_token``: 6N + attention), or the DWM's forward. None
    without a known peak (a CPU, an unknown GPU)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)


class MetricsWriter:
    """Appends JSON records (and sends them to TensorBoard and W&B); on resume, drops records past the resumed
    step first."""

    def __init__(self, rd: RunDir, enabled: bool, tensorboard: bool, resume_step: int | None, cfg=None):
        self.enabled = enabled
        self.path, self.eval_path = rd.metrics, rd.evals
        self.tb = self.wandb = None
        if not enabled:
            return
        for p in (self.path, self.eval_path):
            _truncate_after(p, resume_step if resume_step is not None else 0)
        if cfg is not None and cfg.run.wandb.mode != "disabled":
            from dwmtrain.train.wandb_run import WandbRun

            self.wandb = WandbRun(cfg, rd)
            # a rerun sends the records it keeps again: what a killed run's W&B process had not written yet is
            # then there too (the rest are the same values at the same steps)
            for path, kind in ((self.path, "train"), (self.eval_path, "eval")):
                for rec in read_jsonl(path):
                    self.wandb.log(rec, kind)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(rd.tensorboard), purge_step=resume_step)
            except ImportError:
                self.tb = None

    def log(self, rec: dict, kind: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path if kind == "train" else self.eval_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):  # (both are the axes)
                    self.tb.add_scalar(f"{kind}/{k}", v, rec["step"])
        if self.wandb is not None:
            self.wandb.log(rec, kind)

    def boundary(self, step: int, stage: int, pause: dict) -> None:
        """A stage boundary's pause and its meta-update (W&B; the files are in RUN_DIR/meta already)."""
        if self.wandb is not None:  # (None on the ranks that do not write)
            self.wandb.boundary(step, stage, pause)

    def close(self, failed: bool = False) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish(failed)
            self.wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None and not issubclass(exc_type, PlannedStop))


def _truncate_after(path: Path, step: int) -> None:
    """Keep records with step <= ``step`` (those after it are re-run after a resume)."""
    if path.exists():  # a line cut short by a kill is dropped too
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
