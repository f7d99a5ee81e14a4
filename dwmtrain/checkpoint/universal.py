"""Resuming at another world size: DeepSpeed's universal checkpoint, converted once by rank 0, loaded by all."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.distributed import Dist, all_gather_object, run_on_rank0
from dwmtrain.errors import ResumeError
from dwmtrain.fileio import atomic_dir
from dwmtrain.rundir import RunDir


def convert_to_universal(src: Path, dst: Path) -> str | None:
    """DeepSpeed's ds_to_universal, in this process (its checkpoint reads stay weights_only); None or an error."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    missing = [f for f in ("zero_pp_rank_0_mp_rank_00_model_states.pt",) if not (src / f).is_file()]
    if missing:
        return f"converting {src} for another world size: {', '.join(missing)} not on rank 0's storage"
    with atomic_dir(dst, overwrite=True) as tmp:
        args = argparse.Namespace(
            input_folder=str(src), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
            keep_temp_folder=False, strict=True, inject_missing_state=False,
        )  # fmt: skip
        with safe_torch_load():
            ds_to_universal(args)
    return None


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
