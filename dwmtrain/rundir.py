"""The layout of a run directory, owned here and asked for everywhere else.

RUN_DIR/
  config.yaml, deepspeed.json      the resolved config and the generated DeepSpeed JSON
  model_config.json                a model.init_from run's model config (config.yaml's model.hf_config)
  metrics.jsonl, eval.jsonl        one record per optimizer step / per evaluation
  data_mixture.json                a blend's (data.sources) segments: from which step each blend applies
  tensorboard/                     TensorBoard event files
  checkpoints/latest.json          the newest complete checkpoint ({"tag", "step"})
  checkpoints/latest               the same tag as DeepSpeed's tools read it (zero_to_fp32.py, load_checkpoint)
  checkpoints/stepNNNNNNN/         DeepSpeed's shards (``ShardLayout``), rng/rankR.pt, and COMPLETE (the
                                   run state with every file's size)
  checkpoints/unverified/          complete-marked checkpoints a resume could not verify, moved aside
  dwm/stageK.safetensors(.json)    the DWM that weighs stage K, and its sidecar
  meta/stageK.jsonl, stageK.log    the meta-update job's per-step records and its output
  lm_eval/<tag>/Kshot-<key>.json   lm-eval results of a stage-end checkpoint (``dwmtrain eval``'s cache)
  analysis/                        ``dwmtrain analyze-preferences`` figures and numbers
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.errors import InputNotFoundError

MARKER = "COMPLETE"
LATEST = "latest.json"
DS_LATEST = "latest"  # DeepSpeed's own pointer: a bare tag


@dataclass(frozen=True)
class ShardLayout:
    """How DeepSpeed names what each rank writes into a checkpoint: by ZeRO stage and (data, tensor) rank."""

    zero_stage: int = 3
    tp: int = 1  #: ranks per tensor-parallel group (consecutive global ranks)

    @classmethod
    def of(cls, compat: dict) -> ShardLayout:
        """The layout a checkpoint's compatibility fields record (its marker is checked: both are there)."""
        return cls(int(compat["zero_stage"]), int(compat["tensor_parallel"]))

    def patterns(self, rank: int) -> tuple[str, ...]:
        """Globs of the files global rank ``rank`` needs on its storage: ZeRO-3 writes a model and an optimizer shard
        per rank; ZeRO-1/2 an optimizer shard per rank, named by its data-parallel and tensor-parallel rank, and
        the model states once per tensor-parallel rank (by data-parallel rank 0), which every rank of that
        tensor-parallel rank loads: a ZeRO-1/2 run needs storage its nodes share (a save on node-local disks is
        refused, naming the file a rank lacks)."""
        if self.zero_stage == 3:
            return f"zero_pp_rank_{rank}_mp_rank_*_model_states.pt", f"*zero_pp_rank_{rank}_mp_rank_*_optim_states.pt"
        dp, t = divmod(rank, self.tp)
        return f"mp_rank_{t:02d}_model_states.pt", f"*zero_pp_rank_{dp}_mp_rank_{t:02d}_optim_states.pt"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @staticmethod
    def tag(step: int) -> str:
        """Checkpoint tag of the state after ``step`` optimizer steps."""
        return f"step{step:07d}"

    @staticmethod
    def is_tag(name: str) -> bool:
        return name.startswith("step") and name[4:].isdigit()

    # --- run records
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def deepspeed_json(self) -> Path:
        return self.root / "deepspeed.json"

    @property
    def model_config(self) -> Path:
        """The Hugging Face config of a run started from ``model.init_from``, kept with the run: a resume, the meta
        job, the export and the evaluation know the model without the checkpoint directory."""
        return self.root / "model_config.json"

    @property
    def data_mixture(self) -> Path:
        return self.root / "data_mixture.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def evals(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    # --- checkpoints
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def latest(self) -> Path:
        return self.checkpoints / LATEST

    @property
    def ds_latest(self) -> Path:
        return self.checkpoints / DS_LATEST

    def checkpoint(self, tag: str) -> Path:
        return self.checkpoints / tag

    def marker(self, tag: str) -> Path:
        return self.checkpoints / tag / MARKER

    def rng(self, tag: str, rank: int) -> Path:
        return self.checkpoints / tag / "rng" / f"rank{rank}.pt"

    def lm_weights(self, tag: str) -> Path:
        """The LM's consolidated fp32 weights (stage-boundary checkpoints, rank 0's storage): the meta job's input."""
        return self.checkpoints / tag / "lm_fp32.safetensors"

    def universal(self, tag: str) -> Path:
        """Checkpoint ``tag`` converted to DeepSpeed's universal format (to resume at another world size)."""
        return self.checkpoints / "universal" / tag

    def missing_rank_files(self, tag: str, rank: int, layout: ShardLayout = ShardLayout()) -> list[str]:
        """What rank ``rank`` writes into checkpoint ``tag`` (its model and optimizer shards, its RNG) and this
        machine's storage does not hold."""
        d = self.checkpoint(tag)
        missing = [str(d / pat) for pat in layout.patterns(rank) if not any(d.glob(pat))]
        return missing + ([] if self.rng(tag, rank).is_file() else [str(self.rng(tag, rank))])

    def rank_files(self, tag: str, rank: int, layout: ShardLayout = ShardLayout()) -> dict[str, int]:
        """{path relative to the checkpoint: size} of what rank ``rank`` wrote into ``tag`` on this storage
        (its shards and RNG; rank 0 also the stage-end ``lm_fp32.safetensors``)."""
        d = self.checkpoint(tag)
        files = [p for pat in layout.patterns(rank) for p in d.glob(pat)] + [self.rng(tag, rank)]
        if rank == 0:
            files.append(self.lm_weights(tag))
        return {str(p.relative_to(d)): p.stat().st_size for p in files if p.is_file()}

    def broken_dir(self, tag: str) -> Path:
        """Where a complete-marked checkpoint that failed verification is moved (never deleted)."""
        return self.checkpoints / "unverified" / f"{tag}-{int(time.time())}"

    def complete_tags(self) -> list[str]:
        """Tags of checkpoints with a COMPLETE marker, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        return sorted(p.name for p in self.checkpoints.iterdir() if self.is_tag(p.name) and (p / MARKER).is_file())

    # --- the DWM and its meta-update
    @property
    def dwm_dir(self) -> Path:
        return self.root / "dwm"

    def dwm(self, stage: int) -> Path:
        """The DWM that weighs ``stage`` (written by that boundary's meta-update job)."""
        return self.dwm_dir / f"stage{stage}.safetensors"

    def newest_dwm(self) -> Path | None:
        """The DWM of the run's latest stage that has one (None: no DWM yet)."""
        found = [(int(p.stem[5:]), p) for p in self.dwm_dir.glob("stage*.safetensors") if p.stem[5:].isdigit()]
        return max(found)[1] if found else None

    def complete_files(self, tags: list[str] | None = None) -> list[Path]:
        """Every file of the complete checkpoints (``tags``: these ones, as another host's view of the run
        directory knows them) and of every complete DWM (its sidecar is written last): what no failure may
        change or lose."""
        tags = self.complete_tags() if tags is None else tags
        files = sorted(
            f for t in tags if self.checkpoint(t).is_dir() for f in self.checkpoint(t).rglob("*") if f.is_file()
        )
        sides = sorted(self.dwm_dir.glob("stage*.safetensors.json"))
        return files + [f for s in sides for f in (s, s.with_suffix("")) if f.is_file()]

    @property
    def meta_dir(self) -> Path:
        return self.root / "meta"

    def meta_records(self, stage: int) -> Path:
        return self.meta_dir / f"stage{stage}.jsonl"

    def meta_log(self, stage: int) -> Path:
        return self.meta_dir / f"stage{stage}.log"

    # --- validation data
    @property
    def validation_dir(self) -> Path:
        """The target set's tokens (tokenized once) and the split record."""
        return self.root / "validation"

    @property
    def validation_split(self) -> Path:
        """The reward / report split of the run's validation source, written at its first start."""
        return self.validation_dir / "split.json"

    # --- evaluation and analysis
    @property
    def lm_eval_dir(self) -> Path:
        return self.root / "lm_eval"

    def lm_eval_result(self, tag: str, shots: int, key: str) -> Path:
        """lm-eval results of checkpoint ``tag`` at ``shots`` few-shot examples for one setting (``key``: a short
        hash of tasks, data, limit, dtype...), so a quick look never replaces a full evaluation."""
        return self.lm_eval_dir / tag / f"{shots}shot-{key}.json"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"


def dwm_source(spec: str) -> Path:
    """A DWM named by a file, or by a run directory (its newest stage's DWM): ``meta.init_dwm``. A FileNotFoundError
    naming ``spec`` when it is neither."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir() and (newest := RunDir(p).newest_dwm()) is not None:
        return newest
    raise InputNotFoundError(
        f"meta.init_dwm={spec}: neither a DWM file nor a run directory with dwm/stageK.safetensors"
    )
