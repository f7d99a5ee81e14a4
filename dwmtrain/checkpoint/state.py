"""What a checkpoint records: the run state (its ``COMPLETE`` marker) and every rank's RNG."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields

import torch


@dataclass
class RunState:
    """Where a run is and what it was trained with: the ``COMPLETE`` marker of a checkpoint."""

    step: int  #: optimizer steps taken (applied or skipped: each consumed its global batch)
    stage: int  #: the stage those steps belong to
    consumed_samples: int  #: global samples drawn from the data order (the sampler position)
    stage_boundary: bool = False  #: taken at a stage boundary (never pruned when keep_stage_checkpoints)
    dwm: dict = field(default_factory=dict)  #: the DWM weighing this stage: version, path, sha256, stage
    config_sha256: str = ""  #: hash of the resolved config
    compat: dict = field(default_factory=dict)  #: fields a resume checks (see compat.BREAKING)
    #: steps whose update the optimizer skipped (a non-finite gradient norm, or an fp16 overflow): the LR
    #: schedule did not advance for them, so the engine's learning rate is the schedule's at step - skipped
    skipped_steps: int = 0
    nonfinite_steps: int = 0  #: steps with a non-finite loss or gradient norm, in all (run.stop_after_nonfinite)
    nonfinite_streak: int = 0  #: of those, the consecutive ones ending at ``step`` (0: the last step was finite)
    tag: str = ""  #: the checkpoint it was read from (not saved)

    @property
    def scheduler_steps(self) -> int:
        """LR-scheduler steps taken: what the engine's learning rate (and the lookahead alpha) follows."""
        return self.step - self.skipped_steps

    def to_marker(self) -> dict:
        d = asdict(self)
        d.pop("tag")
        return d

    @classmethod
    def from_marker(cls, tag: str, marker: dict) -> RunState:
        known = {f.name for f in fields(cls)} - {"tag"}
        return cls(tag=tag, **{k: v for k, v in marker.items() if k in known})

    def dwm_in_use(self, stage_starts: list[int]) -> dict[int, str]:
        """{stage: sha256} of the DWM this state was trained with, when resumed mid-stage (else empty)."""
        sha = self.dwm.get("sha256")
        return {self.stage: sha} if sha and self.step not in stage_starts else {}


def rng_state() -> dict:
    """This process's RNG states (torch, Python, CUDA when present)."""
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(x) for x in st["python"]), st["python_pos"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
