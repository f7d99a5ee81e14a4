"""Run a plain function on N local ranks (gloo, CPU) in spawned processes: fast distributed unit tests.

As OLMo-core's ``run_distributed_test``: ``run_distributed(fn, *args, world_size=2)`` starts the ranks,
initializes a gloo process group on a free loopback port, calls ``fn(d, *args)`` with the rank's ``Dist``
and returns every rank's return value (rank order). An exception on any rank fails the test with that
rank's traceback; a hang is killed at ``timeout`` seconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dwmtrain.entry import exit_process
from dwmtrain.log import setup_logging

from .helpers import free_port


def _rank_main(rank: int, fn, world: int, port: int, out: str, args: tuple) -> None:
    from dwmtrain.distributed import Dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    setup_logging("[dwmtrain]", rank)  # as the entry points do: rank 0 says what the run says
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        result = fn(Dist(rank, world, rank, world, torch.device("cpu"), "cpu"), *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
        dist.barrier()  # every rank done before any leaves: none still exchanges with one that has gone
    finally:
        dist.destroy_process_group()
    exit_process(0)  # the result is on disk: the package's one exit (no native teardown at exit: dwmtrain.entry)


def run_distributed(fn, *args, world_size: int = 2, timeout: float = 120) -> list:
    """``fn(d, *args)`` on ``world_size`` gloo ranks; returns the ranks' results. ``fn`` must be importable."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(
            _rank_main,
            args=(fn, world_size, free_port(), out, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
                if time.monotonic() > deadline:
                    raise AssertionError(f"distributed test {fn.__name__} still running after {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
