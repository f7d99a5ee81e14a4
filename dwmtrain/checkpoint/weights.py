"""The LM's consolidated fp32 weights: gathered from the ZeRO-3 partitions at stage boundaries (the meta job's
input), and read back for the meta job, the export and the evaluation."""

from __future__ import annotations

import json

import torch

from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.errors import CheckpointError
from dwmtrain.fileio import atomic_file
from dwmtrain.rundir import RunDir

FORMAT = "dwmtrain-lm-fp32-v1"


def gather_fp32_weights(module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Collective: the full fp32 master weights of a ZeRO-3 module, by name, on rank 0 (None elsewhere)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # all-gathers the fp32 partitions (the optimizer's master copy)
        if is_main:
            out[name] = full.detach().to("cpu", torch.float32).contiguous().clone()
    return out if is_main else None


def save_lm_weights(engine, rd: RunDir, tag: str, is_main: bool) -> None:
    """Collective: gather the fp32 master weights to rank 0, which writes them (safetensors) with the shards."""
    from safetensors.torch import save_file

    state = gather_fp32_weights(engine.module, is_main)
    if is_main:
        with atomic_file(rd.lm_weights(tag)) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})


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
