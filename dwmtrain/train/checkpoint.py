"""How to save and resume everything a run needs; the loop decides *when*.

A checkpoint ``checkpoints/stepNNNNNNN/`` (paths: ``RunDir``) holds DeepSpeed's ZeRO-3 shards (model,
optimizer, LR scheduler), one RNG file per rank, and our ``COMPLETE`` marker with the ``RunState``
(step, stage, consumed samples, DWM path + sha256, config hash, compatibility fields). The marker is
written by rank 0 only after every rank has returned from saving, and ``checkpoints/latest.json`` is
then replaced atomically: a checkpoint without both is never resumed from. DeepSpeed's own ``latest``
file is not written (it is written non-atomically and before all ranks finish).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from dwmtrain.distributed import Dist, all_gather_object, barrier, broadcast_object, run_on_rank0
from dwmtrain.errors import DWMTrainError
from dwmtrain.faults import fault_point
from dwmtrain.fileio import atomic_write_text, follow_umask
from dwmtrain.rundir import RunDir

# Changing any of these makes the saved state unusable for this run.
BREAKING = {
    "model_preset": "model.preset",
    "vocab_size": "model.vocab_size",
    "max_seq_len": "model.max_seq_len",
    "seq_len": "data.seq_len",
    "tokenizer_sha256": "data.tokenizer (its sha256)",
    "global_batch_size": "the global batch (deepspeed.global_batch_size/_tokens)",
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
    # Why swap torch.load itself: DeepSpeed's readers (engine.load_checkpoint, zero_to_fp32) call it
    # directly with no hook; the swap lasts exactly one read, in the one thread that reads.
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


class CheckpointError(DWMTrainError, RuntimeError):
    """A checkpoint could not be written completely (a rank's part is missing); nothing was marked complete."""


class ResumeError(CheckpointError):
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


@dataclass
class RunState:
    """Where a run is and what it was trained with: the ``COMPLETE`` marker of a checkpoint."""

    step: int  #: optimizer steps taken
    stage: int  #: the stage those steps belong to
    consumed_samples: int  #: global samples drawn from the data order (the sampler position)
    stage_boundary: bool = False  #: taken at a stage boundary (never pruned when keep_stage_checkpoints)
    dwm: dict = field(default_factory=dict)  #: the DWM weighing this stage: version, path, sha256, stage
    config_sha256: str = ""  #: hash of the resolved config
    compat: dict = field(default_factory=dict)  #: fields a resume checks (see BREAKING)
    tag: str = ""  #: the checkpoint it was read from (not saved)

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


class Checkpointer:
    """Save / find / resume complete sharded checkpoints of one run (collective calls).

    Works on a shared filesystem and on node-local storage alike: rank 0 decides what exists (its
    ``latest.json`` and markers), every rank checks that its own storage holds its part, and a
    checkpoint is marked ``COMPLETE`` only once every rank has confirmed its files.
    """

    def __init__(
        self,
        run_dir: RunDir,
        d: Dist,
        *,
        compat: dict,
        global_batch_size: int,
        keep_last: int = 3,
        keep_stage: bool = True,
        boundary_weights: bool = False,
    ):
        self.rd, self.d = run_dir, d
        self.compat, self.global_batch_size = compat, global_batch_size
        self.keep_last, self.keep_stage = keep_last, keep_stage
        # write lm_fp32.safetensors at stage ends (the meta job's input; export / eval read it without the shards)
        self.boundary_weights = boundary_weights
        self._bytes: int | None = None  # the largest checkpoint on this rank's storage (the free-space check)

    def save(self, engine, *, step: int, stage: int, boundary: bool, dwm: dict, final: bool = False) -> str:
        """Collective: every rank calls it after ``step`` optimizer steps. Returns the tag."""
        state = RunState(
            step=step,
            stage=stage,
            consumed_samples=step * self.global_batch_size,
            stage_boundary=boundary,
            dwm=dwm,
            config_sha256=self.compat.get("config_sha256", ""),
            compat=self.compat,
        )
        tag = RunDir.tag(step)
        self._check_space(tag)  # a disk too full for this checkpoint stops the run before a byte is written
        self._clear_leftover(tag)
        marker = state.to_marker()
        try:
            engine.save_checkpoint(
                str(self.rd.checkpoints), tag=tag, client_state={"dwmtrain": marker}, save_latest=False
            )
            rng = self.rd.rng(tag, self.d.rank)
            rng.parent.mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), rng)
            fault_point("checkpoint-shards-written", rank=self.d.rank, step=step)
            if (boundary or final) and self.boundary_weights:
                self._save_lm_weights(engine, tag)
        except OSError as e:  # the disk filled (or failed) mid-save: this rank says so; the launcher ends the rest
            raise CheckpointError(
                f"saving checkpoint {tag} on {socket.gethostname()} (rank {self.d.rank}): {e}; it is not marked "
                "complete, the newest complete checkpoint is untouched, and a rerun resumes from it"
            ) from None
        files = self._agree_complete(tag)  # every rank's part is on its storage, or every rank raises
        if self.d.is_main:
            marker = {**marker, "saved_at": time.time(), "files": files}
            atomic_write_text(self.rd.marker(tag), json.dumps(marker, indent=1))
            fault_point("checkpoint-marker-written", step=step)
            atomic_write_text(self.rd.latest, json.dumps({"tag": tag, "step": state.step}))
        self._bytes = max(self._bytes or 0, _du(self.rd.checkpoint(tag)))
        self._prune(keep=tag)
        barrier()
        return tag

    def _check_space(self, tag: str) -> None:
        """Collective: every rank compares its storage's free space with the largest checkpoint it holds."""
        if self._bytes is None:  # after a resume: what the checkpoints on this storage take
            dirs = (
                [p for p in self.rd.checkpoints.iterdir() if RunDir.is_tag(p.name)]
                if self.rd.checkpoints.is_dir()
                else []
            )
            self._bytes = max((_du(p) for p in dirs), default=0)
        self.rd.checkpoints.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.rd.checkpoints).free
        short = [r for r in all_gather_object((socket.gethostname(), free, self._bytes)) if r[1] < r[2]]
        if short:
            host, free, need = short[0]
            raise CheckpointError(
                f"saving checkpoint {tag}: {self.rd.checkpoints} on {host} has {_mib(free)} free and a checkpoint "
                f"takes {_mib(need)} there (the largest so far); nothing was written. Free space (or lower "
                "run.keep_last) and rerun the same command: it resumes from the newest complete checkpoint"
            )

    def latest(self) -> RunState | None:
        """State of the newest checkpoint whose marker is sound on this storage (no shard checks), or None."""
        return next((state for _, state, problem in self._candidates() if problem is None), None)

    def _candidates(self) -> list[tuple[str, RunState | None, str | None]]:
        """(tag, state, problem or None) for every checkpoint directory, newest step first.

        The ``COMPLETE`` marker is the commit point: ``latest.json`` is a pointer for people and tools, and
        a checkpoint whose marker exists counts even if a crash came before ``latest.json`` was replaced."""
        out = []
        try:
            named = json.loads(self.rd.latest.read_text())["tag"]
            if not self.rd.checkpoint(named).is_dir():
                out.append((named, None, f"{self.rd.latest.name} names it, but the directory is gone"))
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            pass
        tags = sorted((p.name for p in self.rd.checkpoints.iterdir() if RunDir.is_tag(p.name)), reverse=True) \
            if self.rd.checkpoints.is_dir() else []  # fmt: skip
        for tag in tags:
            m = self.rd.marker(tag)
            if not m.is_file():
                out.append((tag, None, f"no {m.name} marker (a save that did not finish)"))
                continue
            try:
                marker = json.loads(m.read_text())
                state = RunState.from_marker(tag, marker)
            except (json.JSONDecodeError, TypeError, UnicodeDecodeError, OSError) as e:
                out.append((tag, None, f"its {m.name} marker cannot be read ({e})"))
                continue
            if RunDir.tag(state.step) != tag:
                out.append((tag, None, f"its {m.name} marker records step {state.step}, not this checkpoint's"))
                continue
            out.append((tag, state, None))
        return out

    def _verify(self, state: RunState) -> str | None:
        """Collective: what is wrong with ``state``'s checkpoint on any rank's storage (missing or truncated
        files against the sizes its marker records), or None. At another world size, rank 0 checks the saved
        ranks' files (re-sharding needs them on one storage anyway)."""
        tag = state.tag
        saved_world = state.compat.get("world_size", self.d.world)
        want = broadcast_object(
            json.loads(self.rd.marker(tag).read_text()).get("files") if self.d.is_main else None
        )  # {rank: {file: size}} at save time; None for checkpoints of older versions (existence checks only)

        def problems(ranks) -> list[str]:
            out = []
            for r in ranks:
                if want is None:
                    out += [f"rank {r} lacks {m}" for m in self.rd.missing_rank_files(tag, r)]
                    continue
                have = self.rd.rank_files(tag, r)
                for rel, size in want.get(str(r), {}).items():
                    if rel not in have:
                        out.append(f"{rel} is missing")
                    elif have[rel] != size:
                        out.append(f"{rel} is {have[rel]:,} bytes, the save wrote {size:,} (truncated or replaced)")
            return out

        if saved_world == self.d.world:
            found = [(h, p) for h, p in all_gather_object((socket.gethostname(), problems([self.d.rank]))) if p]
            where = ""
        else:
            found = broadcast_object([(socket.gethostname(), problems(range(saved_world)))] if self.d.is_main else None)
            found = [(h, p) for h, p in found if p]
            where = f" (resuming {saved_world} ranks' save on {self.d.world} reads every part from rank 0's storage)"
        if not found:
            return None
        return "; ".join(f"{', '.join(p)} on {h}" for h, p in found) + where

    def resume(self, engine) -> RunState | None:
        """Collective: restore the newest checkpoint that verifies into ``engine`` (and this rank's RNG).

        Rank 0 lists the checkpoints, newest first; every rank checks its part of each (present, and the
        size the save recorded) until one verifies. Each one skipped is said, with why; none is deleted.
        Refuses (ResumeError) when checkpoints exist but none verifies, and a checkpoint whose compatibility
        fields a change of config broke; returns None for a fresh run.
        """
        state, skipped = None, []
        for tag, cand, problem in broadcast_object(self._candidates() if self.d.is_main else None):
            if problem is None:
                problem = self._verify(cand)
            if problem is None:
                state = cand
                break
            skipped.append(f"{tag}: {problem}")
            self._log(f"resume: skipping checkpoint {self.rd.checkpoint(tag)}: {problem}")
        if state is None:
            if any(": no COMPLETE marker" not in s for s in skipped):
                where = broadcast_object(str(self.rd.checkpoints))  # rank 0's storage: one message on every rank
                raise ResumeError(
                    f"no checkpoint in {where} verifies (their files are kept):\n  " + "\n  ".join(skipped)
                )
            return None
        for note in check_compatible(state.compat, self.compat):
            self._log(f"resume: config changed (allowed): {note}")
        saved_world = state.compat.get("world_size", self.d.world)
        if saved_world != self.d.world:  # the ZeRO-3 shards are per rank: re-shard through the universal format
            self._log(
                f"resume: world size {saved_world} -> {self.d.world}: loading {state.tag} as a universal checkpoint"
            )
            self._load_universal(engine, state.tag)
        else:
            self.load(engine, state.tag)
        self._log(f"resumed from {self.rd.checkpoint(state.tag)} at step {state.step} (stage {state.stage})")
        return state

    def load(self, engine, tag: str) -> None:
        """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG."""
        with safe_torch_load():
            path, _ = engine.load_checkpoint(
                str(self.rd.checkpoints), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if path is None:
            raise ResumeError(f"DeepSpeed could not load checkpoint {self.rd.checkpoint(tag)}")
        self._restore_rng(tag)

    def _restore_rng(self, tag: str) -> None:
        rng = self.rd.rng(tag, self.d.rank)
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))

    def _load_universal(self, engine, tag: str) -> None:
        """Collective: rank 0 converts ``tag`` with DeepSpeed's ds_to_universal (once), every rank loads its
        new partition of the weights and optimizer state from it. Needs the converted checkpoint on storage
        every rank sees (a shared filesystem)."""
        uni = self.rd.universal(tag)
        if not run_on_rank0(uni.is_dir):
            err = run_on_rank0(lambda: convert_to_universal(self.rd.checkpoint(tag), uni))
            if err:
                raise ResumeError(err)
        seen = all_gather_object((socket.gethostname(), self.d.rank, (uni / "zero" / "optimizer_state.pt").is_file()))
        if not all(ok for _, _, ok in seen):
            hosts = sorted({h for h, _, ok in seen if not ok})
            raise ResumeError(
                f"resuming {tag} at another world size needs {uni} on every node's storage "
                f"(a shared filesystem); {', '.join(hosts)} cannot see it"
            )
        engine._config.load_universal_checkpoint = True  # for this one load: never while saving (DeepSpeed #7546)
        try:
            with safe_torch_load():
                path, _ = engine.load_checkpoint(
                    str(uni.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
                )
        finally:
            engine._config.load_universal_checkpoint = False
        if path is None:
            raise ResumeError(f"DeepSpeed could not load the universal checkpoint {uni}")
        self._restore_rng(tag)  # a rank that did not exist before keeps its seeded state

    def _agree_complete(self, tag: str) -> dict[str, dict[str, int]]:
        """Collective: every rank reports its part of ``tag`` on its storage; any gap fails all. Returns
        {rank: {file: size}} (what the marker records, for a resume to verify; JSON keys are strings)."""
        parts = all_gather_object(
            (
                socket.gethostname(),
                self.d.rank,
                self.rd.missing_rank_files(tag, self.d.rank),
                self.rd.rank_files(tag, self.d.rank),
            )
        )
        gaps = [r for r in parts if r[2]]
        if gaps:
            lines = [f"{host} (rank {rank}) lacks {', '.join(files)}" for host, rank, files, _ in gaps]
            raise CheckpointError(
                f"saving checkpoint {tag}: not every rank holds its part of it:\n  " + "\n  ".join(lines)
            )
        return {str(rank): dict(sorted(files.items())) for _, rank, _, files in parts}

    def _clear_leftover(self, tag: str) -> None:
        """Collective, before saving ``tag``: an unfinished save of it (no marker) is removed; a complete-marked
        one that a resume skipped as unverifiable is moved to ``checkpoints/unverified/`` on every node."""
        path = self.rd.checkpoint(tag)
        aside = broadcast_object(self.rd.broken_dir(tag) if self.d.is_main and self.rd.marker(tag).is_file() else None)
        if self.d.local_rank == 0:
            shutil.rmtree(self.rd.universal(tag), ignore_errors=True)  # derived from the old one: stale
        if self.d.local_rank == 0 and path.exists():
            if aside is None:
                shutil.rmtree(path)
            else:
                aside.parent.mkdir(parents=True, exist_ok=True)
                path.rename(aside)
                if self.d.is_main:
                    self._log(f"moved the unverifiable checkpoint {path} to {aside} (kept, not deleted)")
        barrier()

    def _save_lm_weights(self, engine, tag: str) -> None:
        """Collective: gather the fp32 master weights to rank 0, which writes them (safetensors) with the shards."""
        from safetensors.torch import save_file

        state = gather_fp32_weights(engine.module, self.d.is_main)
        if self.d.is_main:
            tmp = self.rd.lm_weights(tag).with_suffix(".tmp")
            save_file(state, str(tmp), metadata={"format": "dwmtrain-lm-fp32-v1"})
            follow_umask(tmp)  # safetensors writes 0600
            tmp.replace(self.rd.lm_weights(tag))

    def _log(self, msg: str) -> None:
        if self.d.is_main:
            print(f"[dwmtrain] {msg}", flush=True)

    def _prune(self, keep: str) -> None:
        """Collective: rank 0 picks the periodic checkpoints past ``keep_last``; every node deletes its copy."""
        doomed = None
        if self.d.is_main:
            periodic = [
                t
                for t in self.rd.complete_tags()
                if not (self.keep_stage and json.loads(self.rd.marker(t).read_text()).get("stage_boundary"))
            ]
            doomed = [t for t in periodic[: max(0, len(periodic) - self.keep_last)] if t != keep]
        for t in broadcast_object(doomed):
            if self.d.local_rank == 0:
                shutil.rmtree(self.rd.checkpoint(t), ignore_errors=True)
                shutil.rmtree(self.rd.universal(t), ignore_errors=True)


def _du(path) -> int:
    """Bytes under ``path`` (0 if it is gone)."""
    from pathlib import Path

    total = 0
    for f in Path(path).rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # pruned meanwhile
            pass
    return total


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def convert_to_universal(src, dst) -> str | None:
    """DeepSpeed's ds_to_universal, in this process (its checkpoint reads stay weights_only); None or an error."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    missing = [f for f in ("zero_pp_rank_0_mp_rank_00_model_states.pt",) if not (src / f).is_file()]
    if missing:
        return f"converting {src} for another world size: {', '.join(missing)} not on rank 0's storage"
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )  # fmt: skip
    with safe_torch_load():
        ds_to_universal(args)
    tmp.replace(dst)
    return None


def consolidated_lm_state(rd: RunDir, tag: str) -> dict[str, torch.Tensor]:
    """The LM's full fp32 weights in checkpoint ``tag``: ``lm_fp32.safetensors`` (stage boundaries) when present,
    else DeepSpeed's zero_to_fp32 over every rank's shards (which must then all be on this machine)."""
    if not rd.marker(tag).is_file():
        raise CheckpointError(f"checkpoint {rd.checkpoint(tag)}: not complete (no {rd.marker(tag).name} marker)")
    if rd.lm_weights(tag).is_file():
        from safetensors.torch import load_file

        return load_file(str(rd.lm_weights(tag)))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    world = json.loads(rd.marker(tag).read_text()).get("compat", {}).get("world_size")
    gaps = [f for r in range(world or 1) for f in rd.missing_rank_files(tag, r) if "optim" in f]
    if gaps:  # zero_to_fp32 reads the optimizer shards, where ZeRO-3 keeps the fp32 master weights
        raise CheckpointError(
            f"checkpoint {rd.checkpoint(tag)} has no lm_fp32.safetensors and lacks other ranks' shards here "
            f"({gaps[0]}...): copy every node's part of it to this machine, or use a stage-boundary checkpoint"
        )
    with safe_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(rd.checkpoints), tag=tag)


def gather_fp32_weights(module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Collective: the full fp32 master weights of a ZeRO-3 module, by name, on rank 0 (None elsewhere)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # all-gathers the fp32 partitions (the optimizer's master copy)
        if is_main:
            out[name] = full.detach().to("cpu", torch.float32).contiguous().clone()
    return out if is_main else None
