"""Rank helpers and the collectives the run needs (no model code here, and no rank logic in models)."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dwmtrain.errors import DWMTrainError, PlannedStop
from dwmtrain.faults import fault_point
from dwmtrain.procs import alive, usable_cpus


@dataclass(frozen=True)
class Dist:
    """Where this process sits."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    accelerator: str  # "cuda" | "cpu" | ...
    #: ranks per tensor-parallel group: consecutive global ranks (DeepSpeed's (data, tensor) mesh), which see the
    #: same micro-batches; the data order, validation shards and checkpoint names follow the data-parallel rank
    tp: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_world(self) -> int:
        return self.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def init_distributed(timeout_s: int) -> Dist:
    """Init torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) with a collective timeout."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    global _POLL_S, _TIMEOUT_S
    _POLL_S, _TIMEOUT_S = min(5.0, timeout_s / 4), float(timeout_s)
    acc = get_accelerator()
    if not dist.is_initialized():
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        if os.environ.get("MASTER_ADDR"):
            try:
                socket.getaddrinfo(os.environ["MASTER_ADDR"], None)
            except socket.gaierror as e:
                raise RendezvousError(
                    f"MASTER_ADDR={os.environ['MASTER_ADDR']}: the name does not resolve ({e})"
                ) from None
        try:
            deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, TimeoutError, OSError) as e:  # DistStoreError / connection errors of the rendezvous
            me = os.environ.get("RANK")
            who = ("a rank did not arrive (not started, or stopped answering)" if me == "0" else
                   "rank 0 (which hosts the rendezvous store) is not up there or stopped answering")  # fmt: skip
            raise RendezvousError(
                f"rank {me} of {os.environ.get('WORLD_SIZE')} could not join the process group at {where} within "
                f"run.dist_timeout_s={timeout_s}: {type(e).__name__}: {str(e).splitlines()[0]}; {who}"
            ) from None
    rank, world = dist.get_rank(), dist.get_world_size()
    _store_set(f"{_ROLL}/host/{rank}", f"{socket.gethostname()}, pid {os.getpid()}")  # named if it stops answering
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    name = acc.device_name()
    if name == "cpu":
        device = torch.device("cpu")
        release_shm_names(rank)
    else:
        acc.set_device(local_rank)
        device = torch.device(name, local_rank)
    return Dist(rank, world, local_rank, local_world, device, name)


def shm_buffer_path(rank: int) -> Path:
    """DeepSpeed's shared-memory all-reduce buffer of ``rank`` (CPU runs whose ranks are all on one machine)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names(rank: int) -> None:
    """Collective. DeepSpeed's CPU all-reduce creates one 66 MB /dev/shm buffer per rank and never removes it:
    every CPU run leaked them (memory-backed) until a reboot. Once every rank has mapped its peers' buffers
    (``init_distributed`` returned everywhere: the barrier), the names can go; the memory stays mapped and is
    freed when the last rank exits, however it exits."""
    if int(os.environ.get("LOCAL_SIZE", "0")) == dist.get_world_size():  # DeepSpeed's own test, on every rank
        dist.barrier()
        shm_buffer_path(rank).unlink(missing_ok=True)


class RendezvousError(DWMTrainError):
    """The ranks could not meet: the master address does not resolve, or is not reachable in time."""


