"""The commit / verify / resume / prune protocol of sharded checkpoints (every method is collective).

Works on a shared filesystem and on node-local storage alike: rank 0 decides what exists (its
``latest.json`` and markers), every rank checks that its own storage holds its part, and a checkpoint is
marked ``COMPLETE`` only once every rank has confirmed its files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import time
from pathlib import Path

import torch

from dwmtrain.checkpoint.compat import check_compatible
from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.checkpoint.state import RunState, read_marker, rng_state, set_rng_state
from dwmtrain.checkpoint.universal import load_universal
from dwmtrain.checkpoint.weights import save_lm_weights
from dwmtrain.distributed import Dist, all_gather_object, barrier, broadcast_object
from dwmtrain.errors import CheckpointError, ResumeError
from dwmtrain.faults import fault_point
from dwmtrain.fileio import atomic_write_text, remove_tree
from dwmtrain.rundir import RunDir, ShardLayout

log = logging.getLogger(__name__)


class Checkpointer:
    """Save / find / resume complete sharded checkpoints of one run."""

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
        self.layout = ShardLayout.of(compat)  # the files each rank writes
        self.keep_last, self.keep_stage = keep_last, keep_stage
        # write lm_fp32.safetensors at stage ends (the meta job's input; export / eval read it without the shards)
        self.boundary_weights = boundary_weights
        self._bytes: int | None = None  # the largest checkpoint on this rank's storage (the free-space check)
        self.last_tag: str | None = None  # the newest complete checkpoint: saved or resumed from

    # ------------------------------------------------------------------ saving

    def save(
        self, engine, *, step: int, stage: int, boundary: bool, dwm: dict, final: bool = False, nonfinite=(0, 0)
    ) -> str:
        """Every rank calls it after ``step`` optimizer steps; returns the tag once it is committed.
        ``nonfinite``: (non-finite steps in all, the consecutive ones ending at ``step``)."""
        state = RunState(
            step=step,
            stage=stage,
            consumed_samples=step * self.global_batch_size,
            stage_boundary=boundary,
            dwm=dwm,
            config_sha256=self.compat.get("config_sha256", ""),
            compat=self.compat,
            skipped_steps=int(getattr(engine, "skipped_steps", 0)),  # DeepSpeed's count: the LR schedule's lag
            nonfinite_steps=nonfinite[0],
            nonfinite_streak=nonfinite[1],
        )
        tag = RunDir.tag(step)
        self._check_space(tag)  # a disk too full for this checkpoint stops the run before a byte is written
        self._clear_leftover(tag)
        self._write_shards(engine, state, tag, weights=(boundary or final) and self.boundary_weights)
        files = self._agree_complete(tag)  # every rank's part is on its storage, or every rank raises
        if self.d.is_main:
            marker = {**state.to_marker(), "saved_at": time.time(), "files": files}
            atomic_write_text(self.rd.marker(tag), json.dumps(marker, indent=1))
            fault_point("checkpoint-marker-written", step=step)
            atomic_write_text(self.rd.latest, json.dumps({"tag": tag, "step": step}))
            atomic_write_text(self.rd.ds_latest, tag)  # DeepSpeed's tools find it without --tag
        self._bytes = max(self._bytes or 0, _du(self.rd.checkpoint(tag)))
        self._prune(keep=tag)
        barrier()
        self.last_tag = tag
        return tag

    def _write_shards(self, engine, state: RunState, tag: str, weights: bool) -> None:
        """This rank's shards and RNG (and, at stage ends, the consolidated weights); a failing disk is said."""
        try:
            engine.save_checkpoint(
                str(self.rd.checkpoints), tag=tag, client_state={"dwmtrain": state.to_marker()}, save_latest=False
            )
            rng = self.rd.rng(tag, self.d.rank)
            rng.parent.mkdir(parents=True, exist_ok=True)
            torch.save(rng_state(), rng)
            fault_point("checkpoint-shards-written", rank=self.d.rank, step=state.step)
            if weights:
                save_lm_weights(engine, self.rd, tag, self.d.is_main)
        except OSError as e:  # the disk filled (or failed) mid-save: this rank says so; the launcher ends the rest
            raise CheckpointError(
                f"saving checkpoint {tag} on {socket.gethostname()} (rank {self.d.rank}): {e}; it is not marked "
                "complete, the newest complete checkpoint is untouched, and a rerun resumes from it"
            ) from None

    def _check_space(self, tag: str) -> None:
        """Every rank compares its storage's free space with the largest checkpoint it holds."""
        if self._bytes is None:  # after a resume: what the checkpoints on this storage take
            self._bytes = max((_du(p) for p in self._tag_dirs()), default=0)
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

    def _agree_complete(self, tag: str) -> dict[str, dict[str, int]]:
        """Every rank reports its part of ``tag`` on its storage; any gap fails all. Returns {rank: {file:
        size}} (what the marker records, for a resume to verify; JSON keys are strings)."""
        parts = all_gather_object(
            (
                socket.gethostname(),
                self.d.rank,
                self.rd.missing_rank_files(tag, self.d.rank, self.layout),
                self.rd.rank_files(tag, self.d.rank, self.layout),
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
        """Before saving ``tag``: an unfinished save of it (no marker) is removed; a complete-marked one that a
        resume skipped as unverifiable is moved to ``checkpoints/unverified/`` on every node."""
        path = self.rd.checkpoint(tag)
        aside = broadcast_object(self.rd.broken_dir(tag) if self.d.is_main and self.rd.marker(tag).is_file() else None)
        if self.d.local_rank == 0:
            shutil.rmtree(self.rd.universal(tag), ignore_errors=True)  # derived from the old one: stale
        if self.d.local_rank == 0 and path.exists():
            if aside is None:
                remove_tree(path)  # on shared storage another node's local rank 0 removes it too
            else:
                aside.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileNotFoundError):  # another node's local rank 0 moved it first
                    path.rename(aside)
                if self.d.is_main:
                    self._log(f"moved the unverifiable checkpoint {path} to {aside} (kept, not deleted)")
        barrier()

    def _prune(self, keep: str) -> None:
        """Rank 0 picks the periodic checkpoints past ``keep_last``; every node deletes its copy. Never pruned:
        stage-boundary checkpoints (``keep_stage``), and the newest checkpoint taken before the run's first
        non-finite step (the last one known good, whatever came after it)."""
        doomed = None
        if self.d.is_main:
            markers = {t: json.loads(self.rd.marker(t).read_text()) for t in self.rd.complete_tags()}
            kept = {keep, *_last_before_nonfinite(markers)}
            periodic = [t for t, m in markers.items() if not (self.keep_stage and m.get("stage_boundary"))]
            doomed = ([t for t in periodic[: max(0, len(periodic) - self.keep_last)] if t not in kept], list(markers))
        doomed, complete = broadcast_object(doomed)
        if self.d.local_rank == 0:
            # and a node's copy of an older checkpoint rank 0 no longer holds: a prune a kill interrupted after rank
            # 0's node deleted its copy (node-local storage) would otherwise leave it on this node for good
            older = [p.name for p in self._tag_dirs() if p.name not in complete and _step(p.name) < _step(keep)]
            for t in [*doomed, *older]:
                shutil.rmtree(self.rd.checkpoint(t), ignore_errors=True)
                shutil.rmtree(self.rd.universal(t), ignore_errors=True)

    # ------------------------------------------------------------------ finding and resuming

    def has_checkpoint(self) -> bool:
        """Collective: whether rank 0's storage holds a complete-marked checkpoint (a start resumes, then)."""
        return broadcast_object(any(p is None for _, _, p in self._candidates()) if self.d.is_main else None)

    def latest(self) -> RunState | None:
        """State of the newest checkpoint whose marker is sound on this storage (no shard checks), or None."""
        return next((state for _, state, problem in self._candidates() if problem is None), None)

    def _tag_dirs(self) -> list[Path]:
        if not self.rd.checkpoints.is_dir():
            return []
        return [p for p in self.rd.checkpoints.iterdir() if RunDir.is_tag(p.name)]

    def _candidates(self) -> list[tuple[str, RunState | None, str | None]]:
        """(tag, state, problem or None) for every checkpoint directory, newest step first.

        The ``COMPLETE`` marker is the commit point: ``latest.json`` is a pointer for people and tools, and
        a checkpoint whose marker exists counts even if a crash came before ``latest.json`` was replaced."""
        out = []
        try:
            named = json.loads(self.rd.latest.read_text())["tag"]
            if not self.rd.checkpoint(named).is_dir():
                out.append((named, None, f"{self.rd.latest.name} names it, but the directory is gone"))
        except (OSError, ValueError, KeyError, TypeError):  # no pointer, or not one: the markers decide
            pass
        for tag in sorted((p.name for p in self._tag_dirs()), reverse=True):
            out.append((tag, *self._read_marker(tag)))
        return out

    def _read_marker(self, tag: str) -> tuple[RunState | None, str | None]:
        m = self.rd.marker(tag)
        if not m.is_file():
            return None, f"no {m.name} marker (a save that did not finish)"
        try:
            state = RunState.read(m)
        except CheckpointError as e:
            return None, f"its {m.name} marker is not sound ({str(e).removeprefix(f'{m}: ')})"
        if RunDir.tag(state.step) != tag:
            return None, f"its {m.name} marker records step {state.step}, not this checkpoint's"
        return state, None

    def _verify(self, state: RunState) -> str | None:
        """What is wrong with ``state``'s checkpoint on any rank's storage (missing or truncated files against
        the sizes its marker records), or None. At another world size, rank 0 checks the saved ranks' files
        (re-sharding needs them on one storage anyway)."""
        tag = state.tag
        saved_world = state.compat["world_size"]
        want = broadcast_object(
            read_marker(self.rd.marker(tag))["files"] if self.d.is_main else None
        )  # {rank: {file: size}}
        layout = ShardLayout.of(state.compat)  # what the save wrote (a changed layout is refused after this)
        if saved_world == self.d.world:
            mine = (socket.gethostname(), self._problems(tag, want, [self.d.rank], layout))
            found = [(h, p) for h, p in all_gather_object(mine) if p]
            where = ""
        else:
            everyone = [(socket.gethostname(), self._problems(tag, want, range(saved_world), layout))]
            found = [(h, p) for h, p in broadcast_object(everyone if self.d.is_main else None) if p]
            where = f" (resuming {saved_world} ranks' save on {self.d.world} reads every part from rank 0's storage)"
        if not found:
            return None
        return "; ".join(f"{', '.join(p)} on {h}" for h, p in found) + where

    def _problems(self, tag: str, want: dict, ranks, layout: ShardLayout) -> list[str]:
        """Missing or resized files of ``ranks``' parts of ``tag`` on this storage."""
        out = []
        for r in ranks:
            have = self.rd.rank_files(tag, r, layout)
            for rel, size in want.get(str(r), {}).items():
                if rel not in have:
                    out.append(f"{rel} is missing")
                elif have[rel] != size:
                    out.append(f"{rel} is {have[rel]:,} bytes, the save wrote {size:,} (truncated or replaced)")
        return out

    def resume(self, engine) -> RunState | None:
        """Restore the newest checkpoint that verifies into ``engine`` (and this rank's RNG).

        Rank 0 lists the checkpoints, newest first; every rank checks its part of each (present, and the
        size the save recorded) until one verifies. Each one skipped is said, with why; none is deleted.
        Refuses (ResumeError) when checkpoints exist but none verifies, and a checkpoint whose compatibility
        fields a change of config broke; returns None for a fresh run.
        """
        state = self._newest_verified()
        if state is None:
            return None
        for note in check_compatible(state.compat, self.compat):
            self._log(f"resume: config changed (allowed): {note}")
        saved_world, saved = state.compat["world_size"], ShardLayout.of(state.compat)
        if saved != self.layout:
            raise ResumeError(
                f"{self.rd.checkpoint(state.tag)} was saved with ZeRO-{saved.zero_stage}, tensor parallelism "
                f"{saved.tp}; this run has ZeRO-{self.layout.zero_stage}, tensor parallelism {self.layout.tp}: set "
                "deepspeed.zero_stage and deepspeed.tensor_parallel_size as the run had them (the checkpoint is kept)"
            )
        if saved_world != self.d.world and saved != ShardLayout():
            raise ResumeError(
                f"{self.rd.checkpoint(state.tag)} was saved by {saved_world} ranks with ZeRO-{saved.zero_stage}"
                + (f" and tensor parallelism {saved.tp}" if saved.tp > 1 else "")
                + f": resuming on {self.d.world} ranks re-shards through DeepSpeed's universal checkpoint, which "
                "dwmtrain does for ZeRO-3 without tensor parallelism only; resume on "
                f"{saved_world} ranks (the checkpoint is kept)"
            )
        if saved_world != self.d.world:  # the ZeRO-3 shards are per rank: re-shard through the universal format
            self._log(
                f"resume: world size {saved_world} -> {self.d.world}: loading {state.tag} as a universal checkpoint"
            )
            load_universal(engine, self.rd, self.d, state.tag)
            self._restore_rng(state.tag)  # a rank that did not exist before keeps its seeded state
        else:
            self.load(engine, state.tag)
        self._log(f"resumed from {self.rd.checkpoint(state.tag)} at step {state.step} (stage {state.stage})")
        fault_point("resume", rank=self.d.rank, step=state.step)
        self.last_tag = state.tag
        return state

    def _newest_verified(self) -> RunState | None:
        """The newest checkpoint every rank's storage holds whole; None for a fresh run, ResumeError if
        checkpoints exist and none verifies."""
        skipped = []
        for tag, cand, problem in broadcast_object(self._candidates() if self.d.is_main else None):
            if problem is None:
                problem = self._verify(cand)
            if problem is None:
                return cand
            skipped.append(f"{tag}: {problem}")
            self._log(f"resume: skipping checkpoint {self.rd.checkpoint(tag)}: {problem}")
        if any(": no COMPLETE marker" not in s for s in skipped):
            where = broadcast_object(str(self.rd.checkpoints))  # rank 0's storage: one message on every rank
            raise ResumeError(f"no checkpoint in {where} verifies (their files are kept): " + "; ".join(skipped))
        return None

    def load(self, engine, tag: str) -> None:
        """Restore engine (model, optimizer, scheduler) and this rank's RNG."""
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
            set_rng_state(torch.load(rng, weights_only=True))

    def _log(self, msg: str) -> None:
        if self.d.is_main:
            log.info(msg)


def _step(tag: str) -> int:
    return int(tag[4:])


def _last_before_nonfinite(markers: dict[str, dict]) -> list[str]:
    """[the newest checkpoint with no non-finite step behind it], when a newer one has some (else [])."""
    clean = [t for t, m in markers.items() if not m.get("nonfinite_steps")]
    later = clean and any(m.get("nonfinite_steps") for t, m in markers.items() if t > clean[-1])
    return [clean[-1]] if later else []


def _du(path) -> int:
    """Bytes under ``path`` (0 if it is gone)."""
    total = 0
    for f in Path(path).rglob("*"):
        try:
            total += f.stat().st_size if f.is_file() else 0
        except FileNotFoundError:  # pruned meanwhile
            pass
    return total


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
