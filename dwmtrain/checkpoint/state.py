"""What a checkpoint records: the run state (its ``COMPLETE`` marker) and every rank's RNG."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dwmtrain.errors import CheckpointError

#: what each field of a marker must be: (types, lowest value or None)
_MARKER_FIELDS = {"step": (int, 0), "stage": (int, 1), "consumed_samples": (int, 0), "stage_boundary": (bool, None),
                  "dwm": (dict, None), "config_sha256": (str, None), "compat": (dict, None),
                  "skipped_steps": (int, 0), "nonfinite_steps": (int, 0), "nonfinite_streak": (int, 0),
                  "files": (dict, None), "saved_at": ((int, float, str), None)}  # fmt: skip
_REQUIRED = ("step", "stage", "consumed_samples", "files", "compat")
#: the compatibility fields a resume computes with (the others are compared, whatever they hold)
_COMPAT_INTS = {"world_size": 1, "zero_stage": 0, "tensor_parallel": 1, "total_steps": 1, "global_batch_size": 1}
_COMPAT_REQUIRED = ("world_size", "zero_stage", "tensor_parallel")  #: what every rank's files are named by


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
    def from_marker(cls, tag: str, marker: dict, where: str = "") -> RunState:
        """The state a marker records, every field checked (CheckpointError naming ``where`` and the field)."""
        check_marker(marker, where or f"{tag}/COMPLETE")
        known = {f.name for f in fields(cls)} - {"tag"}
        return cls(tag=tag, **{k: v for k, v in marker.items() if k in known})

    @classmethod
    def read(cls, marker_path: Path) -> RunState:
        """The state in a checkpoint's ``COMPLETE`` marker (CheckpointError naming the file and the field)."""
        return cls.from_marker(marker_path.parent.name, read_marker(marker_path), str(marker_path))

    def dwm_in_use(self, stage_starts: list[int]) -> dict[int, str]:
        """{stage: sha256} of the DWM this state was trained with, when resumed mid-stage (else empty)."""
        sha = self.dwm.get("sha256")
        return {self.stage: sha} if sha and self.step not in stage_starts else {}


def read_marker(path: Path) -> dict:
    """A checkpoint's ``COMPLETE`` marker, checked: a CheckpointError naming the file (and the field) if it is
    missing, unreadable, not a JSON object, or holds a field of the wrong type."""
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a save that did not finish)") from None
    except (OSError, ValueError) as e:  # JSON and UTF-8 errors are ValueErrors
        raise CheckpointError(f"{path}: cannot be read ({' '.join(str(e).split())[:160]})") from None
    check_marker(marker, str(path))
    return marker


def check_marker(marker, where: str) -> None:
    """Every field a marker holds is of its type (and not below its lowest value); the run state's are present."""
    if not isinstance(marker, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(marker).__name__}")
    for k in _REQUIRED:
        if k not in marker:
            raise CheckpointError(f"{where}: field {k} missing")
    for k, (types, low) in _MARKER_FIELDS.items():
        if k not in marker:
            continue
        v = marker[k]
        if not isinstance(v, types) or (types is int and isinstance(v, bool)) or (low is not None and v < low):
            want = getattr(types, "__name__", "number or string") + (f" >= {low}" if low is not None else "")
            raise CheckpointError(f"{where}: field {k}={v!r}: must be a {want}")
    for k, low in _COMPAT_INTS.items():
        if k not in marker["compat"]:
            if k in _COMPAT_REQUIRED:
                raise CheckpointError(f"{where}: field compat.{k} missing")
            continue
        v = marker["compat"][k]
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise CheckpointError(f"{where}: field compat.{k}={v!r}: must be an int >= {low}")
    for rank, files in marker.get("files", {}).items():
        if not isinstance(files, dict) or not all(
            isinstance(n, int) and not isinstance(n, bool) for n in files.values()
        ):
            raise CheckpointError(f"{where}: field files.{rank}: must map file names to sizes in bytes")


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
