"""How to save and resume everything a run needs; the loop decides *when*.

A checkpoint ``checkpoints/stepNNNNNNN/`` holds DeepSpeed's ZeRO-3 shards (model, optimizer, LR
scheduler), one RNG file per rank, and our ``COMPLETE`` marker with the run state (step, stage,
consumed samples, DWM path + sha256, config hash, compatibility fields). The marker is written by
rank 0 only after every rank has returned from saving, and ``checkpoints/latest.json`` is then
replaced atomically: a checkpoint without both is never resumed from. DeepSpeed's own ``latest``
file is not written (it is written non-atomically and before all ranks finish).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import torch

from dwmtrain.distributed import Dist, barrier
from dwmtrain.fileio import atomic_write_text

MARKER = "COMPLETE"
LATEST = "latest.json"

# Changing any of these makes the saved state unusable for this run.
BREAKING = {
    "model_preset": "model.preset",
    "vocab_size": "model.vocab_size",
    "max_seq_len": "model.max_seq_len",
    "seq_len": "data.seq_len",
    "tokenizer_sha256": "data.tokenizer (its sha256)",
    "global_batch_size": "the global batch (deepspeed.global_batch_size/_tokens)",
    "world_size": "the world size (ZeRO-3 optimizer shards are per rank; convert with DeepSpeed's "
    "ds_to_universal to change it)",
    "dwm_backbone": "dwm.backbone",
    "meta_mode": "meta.mode",
    "data_sha": "the training data (data.train_data index)",
    "seed": "run.seed (the data order)",
}


def _deepspeed_checkpoint_globals() -> list:
    """The few DeepSpeed classes its checkpoint files pickle (allowed for weights_only loading)."""
    out = []
    for mod, name in (
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            out.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return out


@contextlib.contextmanager
def safe_torch_load():
    """Make DeepSpeed's own checkpoint readers load with ``weights_only=True`` (no arbitrary unpickling).

    DeepSpeed calls ``torch.load(..., weights_only=False)``; inside this context every torch.load is
    forced to weights_only=True with only DeepSpeed's checkpoint classes allowed.
    """
    orig = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return orig(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        torch.load = orig


class ResumeError(RuntimeError):
    """The checkpoint cannot continue this run; the message says what changed."""


def check_compatible(saved: dict, current: dict) -> list[str]:
    """Raise ResumeError listing breaking changes; return notes for harmless ones."""
    broken = [
        f"{BREAKING[k]}: checkpoint has {saved.get(k)!r}, now {current.get(k)!r}"
        for k in BREAKING
        if k in saved and saved.get(k) != current.get(k)
    ]
    if broken:
        raise ResumeError("the config changed in a way that breaks this run:\n  " + "\n  ".join(broken))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in current
        if k not in BREAKING and saved.get(k) != current.get(k)
    ]


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_pos": random.getstate()[2],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((3, tuple(int(x) for x in st["python"]), st["python_pos"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class Checkpointer:
    """Save / find / load complete sharded checkpoints under ``root``."""

    def __init__(self, root: str | os.PathLike, dist_info: Dist, keep_last: int = 3, keep_stage: bool = True):
        self.root = Path(root)
        self.d = dist_info
        self.keep_last, self.keep_stage = keep_last, keep_stage

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:07d}"

    def save(self, engine, state: dict) -> str:
        """Collective: every rank calls it. ``state`` must hold at least ``step``."""
        tag = self.tag(state["step"])
        path = self.root / tag
        if self.d.is_main and path.exists():  # an incomplete leftover of a killed run at this step
            shutil.rmtree(path)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"dwmtrain": state}, save_latest=False)
        (path / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(_rng_state(), path / "rng" / f"rank{self.d.rank}.pt")
        barrier()  # every rank has written its shards
        if self.d.is_main:
            atomic_write_text(path / MARKER, json.dumps({**state, "saved_at": time.time()}, indent=1))
            atomic_write_text(self.root / LATEST, json.dumps({"tag": tag, "step": state["step"]}))
            self._prune(keep=tag)
        barrier()
        return tag

    def latest(self) -> dict | None:
        """State of the newest complete checkpoint, or None. Falls back to scanning if latest.json is bad."""
        cands = []
        try:
            cands.append(json.loads((self.root / LATEST).read_text())["tag"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if self.root.is_dir():
            cands += sorted((p.name for p in self.root.iterdir() if p.name.startswith("step")), reverse=True)
        for tag in cands:
            m = self.root / tag / MARKER
            if m.is_file():
                try:
                    return {"tag": tag, **json.loads(m.read_text())}
                except json.JSONDecodeError:
                    continue
        return None

    def load(self, engine, tag: str) -> None:
        """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG."""
        with safe_torch_load():
            path, _ = engine.load_checkpoint(
                str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        rng = self.root / tag / "rng" / f"rank{self.d.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))

    def _prune(self, keep: str) -> None:
        done = sorted(p for p in self.root.iterdir() if p.name.startswith("step") and (p / MARKER).is_file())
        periodic = []
        for p in done:
            meta = json.loads((p / MARKER).read_text())
            if not (self.keep_stage and meta.get("stage_boundary")):
                periodic.append(p)
        for p in periodic[: max(0, len(periodic) - self.keep_last)]:
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)
