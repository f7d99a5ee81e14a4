"""The LM's consolidated fp32 weights: gathered from the ZeRO partitions and the tensor-parallel slices at stage
boundaries (the meta job's input), and read back for the meta job, the export and the evaluation."""

from __future__ import annotations

import torch

from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.checkpoint.state import read_marker
from dwmtrain.errors import CheckpointError
from dwmtrain.fileio import atomic_file
from dwmtrain.rundir import RunDir, ShardLayout

FORMAT = "dwmtrain-lm-fp32-v1"


def gather_fp32_weights(module, is_main: bool) -> dict[str, torch.Tensor] | None:
    """Collective: the full fp32 master weights of a DeepSpeed engine's module, by name, on rank 0 (None
    elsewhere): ZeRO's partitions gathered, then AutoTP's slices."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)  # all-gathers the fp32 partitions (the optimizer's master copy)
        full = _join_tensor_parallel_slices(module.get_submodule(name.rpartition(".")[0]), p, full)
        if is_main:
            out[name] = full.detach().to("cpu", torch.float32).contiguous().clone()
    return out if is_main else None


def _join_tensor_parallel_slices(owner, p, value: torch.Tensor) -> torch.Tensor:
    """Collective over ``owner``'s tensor-parallel group: the whole ``p`` from every rank's slice ``value`` when
    AutoTP split ``owner`` (column-parallel: rows, bias too; row-parallel: the weight's columns), else ``value``."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, TensorParallel_Layer

    if isinstance(owner, LinearAllreduce):
        dim = 1 if p is owner.weight else None  # the row-parallel bias is whole on every rank
    elif isinstance(owner, LinearLayer):
        dim = 0
    elif isinstance(owner, TensorParallel_Layer):  # a split dwmtrain does not configure (config.deepspeed)
        raise CheckpointError(f"{type(owner).__name__}: an AutoTP layer whose slices dwmtrain cannot join")
    else:
        dim = None
    if dim is None or getattr(owner, "mp_group", None) is None:
        return value
    return owner._all_gather_shards(value, owner._partition_sizes, dim)  # AutoTP's own reassembly (uneven splits)


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

    compat = read_marker(rd.marker(tag)).get("compat", {})
    world, layout = compat.get("world_size"), ShardLayout.of(compat)
    if layout.tp > 1:  # zero_to_fp32 reads ZeRO's partitions, not AutoTP's slices
        raise CheckpointError(
            f"checkpoint {rd.checkpoint(tag)} (tensor parallelism {layout.tp}) has no lm_fp32.safetensors: only "
            "stage-boundary and final checkpoints hold the whole LM; use one of them"
        )
    # zero_to_fp32 reads every rank's optimizer shard (where ZeRO keeps the fp32 master weights) and model states
    gaps = [f for r in range(world or 1) for f in rd.missing_rank_files(tag, r, layout) if "/rng/" not in f]
    if gaps:
        raise CheckpointError(
            f"checkpoint {rd.checkpoint(tag)} has no lm_fp32.safetensors and lacks other ranks' shards here "
            f"({gaps[0]}...): copy every node's part of it to this machine, or use a stage-boundary checkpoint"
        )
    with safe_torch_load():
        return get_fp32_state_dict_from_zero_checkpoint(str(rd.checkpoints), tag=tag)