class PeerLost(DWMTrainError):
    """A collective failed: a rank died, or stopped answering for longer than ``run.dist_timeout_s``."""

    hint = "rerun the same command: it resumes from the newest complete checkpoint"

    def __init__(self, message: str = "", quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet  #: another rank says it: this one leaves without a word


_ROLL = "dwmtrain/peers"  # store keys: each rank's host and pid (at init), then who answered the roll call
#: what gloo, NCCL and the store say when a peer is gone or silent (a collective's own errors say otherwise)
_COMM_FAILURES = ("timed out", "timeout", "connection closed by peer", "connection reset by peer", "broken pipe",
                  "connection refused", "nccl error", "ncclremoteerror", "socket")  # fmt: skip


def _store_set(key: str, value: str) -> None:
    try:
        dist.distributed_c10d._get_default_store().set(key, value)
    except Exception:  # noqa: BLE001 - the names are a courtesy for a later message; never fail the start
        pass


def _store_get(store, key: str) -> str:
    """The value of ``key``, or "" when no rank recorded it (the rank number alone is then named). A store that
    does not answer raises (its host, rank 0, is stopped): a get would wait its timeout, and once timed out the
    client can wait on for good (``peer_lost`` bounds the whole roll call)."""
    return store.get(key).decode() if store.check([key]) else ""


def _exited_here(name: str) -> bool:
    """Whether ``name`` (``"HOST, pid N"``) is a process on this host that has exited (gone, or a zombie its
    launcher has not reaped): a rank killed next to us need not be waited for."""
    host, _, pid = name.partition(", pid ")
    if host != socket.gethostname() or not pid.isdigit() or not os.path.isdir("/proc"):
        return False
    return not alive(int(pid))  # gone, or a zombie


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a communication failure (a peer died or went silent), not an error of the collective's
    own arguments."""
    if isinstance(e, getattr(dist, "DistNetworkError", ())) or isinstance(e, TimeoutError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _COMM_FAILURES)


def peer_lost(e: BaseException, timeout_s: float | None = None, window_s: float | None = None) -> PeerLost | None:
    """After a failed collective: a roll call over the rendezvous store names the ranks that do not answer within
    ``window_s`` (default ``min(timeout_s, 20)``: the live ranks all time out within about that of each other),
    with their hosts and pids. Returns the error, ``quiet`` on every rank but the lowest that answered, or
    ``None`` when ``e`` is not a communication failure (the caller re-raises it). Rank 0 hosts the store: if it
    does not answer (an error, or no end of the roll call 10 s after its window: a client of a stopped store can
    wait on past its own timeout), each node's first rank (and rank 1) says so."""
    if not dist.is_initialized() or not is_peer_failure(e):
        return None
    rank = dist.get_rank()
    timeout_s = _TIMEOUT_S if timeout_s is None else timeout_s  # the group's own (init_distributed)
    window_s = min(timeout_s, 20.0) if window_s is None else window_s
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]  # gloo's "[.../unbound_buffer.cc:78] " source location
    said = f"a collective on rank {rank} failed ({first}; run.dist_timeout_s={timeout_s:g})"
    box: list = []

    def call() -> None:
        try:
            box.append(_roll_call(rank, dist.get_world_size(), window_s, said))
        except Exception:  # noqa: BLE001 - the store is rank 0's: it is gone or stopped too
            pass

    caller = threading.Thread(target=call, name="roll-call", daemon=True)  # the caller leaves at once after
    caller.start()
    caller.join(window_s + 10)  # the roll call's own wait is the window; a live store answers at once
    if box:
        return box[0]
    quiet = int(os.environ.get("LOCAL_RANK", "0")) != 0 and rank != 1  # each node's first rank, and rank 1
    return PeerLost(f"rank 0 (which hosts the rendezvous store) stopped answering: {said}", quiet=quiet)


def _roll_call(rank: int, world: int, window_s: float, said: str) -> PeerLost:
    """Answer the roll call and wait until every rank has, the window closes, or every silent rank is a process
    on this host that has exited; the lowest rank that answered names the silent ones."""
    from datetime import timedelta

    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=max(window_s, 1.0)))
    store.set(f"{_ROLL}/here/{rank}", "1")
    names = {r: _store_get(store, f"{_ROLL}/host/{r}") for r in range(world)}
    deadline = time.monotonic() + window_s
    while True:
        here = [r for r in range(world) if store.check([f"{_ROLL}/here/{r}"])]
        gone = [r for r in range(world) if r not in here]
        exited = all(_exited_here(names[r]) for r in gone)
        if not gone or time.monotonic() > deadline or exited:
            break
        time.sleep(0.25)
    if rank != min(here):
        return PeerLost(quiet=True)
    if not gone:
        return PeerLost(f"{said}; every rank answered the roll call afterwards")
    named = ", ".join(f"rank {r} ({names[r]})" if names[r] else f"rank {r}" for r in gone)
    return PeerLost(f"{named} {'exited' if exited else 'stopped answering'}: {said}")


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
    """torch intra-op threads per CPU rank: ``run.threads_per_rank``, or the CPUs the scheduler gave this process
    (``procs.usable_cpus``) shared by the local ranks (an srun task's own ``--cpus-per-task``)."""
    if threads_per_rank:
        return threads_per_rank
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, usable_cpus())  # a task of an srun step: its --cpus-per-task are its own
    return max(1, usable_cpus() // max(1, local_world))  # the CPUs this process may use, shared by the node's ranks


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (small metadata only)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


_TIMEOUT_S = 1800.0  #: the process group's collective timeout (init_distributed sets it)
_POLL_S = 5.0  # run_on_rank0's keep-alive interval: well inside the collective timeout (init_distributed)


def run_on_rank0(fn, poll_s: float | None = None):
    """Rank 0 runs ``fn()``; every rank gets its result (or its exception, as ``RankZeroError``).

    While ``fn`` runs (a meta job, a data preparation: minutes to hours), rank 0 sends a small broadcast
    every ``poll_s`` seconds, so no collective ever waits longer than that: ``run.dist_timeout_s`` can
    stay minutes and still catch a dead or hung rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    poll_s = poll_s or _POLL_S
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
