"""Where a process sits (``Dist``), joining the process group, and the CPU threads a rank uses."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dwmtrain.distributed.group import TIMING
from dwmtrain.distributed.peers import record_host
from dwmtrain.errors import DWMTrainError
from dwmtrain.procs import usable_cpus


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


class RendezvousError(DWMTrainError):
    """The ranks could not meet: the master address does not resolve, or is not reachable in time."""


def skip_cpu_inference_op() -> None:
    """On a CPU, keep ``deepspeed.init_distributed`` from JIT-building its shared-memory all-reduce, which only
    DeepSpeed's inference calls: ~30 s on a machine that never built it, and a process killed mid-build leaves a
    lock file (torch_extensions' FileBaton) that every later launch waits on forever. Training never uses it."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(timeout_s: int) -> Dist:
    """Init torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPU) with a collective timeout."""
    from datetime import timedelta

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    TIMING.poll_s, TIMING.timeout_s = min(5.0, timeout_s / 4), float(timeout_s)
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
        skip_cpu_inference_op()
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
    record_host(rank)  # the roll call names it if it stops answering
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    name = acc.device_name()
    if name == "cpu":
        device = torch.device("cpu")
    else:
        acc.set_device(local_rank)
        device = torch.device(name, local_rank)
    return Dist(rank, world, local_rank, local_world, device, name)


def cpu_threads(threads_per_rank: int, local_world: int) -> int:
    """torch intra-op threads per CPU rank: ``run.threads_per_rank``, or the CPUs the scheduler gave this process
    (``procs.usable_cpus``) shared by the local ranks (an srun task's own ``--cpus-per-task``)."""
    if threads_per_rank:
        return threads_per_rank
    if "SLURM_PROCID" in os.environ and os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, usable_cpus())  # a task of an srun step: its --cpus-per-task are its own
    return max(1, usable_cpus() // max(1, local_world))  # the CPUs this process may use, shared by the node's ranks
