"""The collectives the run needs: each is a no-op (or the identity) outside a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dwmtrain.distributed.group import TIMING
from dwmtrain.errors import DWMTrainError, PlannedStop
from dwmtrain.faults import fault_point


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
    for i, (k, shape, dt) in enumerate(spec):
        if dist.is_initialized() and dist.get_rank() != src:
            t = torch.empty(shape, dtype=getattr(torch, dt), device=device)
        else:
            t = state[k].to(device).contiguous()
        if dist.is_initialized():
            dist.broadcast(t, src=src)
            fault_point("tensor-broadcast", rank=dist.get_rank(), index=i)
        out[k] = t
    return out


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-d ``t``, stacked in rank order: [world, n] (a small vector: one exchange however many
    reductions the caller then takes of it)."""
    if not dist.is_initialized():
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


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


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (small metadata only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_rank0(fn, poll_s: float | None = None):
    """Rank 0 runs ``fn()``; every rank gets its result (or its exception, as ``RankZeroError``).

    While ``fn`` runs (a meta job, a data preparation: minutes to hours), rank 0 sends a small broadcast
    every ``poll_s`` seconds, so no collective ever waits longer than that: ``run.dist_timeout_s`` can
    stay minutes and still catch a dead or hung rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    poll_s = poll_s or TIMING.poll_s
    if dist.get_rank() != 0:
        while (msg := broadcast_object(None))[0] == "running":
            pass
    else:
        import threading

        box: list = []

        def work():
            try:
                box.append(("ok", fn()))
            except BaseException as e:  # noqa: BLE001 - whatever happens on rank 0 must reach every rank
                box.append(("error", e))

        t = threading.Thread(target=work, name="dwmtrain-rank0-work", daemon=True)
        t.start()
        while t.is_alive():
            t.join(poll_s)
            if t.is_alive():
                broadcast_object(("running", None))
        msg = broadcast_object(box[0] if box[0][0] == "ok" else ("error", _portable(box[0][1])))
        if box[0][0] == "error":
            raise box[0][1]
    if msg[0] == "error":
        raise msg[1]
    return msg[1]


class RankZeroError(RuntimeError):
    """An unexpected failure of work done on rank 0 (its traceback is on rank 0)."""


def _portable(e: BaseException) -> BaseException:
    """The exception as other ranks can unpickle it: the project's own errors and stops as they are, others
    wrapped."""
    if isinstance(e, (DWMTrainError, PlannedStop)):
        return e
    return RankZeroError(f"rank 0 failed: {type(e).__name__}: {e}")
