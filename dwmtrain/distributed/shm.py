"""DeepSpeed's shared-memory all-reduce buffers of CPU ranks on one machine: named in /dev/shm, released once
mapped."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist


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
