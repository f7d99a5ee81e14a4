"""Which DWM weighs each stage, and the hand-off at stage boundaries.

modes: ``none`` uniform throughout; ``fixed`` one DWM file for the whole run (the paper's static
DWM_w1 / DWM_w4 ablations and its 370M -> 1.3B transfer); ``bilevel`` stage 1 uniform, then at each
boundary the meta-update job fits the DWM for the next stage. Rank 0 reads and verifies the file
and broadcasts the tensors, so ranks need no shared filesystem.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from dwmtrain.distributed import Dist, broadcast_object, broadcast_tensors
from dwmtrain.models.dwm import DataWeightingModel, DWMArch, DWMFileError, load_dwm_state

REPO = Path(__file__).resolve().parents[2]


class MetaJobError(RuntimeError):
    """The meta-update job failed or timed out; the boundary checkpoint is intact, rerun to resume."""


class ExternalMetaRequired(RuntimeError):
    """meta.launch=external: stop here so the meta job can be run as its own (e.g. SLURM) job."""


def dwm_file(run_dir: str | os.PathLike, stage: int) -> Path:
    return Path(run_dir) / "dwm" / f"stage{stage}.safetensors"


def meta_job_command(run_dir: str, stage: int, tag: str, nproc: int, lookahead_lr: float) -> list[str]:
    """The single-node meta-update job for one boundary (torchrun picks a free port)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(REPO / "launchers" / "meta_update.py"),
        "--run-dir",
        str(run_dir),
        "--stage",
        str(stage),
        "--checkpoint",
        tag,
        "--lookahead-lr",
        repr(lookahead_lr),
    ]


def _clean_env() -> dict:
    """Our launcher's rendezvous variables must not leak into the meta job's own."""
    env = dict(os.environ)
    for k in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "LOCAL_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "CROSS_RANK",
        "CROSS_SIZE",
        "GROUP_RANK",
        "ROLE_RANK",
        "TORCHELASTIC_RUN_ID",
    ):
        env.pop(k, None)
    return env


def run_meta_job(cmd: list[str], timeout_s: float, log_path: Path) -> None:
    """Run the meta job to completion or kill it at the timeout; raise MetaJobError on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_clean_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise MetaJobError(
                f"meta-update job timed out after {timeout_s:.0f} s (meta.timeout_s); log: {log_path}"
            ) from None
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise MetaJobError(f"meta-update job exited with {rc}; log: {log_path}\n  " + "\n  ".join(tail))


class StageHandoff:
    """Provides the (frozen, replicated) DWM for each stage."""

    def __init__(self, cfg, d: Dist, arch: DWMArch, dtype: torch.dtype):
        self.cfg, self.d, self.arch, self.dtype = cfg, d, arch, dtype
        self.run_dir = Path(cfg.run.run_dir)
        self._fixed = None
        self.expect_sha: dict[int, str] = {}  # stage -> sha256 a resumed checkpoint was trained with

    def for_stage(self, stage: int, stage_start_tag: str | None, lookahead_lr: float):
        """(model or None, info) for ``stage``; collective in fixed/bilevel modes."""
        mode = self.cfg.meta.mode
        if mode == "none":
            return None, {"version": "uniform"}
        if mode == "fixed":
            if self._fixed is None:
                self._fixed = self.broadcast_dwm(self.cfg.meta.dwm_path)
            return self._fixed
        if stage == 1:
            return None, {"version": "uniform"}
        path = dwm_file(self.run_dir, stage)
        status = None
        if self.d.is_main:
            status = self._ensure_stage_dwm(stage, path, stage_start_tag, lookahead_lr)
        status = broadcast_object(status)
        if status != "ok":
            raise (ExternalMetaRequired if status.startswith("external:") else MetaJobError)(status)
        model, info = self.broadcast_dwm(str(path))
        want = self.expect_sha.get(stage)
        if want and want != info["sha256"]:
            raise DWMFileError(
                f"{path} (sha256 {info['sha256'][:12]}...) is not the DWM the resumed checkpoint used for stage "
                f"{stage} ({want[:12]}...); restore that file or resume from the stage's start checkpoint"
            )
        return model, info

    def _ensure_stage_dwm(self, stage: int, path: Path, tag: str | None, lookahead_lr: float) -> str:
        """Rank 0: reuse a finished DWM for this stage, or run the meta job. Returns 'ok' or an error."""
        try:
            load_dwm_state(path, self.arch)  # sha256 + architecture: a finished DWM is reused
            print(f"[dwmtrain] stage {stage}: reusing {path}", flush=True)
            return "ok"
        except DWMFileError as e:
            if path.exists():
                print(f"[dwmtrain] stage {stage}: {e}; recomputing", flush=True)
        if tag is None or not (self.run_dir / "checkpoints" / tag / "COMPLETE").is_file():
            return f"no complete checkpoint {tag} at the start of stage {stage} to run the meta-update from"
        cmd = meta_job_command(str(self.run_dir), stage, tag, self.cfg.meta.nproc, lookahead_lr)
        if self.cfg.meta.launch == "external":
            return "external: meta.launch=external; run the meta-update job, then rerun this command:\n  " + " ".join(
                cmd
            )
        print(f"[dwmtrain] stage {stage}: running the meta-update job ({self.cfg.meta.nproc} proc)", flush=True)
        t0 = time.time()
        try:
            run_meta_job(cmd, self.cfg.meta.timeout_s, self.run_dir / "meta" / f"stage{stage}.log")
            load_dwm_state(path, self.arch)
        except (MetaJobError, DWMFileError) as e:
            return str(e)
        print(f"[dwmtrain] stage {stage}: meta-update done in {time.time() - t0:.1f} s -> {path}", flush=True)
        return "ok"

    def broadcast_dwm(self, path: str):
        """Rank 0 verifies and reads the file; every rank gets the tensors over torch.distributed."""
        meta, state, err = None, None, None
        if self.d.is_main:
            try:
                _, state, meta = load_dwm_state(path, self.arch)
            except DWMFileError as e:
                err = str(e)
        err = broadcast_object(err)
        if err:
            raise DWMFileError(err)
        meta = broadcast_object(meta)
        state = broadcast_tensors(state, self.d.device)
        model = DataWeightingModel(self.arch)
        model.load_state_dict(state)
        model = model.to(self.d.device, self.dtype).eval().requires_grad_(False)
        info = {
            "version": f"stage{meta.get('stage')}:{meta['sha256'][:12]}",
            "path": os.path.abspath(path),
            "sha256": meta["sha256"],
            "stage": meta.get("stage"),
        }
        return model, info
