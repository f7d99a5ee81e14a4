"""Each ``meta.mode``: the weighting it gives each stage (from its own config section) and what it checks before a
run starts. A table from the mode's name to its class; nothing else compares mode strings.

    none           uniform throughout
    bilevel        stage 1 uniform (or ``meta.init_dwm``'s DWM: a warm start), then at each boundary the meta job
                   fits the DWM for the next stage (the method; its settings are the ``meta`` section's own)
    fixed          one DWM file for the whole run (``meta.fixed``)
    transfer       stage K weighed by stage K's DWM of another, finished bilevel run (``meta.transfer``)
    oracle         the samples of some domains weighed 0 (``meta.oracle``; a headroom baseline on labelled data)
    domain_weights each sample by a fixed factor of its domain (``meta.domain_weights``; the static baseline)
    loss_reweight  each micro-batch weighed by its own losses (``meta.loss_reweight``; a baseline)
"""

from __future__ import annotations

from dwmtrain.errors import ConfigError
from dwmtrain.rundir import RunDir
from dwmtrain.stages.weighting import DomainWeights, LossReweighting, Uniform, Weighting


class Mode:
    """A weighting mode: ``weighting(stage, b)`` for each stage (``b``: the ``stages.boundary.StageBoundary``, which
    reads, fits and broadcasts DWM files), ``problems(cfg)`` before the run."""

    def weighting(self, stage: int, b) -> Weighting:
        return Uniform()

    def problems(self, cfg) -> list[str]:
        """What is wrong with the inputs this mode reads (each one line naming the field), checked at start and by
        ``--dry-run``."""
        return []


class FixedMode(Mode):
    def __init__(self):
        self.loaded = None

    def weighting(self, stage, b):
        if self.loaded is None:  # read once: it weighs every stage
            self.loaded = b.dwm_file(stage, b.x.cfg.meta.fixed.dwm_path)
        return self.loaded

    def problems(self, cfg):
        from dwmtrain.checkpoint.dwm_file import DWMFileError, read_dwm_meta

        try:
            read_dwm_meta(cfg.meta.fixed.dwm_path)
        except DWMFileError as e:
            return [f"meta.fixed.dwm_path: {e}"]
        return []


class TransferMode(Mode):
    def weighting(self, stage, b):
        if stage == 1:
            return Uniform()
        return b.dwm_file(stage, str(RunDir(b.x.cfg.meta.transfer.dwm_run).dwm(stage)))

    def problems(self, cfg):
        from dwmtrain.checkpoint.dwm_file import DWMFileError, arch_from_meta, arch_mismatch, meta_path, read_dwm_meta

        run, want, out = cfg.meta.transfer.dwm_run, _run_arch(cfg), []
        for k in range(2, cfg.stages.num_stages + 1):
            path = RunDir(run).dwm(k)
            try:  # the sidecar only: the tensors are verified when the stage starts
                arch = arch_from_meta(read_dwm_meta(path).get("arch"), f"DWM metadata {meta_path(path)}")
            except DWMFileError as e:
                out.append(f"meta.transfer.dwm_run={run}: stage {k}: {e}")
                continue
            if diff := arch_mismatch(arch, want):  # found now, not after a whole first stage
                out.append(f"meta.transfer.dwm_run={run}: stage {k}: another DWM architecture: " + "; ".join(diff))
        return out


class OracleMode(Mode):
    def weighting(self, stage, b):
        oc = b.x.cfg.meta.oracle
        return Uniform() if stage < oc.from_stage else DomainWeights.oracle(b.x.data, oc.drop)


class DomainWeightsMode(Mode):
    def weighting(self, stage, b):
        dc = b.x.cfg.meta.domain_weights
        if stage < dc.from_stage:
            return Uniform()
        return DomainWeights(b.x.data, dc.factors, "meta.domain_weights.factors", "domains")


class LossReweightMode(Mode):
    def weighting(self, stage, b):
        lc = b.x.cfg.meta.loss_reweight
        start = lc.from_step if lc.from_step >= 0 else b.x.cfg.stages.total_steps // 20
        return LossReweighting(lc.rule, lc.temperature, start)


class BilevelMode(Mode):
    def weighting(self, stage, b):
        if stage > 1:
            return b.fitted_dwm(stage)
        if b.x.cfg.meta.init_dwm:  # a warm start: e.g. a proxy run's DWM
            return b.dwm_file(1, b.x.cfg.meta.init_dwm, resolve=True)
        if b.x.expect_sha.get(1):  # resumed mid-stage-1 of a warm start, the warm start since removed
            raise ConfigError(f"the resumed checkpoint's stage 1 was weighed by a DWM (sha256 "
                              f"{b.x.expect_sha[1][:12]}...): set meta.init_dwm to it to resume")  # fmt: skip
        return Uniform()

    def problems(self, cfg):
        return _init_dwm_problems(cfg) + _backbone_problems(cfg)


MODES: dict[str, type[Mode]] = {"none": Mode, "bilevel": BilevelMode, "fixed": FixedMode, "transfer": TransferMode,
                                "oracle": OracleMode, "domain_weights": DomainWeightsMode,
                                "loss_reweight": LossReweightMode}  # fmt: skip


def mode_of(cfg) -> Mode:
    """The mode ``meta.mode`` names (the config has checked the name)."""
    return MODES[cfg.meta.mode]()


def _run_arch(cfg):
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.models.spec import lm_spec

    return DWMArch.from_config(cfg, lm_spec(cfg.model).vocab_size)


def _init_dwm_problems(cfg) -> list[str]:
    """A warm start's DWM (meta.init_dwm): found, readable, of the architecture this run builds (its tokenizer is
    checked against the data's when the run starts)."""
    if not cfg.meta.init_dwm:
        return []
    from dwmtrain.checkpoint.dwm_file import DWMFileError, arch_from_meta, arch_mismatch, meta_path, read_dwm_meta
    from dwmtrain.errors import DWMTrainError
    from dwmtrain.rundir import dwm_source

    try:
        path = dwm_source(cfg.meta.init_dwm)
        arch = arch_from_meta(read_dwm_meta(path).get("arch"), f"DWM metadata {meta_path(path)}")
    except (DWMFileError, DWMTrainError) as e:
        return [f"meta.init_dwm: {e}" if "meta.init_dwm" not in str(e) else str(e)]
    if diff := arch_mismatch(arch, _run_arch(cfg)):
        return [f"meta.init_dwm={cfg.meta.init_dwm}: {path} is another DWM architecture: " + "; ".join(diff)]
    return []


def _backbone_problems(cfg) -> list[str]:
    """A run whose first meta job would copy the LM into a backbone of another shape: said now, not at the first
    stage boundary."""
    copies = [o for o in ("init_backbone_from_lm", "refresh_backbone") if getattr(cfg.dwm, o)]
    if not copies or cfg.dwm.features == "lm":  # no backbone: nothing is copied
        return []
    from dwmtrain.models.spec import lm_spec

    lm = lm_spec(cfg.model)
    lm_shape, bb_shape = lm.shape(), _run_arch(cfg).backbone_spec().shape()
    diff = [f"{k} {bb_shape[k]} vs the LM's {lm_shape[k]}" for k in lm_shape if lm_shape[k] != bb_shape.get(k)]
    if not diff:
        return []
    named = " and ".join(f"dwm.{o}" for o in copies)
    return [f"dwm.backbone={cfg.dwm.backbone}: {named} copies the LM into the DWM's backbone, which needs the LM's "
            f"shape ({', '.join(diff[:3])}); set dwm.backbone=lm (or the LM's preset), or {named}=false"]  # fmt: skip
