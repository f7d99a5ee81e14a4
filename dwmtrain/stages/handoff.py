"""Which DWM weighs each stage, and the hand-off at stage boundaries.

modes: ``none`` uniform throughout; ``loss_reweight`` each micro-batch weighed by its own losses (a baseline);
``fixed`` one DWM file for the whole run (the paper's static DWM_w1 / DWM_w4 ablations); ``transfer`` stage K is
weighed by stage K's DWM of another, finished bilevel run (the paper's 370M -> 1.3B and random -> DSIR/QuRating
transfers); ``oracle`` weighs samples of the domains in ``meta.oracle_drop`` 0 (a headroom baseline on labelled
data, e.g. the noise probe's corrupted documents); ``bilevel`` stage 1 uniform (or ``meta.init_dwm``'s DWM: a warm
start), then at each boundary the meta-update job fits the DWM for the next stage. Rank 0 reads and verifies the
file and broadcasts the tensors, so ranks need no shared filesystem.
"""

from __future__ import annotations

import os
import time

import torch

from dwmtrain.distributed import Dist, broadcast_tensors, run_on_rank0
from dwmtrain.errors import EXIT_META_EXTERNAL, ConfigError, PlannedStop
from dwmtrain.models.dwm import DWMArch, DWMFileError, check_dwm_tokenizer, dwm_from_state, load_dwm_state
from dwmtrain.rundir import RunDir, dwm_source
from dwmtrain.stages.meta_job import (
    MetaJobError,
    check_meta_nodes,
    external_meta_command,
    meta_job_command,
    run_meta_job,
)
from dwmtrain.stages.weighting import DomainOracle, FrozenDWM, LossReweighting, Uniform, Weighting


class ExternalMetaRequired(PlannedStop):
    """meta.launch=external: stop here so the meta job can be run as its own (e.g. SLURM) job."""

    exit_code = EXIT_META_EXTERNAL


