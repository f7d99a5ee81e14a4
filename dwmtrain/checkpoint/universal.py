"""Resuming at another world size: DeepSpeed's universal checkpoint, converted once by rank 0, loaded by all."""

from __future__ import annotations

import argparse
import math
import socket
import subprocess
import sys
from pathlib import Path

import torch

from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.distributed import Dist, all_gather_object, run_on_rank0
from dwmtrain.errors import ResumeError
from dwmtrain.fileio import atomic_dir
from dwmtrain.procs import host_memory, usable_cpus
from dwmtrain.rundir import RunDir


def conversion_workers(src: Path) -> int:
    """ds_to_universal's extract and merge worker processes: this machine's cores, at most 8, and no more than
    half the available memory holds (each extract worker loads one rank's optimizer file whole)."""
    cores = usable_cpus()
    shard = max((p.stat().st_size for p in src.glob("*optim_states.pt")), default=0)
    return max(1, min(8, cores, ((host_memory("MemAvailable") or 2**62) // 2) // max(2 * shard, 1)))


def convert_to_universal(src: Path, dst: Path, workers: int = 0, timeout_s: float = 6 * 3600) -> str | None:
    """DeepSpeed's ds_to_universal with ``workers`` extract/merge processes (0: ``conversion_workers()``), in a
    fresh Python process (its workers fork from a process without the trainer's threads), its checkpoint reads
    kept weights_only; None or an error."""
    missing = [f for f in ("zero_pp_rank_0_mp_rank_00_model_states.pt",) if not (src / f).is_file()]
    if missing:
        return f"converting {src} for another world size: {', '.join(missing)} not on rank 0's storage"
    workers = workers or conversion_workers(src)
    try:
        with atomic_dir(dst, overwrite=True) as tmp:  # a failed conversion leaves nothing behind
            try:
                p = subprocess.run([sys.executable, "-m", __name__, str(src), str(tmp), str(workers)],
                                   capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
            except subprocess.TimeoutExpired:
                raise ResumeError(f"still running after {timeout_s:.0f} s; stopped") from None
            if p.returncode != 0:
                tail = " ".join((p.stderr or p.stdout).strip().splitlines()[-3:])[:500]
                raise ResumeError(f"exit code {p.returncode}: {tail or 'no output (killed for memory?)'}")
    except ResumeError as e:
        return f"converting {src} for another world size (ds_to_universal, {workers} workers) failed: {e}"
    return None


def _convert(src: str, dst: str, workers: int) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = argparse.Namespace(
        input_folder=src, output_folder=dst, num_extract_workers=workers, num_merge_workers=workers,
        keep_temp_folder=False, strict=True, inject_missing_state=False,
    )  # fmt: skip
    with safe_torch_load():
        ds_to_universal(args)


def load_universal(engine, rd: RunDir, d: Dist, tag: str) -> None:
    """Collective: rank 0 converts ``tag`` with DeepSpeed's ds_to_universal (once), every rank loads its new
    partition of the weights and optimizer state from it. Needs the converted checkpoint on storage every rank
    sees (a shared filesystem)."""
    uni = rd.universal(tag)
    if not run_on_rank0(uni.is_dir):
        err = run_on_rank0(lambda: convert_to_universal(rd.checkpoint(tag), uni))
        if err:
            raise ResumeError(err)
    seen = all_gather_object((socket.gethostname(), d.rank, (uni / "zero" / "optimizer_state.pt").is_file()))
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


def read_adam_state(uni: Path, shapes: dict[str, tuple[int, ...]]) -> dict:
    """From a universal checkpoint ``uni``: AdamW's moments of every parameter named in ``shapes`` ({"exp_avg":
    {name: tensor}, "exp_avg_sq": {...}} in fp32, reshaped), the steps it has taken and its param group's
    hyperparameters (lr, betas, eps, weight_decay). Each file is read with weights_only; the common state is
    memory-mapped (it also holds rank 0's flat partition, which is not needed)."""
    common = uni / "zero" / "optimizer_state.pt"
    if not common.is_file():
        raise ResumeError(f"{common}: missing (not a universal checkpoint?)")
    with safe_torch_load():
        opt = torch.load(common, map_location="cpu", mmap=True)
    state, group = opt["optimizer_state_dict"]["state"], opt["optimizer_state_dict"]["param_groups"][0]
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    if len(steps) != 1:
        raise ResumeError(f"{common}: no single optimizer step count ({sorted(steps) or 'none'})")
    out: dict = {"exp_avg": {}, "exp_avg_sq": {}, "step": steps.pop()}
    out.update({k: group[k] for k in ("lr", "eps", "weight_decay")}, betas=tuple(group["betas"]))
    for name, shape in shapes.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            f = uni / "zero" / name / f"{moment}.pt"
            if not f.is_file():
                raise ResumeError(f"{f}: missing: the checkpoint has no optimizer state for {name}")
            t = torch.load(f, map_location="cpu", weights_only=True)
            if t.numel() != math.prod(shape):
                raise ResumeError(f"{f}: {t.numel()} values for a parameter of shape {tuple(shape)}")
            out[moment][name] = t.float().reshape(shape)
    return out


if __name__ == "__main__":  # convert_to_universal's worker: SRC DST WORKERS
    _convert(sys.argv[1], sys.argv[2], int(sys.argv[3]))
