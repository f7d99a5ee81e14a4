"""Rank helpers and the collectives the run needs (no model code here, and no rank logic in models)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """Where this process sits."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    accelerator: str  # "cuda" | "cpu" | ...

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int) -> Dist:
    """Init torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) with a collective timeout."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    name = acc.device_name()
    if name == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(name, local_rank)
    return Dist(rank, world, local_rank, local_world, device, name)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from ``src`` to every rank (small metadata only)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensors(state: dict[str, torch.Tensor] | None, device: torch.device, src: int = 0):
    """Send a state dict from ``src`` over torch.distributed; other ranks need no shared filesystem."""
    spec = None
    if not dist.is_initialized() or dist.get_rank() == src:
        spec = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()]
    spec = broadcast_object(spec, src)
    out = {}
    for k, shape, dt in spec:
        if dist.is_initialized() and dist.get_rank() != src:
            t = torch.empty(shape, dtype=getattr(torch, dt), device=device)
        else:
            t = state[k].to(device).contiguous()
        if dist.is_initialized():
            dist.broadcast(t, src=src)
        out[k] = t
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_reduce_grads(params: list[torch.Tensor]) -> float:
    """Average the ``.grad`` of ``params`` over all ranks (one flat all-reduce); returns the global grad norm."""
    flat = torch.cat([p.grad.flatten() for p in params])
    if dist.is_initialized():
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
    off = 0
    for p in params:
        p.grad.copy_(flat[off : off + p.numel()].view_as(p))
        off += p.numel()
    return flat.norm().item()


def cpu_threads(threads_per_rank: int, local_world: int) -> int:
    """torch intra-op threads per CPU rank: ``run.threads_per_rank``, or the cores shared by the local ranks."""
    return threads_per_rank or max(1, (os.cpu_count() or 1) // max(1, local_world))


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (small metadata only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