class StageHandoff:
    """Provides the weighting of each stage (a frozen DWM replicated on every rank, or a fixed rule)."""

    def __init__(
        self,
        cfg,
        d: Dist,
        arch: DWMArch,
        dtype: torch.dtype,
        run_dir: RunDir,
        expect_sha: dict[int, str] | None = None,
        data=None,
        tokenizer_sha: str = "",
    ):
        self.cfg, self.d, self.arch, self.dtype, self.rd, self.data = cfg, d, arch, dtype, run_dir, data
        self.tokenizer_sha = tokenizer_sha  # a DWM fitted with another tokenizer is refused
        self._fixed = None
        self.expect_sha = dict(expect_sha or {})  # stage -> sha256 a resumed checkpoint was trained with
        self.pause: dict | None = None  # bilevel: the last boundary's meta job and broadcast times (seconds)
        if cfg.meta.mode == "bilevel":
            check_meta_nodes(cfg.meta.nodes, cfg.meta.launch)

    def for_stage(self, stage: int, stage_start_tag: str | None) -> Weighting:
        """The weighting of ``stage``; collective in fixed/transfer/bilevel modes."""
        mode, self.pause, mc = self.cfg.meta.mode, None, self.cfg.meta
        if mode == "none" or (mode == "oracle" and stage < mc.oracle_from_stage):
            return Uniform()
        if mode == "loss_reweight":
            if self.cfg.deepspeed.micro_batch_size < 2:  # one sample's weight is always 1: plain training
                mb = self.cfg.deepspeed.micro_batch_size
                raise ConfigError(f"meta.mode=loss_reweight weighs samples against their micro-batch: "
                                  f"deepspeed.micro_batch_size={mb} must be >= 2")  # fmt: skip
            start = mc.loss_from_step if mc.loss_from_step >= 0 else self.cfg.stages.total_steps // 20
            return LossReweighting(mc.loss_rule, mc.loss_temperature, start)
        if mode == "oracle":
            return DomainOracle(self.data, self.cfg.meta.oracle_drop)
        if mode == "fixed":
            if self._fixed is None:
                self._fixed = self._checked(stage, self.broadcast_dwm(self.cfg.meta.dwm_path))
            return self._fixed
        if stage == 1 and mode == "bilevel" and mc.init_dwm:  # a warm start: e.g. a proxy run's DWM
            return self._checked(1, self.broadcast_dwm(mc.init_dwm, resolve=True))
        if stage == 1:
            if self.expect_sha.get(1):  # resumed mid-stage-1 of a warm start, the warm start since removed
                raise ConfigError(f"the resumed checkpoint's stage 1 was weighed by a DWM (sha256 "
                                  f"{self.expect_sha[1][:12]}...): set meta.init_dwm to it to resume")  # fmt: skip
            return Uniform()
        if mode == "transfer":  # the source run's DWM of the same stage, as it weighed that stage there
            return self._checked(stage, self.broadcast_dwm(str(RunDir(self.cfg.meta.dwm_run).dwm(stage))))
        path = self.rd.dwm(stage)
        t0 = time.time()
        if torch.cuda.is_available():  # the meta job shares these GPUs (meta.launch=local): give back the cache
            torch.cuda.empty_cache()
        run_on_rank0(lambda: self._ensure_stage_dwm(stage, path, stage_start_tag))  # ranks stay in touch
        t1 = time.time()
        loaded = self._checked(stage, self.broadcast_dwm(str(path)))
        self.pause = {"meta_job_s": t1 - t0, "broadcast_s": time.time() - t1}
        return loaded

    def _checked(self, stage: int, loaded: FrozenDWM) -> FrozenDWM:
        """Refuse a DWM other than the one a checkpoint resumed mid-stage was trained with."""
        want, info = self.expect_sha.get(stage), loaded.info
        if want and want != info["sha256"]:
            raise DWMFileError(
                f"{info['path']} (sha256 {info['sha256'][:12]}...) is not the DWM the resumed checkpoint used for "
                f"stage {stage} ({want[:12]}...); restore that file or resume from the stage's start checkpoint"
            )
        return loaded

    def _ensure_stage_dwm(self, stage: int, path, tag: str | None) -> None:
        """Rank 0: reuse a finished DWM for this stage, or run the meta job (MetaJobError if it fails;
        ExternalMetaRequired with meta.launch=external)."""
        try:
            load_dwm_state(path, self.arch)  # sha256 + architecture: a finished DWM is reused
            print(f"[dwmtrain] stage {stage}: reusing {path}", flush=True)
            return
        except DWMFileError as e:
            if path.exists():
                print(f"[dwmtrain] stage {stage}: {e}; recomputing", flush=True)
        if tag is None or not self.rd.marker(tag).is_file():
            raise MetaJobError(
                f"no complete checkpoint {tag} at the start of stage {stage} to run the meta-update from"
            )
        mc = self.cfg.meta
        if mc.launch == "external":
            raise ExternalMetaRequired(
                "stopped at a stage boundary: meta.launch=external; run the meta-update job, then rerun this "
                "command:\n  " + external_meta_command(self.rd.root, stage, tag, mc.nproc, mc.nodes)
            )
        cmd = meta_job_command(self.rd.root, stage, tag, mc.nproc, mc.nodes)
        where = f"{mc.nproc} proc" + (f" x {mc.nodes} nodes" if mc.nodes > 1 else "")
        print(f"[dwmtrain] stage {stage}: running the meta-update job ({where})", flush=True)
        t0 = time.time()
        try:
            run_meta_job(cmd, self.cfg.meta.timeout_s, self.rd.meta_log(stage))
        except MetaJobError as e:
            if e.exit_code is None or not path.exists():
                raise
            try:  # its DWM is written last, verified (sha256, architecture): the job's work is complete
                load_dwm_state(path, self.arch)
            except DWMFileError:
                raise e from None
            print(f"[dwmtrain] stage {stage}: the meta-update job exited {e.exit_code} after writing {path}, "
                  "which verifies (sha256, architecture): using it", flush=True)  # fmt: skip
        try:
            load_dwm_state(path, self.arch)
        except DWMFileError as e:
            raise MetaJobError(str(e)) from None
        print(f"[dwmtrain] stage {stage}: meta-update done in {time.time() - t0:.1f} s -> {path}", flush=True)

    def broadcast_dwm(self, path: str, resolve: bool = False) -> FrozenDWM:
        """Rank 0 verifies and reads the file (``resolve``: ``path`` is ``meta.init_dwm``'s, a file or a run
        directory); every rank gets the tensors over torch.distributed.

        Any failure to read it on rank 0 is raised on every rank at once (no rank is left waiting)."""
        read: dict = {}

        def verify_and_read():
            nonlocal path
            path = str(dwm_source(path)) if resolve else path
            _, read["state"], meta = load_dwm_state(path, self.arch)
            if self.tokenizer_sha:
                check_dwm_tokenizer(meta, path, self.cfg.data.tokenizer, self.tokenizer_sha)
            return meta

        meta = run_on_rank0(verify_and_read)
        state = broadcast_tensors(read.get("state"), self.d.device)
        model = dwm_from_state(self.arch, state).to(self.d.device, self.dtype).eval().requires_grad_(False)
        if self.cfg.dwm.compile:  # the parameters are graph inputs: a new stage's DWM reuses the compiled graph
            model = torch.compile(model, dynamic=False)
        info = {
            "version": f"stage{meta.get('stage')}:{meta['sha256'][:12]}",
            "path": os.path.abspath(path),
            "sha256": meta["sha256"],
            "stage": meta.get("stage"),
        }
        return FrozenDWM(model, info)
