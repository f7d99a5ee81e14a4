"""The stage boundary as one component: ``StageBoundary.for_stage(stage)`` gives the weighting of a stage and,
where a DWM was fitted for it, does everything the boundary needs: rank 0 reuses the stage's DWM or runs the
meta-update job, verifies and reads the file once, every rank receives the tensors over torch.distributed (no
shared filesystem needed), and the boundary's record (what the pause was made of) is said, written to
``meta/stageK.pause.json`` and logged. Which weighting a stage gets is the mode's (``stages.modes``)."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from dwmtrain.checkpoint.dwm_file import DWMFileError, check_dwm_micro_batch, check_dwm_tokenizer, load_dwm_state
from dwmtrain.distributed import Dist, broadcast_tensors, run_on_rank0
from dwmtrain.errors import EXIT_META_EXTERNAL, PlannedStop
from dwmtrain.models.dwm import DWMArch, dwm_from_state
from dwmtrain.models.weights import applied_vs_fitted
from dwmtrain.rundir import RunDir, dwm_source
from dwmtrain.stages.meta_job import (
    MetaJobError,
    check_meta_nodes,
    external_meta_command,
    meta_job_command,
    run_meta_job,
)
from dwmtrain.stages.modes import mode_of
from dwmtrain.stages.weighting import DWMOfForward, FrozenDWM, Weighting

log = logging.getLogger(__name__)


class ExternalMetaRequired(PlannedStop):
    """meta.launch=external: stop here so the meta job can be run as its own (e.g. SLURM) job."""

    exit_code = EXIT_META_EXTERNAL


@dataclass(frozen=True)
class BoundaryInputs:
    """What the boundary works with: the run, where it sits, the DWM it builds, and what a resume expects."""

    cfg: object  #: the run's Config
    d: Dist
    rd: RunDir
    arch: DWMArch  #: the DWM this run builds (files of another architecture are refused)
    dtype: torch.dtype  #: the dtype the trainer applies the DWM in
    starts: list[int]  #: the first step of each stage
    tokenizer_sha: str = ""  #: a DWM fitted with another tokenizer is refused
    data: object = None  #: the training data (its domains: the oracle's labels)
    expect_sha: dict[int, str] = field(default_factory=dict)  #: stage -> sha256 a resumed checkpoint trained with
    metrics: object = None  #: the MetricsWriter the boundary's record goes to (W&B, TensorBoard)


@dataclass
class BoundaryRecord:
    """What one boundary's pause was made of (seconds), and the meta job's own parts from its DWM file."""

    stage: int
    meta_job_s: float
    broadcast_s: float
    checkpoint_s: float | None = None
    meta_job: dict = field(default_factory=dict)  #: the job's timings: start-up, loading the LM, meta-steps, writing
    applied: dict = field(default_factory=dict)  #: the weights applied here against the fitted ones (applied_check)

    def pause(self) -> dict:
        p = {"meta_job_s": self.meta_job_s, "broadcast_s": self.broadcast_s}
        if self.checkpoint_s is not None:
            p["checkpoint_s"] = self.checkpoint_s
        return {**p, "total_s": sum(p.values())}

    def line(self) -> str:
        p, parts = self.pause(), ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.1f} s"
                                           for k, v in self.meta_job.items())  # fmt: skip
        return (f"stage {self.stage} boundary: paused {p['total_s']:.1f} s = "
                + (f"checkpoint {self.checkpoint_s:.1f} s + " if self.checkpoint_s is not None else "")
                + f"meta job {self.meta_job_s:.1f} s" + (f" ({parts})" if parts and self.meta_job_s > 0.5 else "")
                + f" + broadcast {self.broadcast_s:.2f} s" + _applied_words(self.applied))  # fmt: skip


def _applied_words(a: dict) -> str:
    if not a or "error" in a:
        return ""
    return (f"; the DWM as applied ({a['dtype']}) against as fitted (fp32) on {a['micro_batches']} micro-batches: "
            f"max |dw| {a['max_abs_diff']:.2g} (tolerance {a['tolerance']:g})")  # fmt: skip


def applied_check(dwm: FrozenDWM, probe: dict, data, dtype: torch.dtype, device) -> dict:
    """The weights ``dwm`` gives here (the trainer's dtype, its call) on the micro-batches the meta job recorded
    (``probe``: their dataset indices and fitted fp32 weights; for a DWM that reads the LM's forward, the LM's losses
    and pooled hidden states it weighed by), against the fitted ones."""
    applied = [dwm(data.batch(ix).to(device), ix) for ix in probe["indices"]]
    if dwm.model.reads_lm:  # of what the meta job's LM gave: the DWM's own dtype is what is checked
        n = len(applied)
        losses, feats = probe.get("losses", [None] * n), probe.get("features", [None] * n)
        applied = [_of_reads(w, lo, f, device) for w, lo, f in zip(applied, losses, feats)]
    return applied_vs_fitted(applied, probe["weights"], dtype)


def _of_reads(w, losses: list | None, features: list | None, device) -> torch.Tensor:
    """A ``DWMOfForward``'s weights given recorded losses and pooled features (for dwm.features=lm)."""
    if features is not None:
        w = DWMOfForward(w.model, torch.tensor(features, device=device).to(w._dtype()), w.scale)
    lo = torch.tensor(losses, device=device) if losses is not None else torch.zeros(len(features), device=device)
    return w(lo)


class StageBoundary:
    """Gives each stage its weighting (collective where a DWM is read or fitted); the one place the boundary is."""

    def __init__(self, inputs: BoundaryInputs):
        self.x = inputs
        self.mode = mode_of(inputs.cfg)
        if inputs.cfg.meta.mode == "bilevel":
            check_meta_nodes(inputs.cfg.meta.nodes, inputs.cfg.meta.launch)

    def for_stage(self, stage: int, checkpoint_s: float | None = None) -> Weighting:
        """The weighting of ``stage``; ``checkpoint_s``: what the boundary's checkpoint took (for its record)."""
        self.checkpoint_s = checkpoint_s
        return self.mode.weighting(stage, self)

    # ---- DWM files: verified and read once on rank 0, broadcast to every rank

    def dwm_file(self, stage: int, path: str, resolve: bool = False) -> FrozenDWM:
        """The DWM in ``path`` (``resolve``: ``path`` is ``meta.init_dwm``'s, a file or a run directory), checked
        against what a resumed checkpoint of ``stage`` used."""

        def read():
            p = str(dwm_source(path)) if resolve else path
            return p, *self._verified(p)

        return self._checked(stage, self._broadcast(read))

    def fitted_dwm(self, stage: int) -> FrozenDWM:
        """Stage ``stage``'s DWM of this run: reused, or fitted by the meta job from the checkpoint at the stage's
        start (rank 0 runs it; the other ranks wait, in touch); then the boundary's record."""
        if torch.cuda.is_available():  # the meta job shares these GPUs (meta.launch=local): give back the cache
            torch.cuda.empty_cache()
        t0, box = time.time(), {}

        def fit_and_read():
            path = str(self.x.rd.dwm(stage))
            state, meta = self._reuse_or_fit(stage, path)
            box["t1"], box["probe"] = time.time(), meta.get("applied_check")
            return path, state, meta

        loaded = self._checked(stage, self._broadcast(fit_and_read))
        t1 = box.get("t1", t0)  # rank 0's: the one that records
        rec = BoundaryRecord(stage, t1 - t0, time.time() - t1, self.checkpoint_s, loaded.timings)
        if box.get("probe") and self.x.data is not None:  # rank 0: the weights it applies are the ones fitted
            try:
                rec.applied = applied_check(loaded, box["probe"], self.x.data, self.x.dtype, self.x.d.device)
            except Exception as e:  # noqa: BLE001 - a diagnostic: it never stops (or desynchronizes) the ranks
                rec.applied = {"error": f"{type(e).__name__}: {e}"}
                log.warning(f"stage {stage}: the applied-weights check could not run: {rec.applied['error']}")
            if not rec.applied.get("ok", True):
                log.warning(f"stage {stage}: the DWM's weights here ({rec.applied['dtype']}) differ from the fitted "
                            f"ones by up to {rec.applied['max_abs_diff']:.3g} (tolerance {rec.applied['tolerance']:g})"
                            "; dwm.dtype=fp32 applies it as fitted")  # fmt: skip
        self._record(rec)
        return loaded

    def _verified(self, path: str) -> tuple[dict, dict]:
        """Rank 0: the file's tensors and metadata, verified (sha256, architecture, tokenizer) in one read."""
        _, state, meta = load_dwm_state(path, self.x.arch)
        if self.x.tokenizer_sha:
            check_dwm_tokenizer(meta, path, self.x.cfg.data.tokenizer, self.x.tokenizer_sha)
        check_dwm_micro_batch(meta, path, self.x.cfg.deepspeed.micro_batch_size, "deepspeed.micro_batch_size")
        return state, meta

    def _broadcast(self, read) -> FrozenDWM:
        """``read()`` on rank 0 -> (path, state, meta); every rank gets the model. A failure on rank 0 is raised on
        every rank at once (none is left waiting)."""
        box: dict = {}

        def on_rank0():
            path, box["state"], meta = read()
            return path, meta

        path, meta = run_on_rank0(on_rank0)
        state = broadcast_tensors(box.get("state"), self.x.d.device)
        model = dwm_from_state(self.x.arch, state).to(self.x.d.device, self.x.dtype).eval().requires_grad_(False)
        if self.x.cfg.dwm.compile:  # the parameters are graph inputs: a new stage's DWM reuses the compiled graph
            model = torch.compile(model, dynamic=False)
        info = {"version": f"stage{meta.get('stage')}:{meta['sha256'][:12]}", "path": os.path.abspath(path),
                "sha256": meta["sha256"], "stage": meta.get("stage")}  # fmt: skip
        return FrozenDWM(model, info, meta.get("timings", {}))

    def _checked(self, stage: int, loaded: FrozenDWM) -> FrozenDWM:
        """Refuse a DWM other than the one a checkpoint resumed mid-stage was trained with."""
        want, info = self.x.expect_sha.get(stage), loaded.info
        if want and want != info["sha256"]:
            raise DWMFileError(
                f"{info['path']} (sha256 {info['sha256'][:12]}...) is not the DWM the resumed checkpoint used for "
                f"stage {stage} ({want[:12]}...); restore that file or resume from the stage's start checkpoint"
            )
        return loaded

    # ---- the meta job

    def _reuse_or_fit(self, stage: int, path: str) -> tuple[dict, dict]:
        """Rank 0: a finished DWM of this stage (verified), or the meta job's (MetaJobError if it fails;
        ExternalMetaRequired with meta.launch=external)."""
        try:
            found = self._verified(path)
            log.info(f"stage {stage}: reusing {path}")
            return found
        except DWMFileError as e:
            if os.path.exists(path):
                log.warning(f"stage {stage}: {e}; recomputing")
        tag = RunDir.tag(self.x.starts[stage - 1])  # the LM at the start of the stage the DWM will weigh
        if not self.x.rd.marker(tag).is_file():
            raise MetaJobError(f"no complete checkpoint {tag} at the start of stage {stage} to run the meta job from")
        mc = self.x.cfg.meta
        if mc.launch == "external":
            raise ExternalMetaRequired(
                "stopped at a stage boundary: meta.launch=external; run the meta-update job, then rerun this "
                "command:\n  " + external_meta_command(self.x.rd.root, stage, tag, mc.nproc, mc.nodes)
            )
        self._run_meta_job(stage, tag, path)
        try:
            return self._verified(path)
        except DWMFileError as e:
            raise MetaJobError(str(e)) from None

    def _run_meta_job(self, stage: int, tag: str, path: str) -> None:
        """Rank 0: the meta job to completion. One that exits non-zero after writing a DWM that verifies has done its
        work (the file is written last): it is used, and said."""
        mc = self.x.cfg.meta
        where = f"{mc.nproc} proc" + (f" x {mc.nodes} nodes" if mc.nodes > 1 else "")
        log.info(f"stage {stage}: running the meta-update job ({where})")
        t0 = time.time()
        try:
            run_meta_job(meta_job_command(self.x.rd.root, stage, tag, mc.nproc, mc.nodes), mc.timeout_s,
                         self.x.rd.meta_log(stage))  # fmt: skip
        except MetaJobError as e:
            if e.exit_code is None or not os.path.exists(path):
                raise
            try:
                self._verified(path)
            except DWMFileError:
                raise e from None
            log.warning(f"stage {stage}: the meta-update job exited {e.exit_code} after writing {path}, which "
                        "verifies (sha256, architecture): using it")  # fmt: skip
        log.info(f"stage {stage}: meta-update done in {time.time() - t0:.1f} s -> {path}")

    def _record(self, rec: BoundaryRecord) -> None:
        """Rank 0: the boundary's record on the console, in meta/stageK.pause.json, and to the metrics' W&B run."""
        if not self.x.d.is_main:
            return
        log.info(rec.line())
        self.x.rd.meta_dir.mkdir(parents=True, exist_ok=True)
        path = self.x.rd.meta_dir / f"stage{rec.stage}.pause.json"
        applied = {"applied_check": rec.applied} if rec.applied else {}
        path.write_text(json.dumps({**rec.pause(), "meta_job": rec.meta_job, **applied}, indent=1))
        if self.x.metrics is not None:
            self.x.metrics.boundary(self.x.starts[rec.stage - 1], rec.stage, rec.pause())
