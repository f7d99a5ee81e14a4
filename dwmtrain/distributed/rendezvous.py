"""Rendezvous variables for ranks started by ``mpirun`` or ``srun`` (the deepspeed and torchrun launchers
set them themselves): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.

Each comes from the launcher's own variables (Open MPI's ``OMPI_COMM_WORLD_*``, MPICH/Intel MPI's
``PMI_*``, SLURM's ``SLURM_*``) rather than from DeepSpeed's guesses (the first address of
``hostname -I``, a fixed port 29500). An explicit MASTER_ADDR / MASTER_PORT in the environment wins.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on now (a launch binds it soon after)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def expand_hostlist(spec: str) -> list[str]:
    """SLURM's compressed host list: ``n[01-03,7],gpu5`` -> [n01, n02, n03, n7, gpu5]."""
    hosts, depth, cur = [], 0, ""
    for ch in spec + ",":  # split on commas outside brackets
        if ch == "," and depth == 0:
            if cur:
                hosts.append(cur)
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    out = []
    for h in hosts:
        m = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", h)
        if not m:
            out.append(h)
            continue
        pre, ranges, post = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                out.append(f"{pre}{i:0{len(lo)}d}{post}")
    return out


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE (``2(x3),1``) -> the task count of node ``node_id``."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot read SLURM tasks per node {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id]


def slurm_port(job_id: str, step_id: str = "0") -> int:
    """A port per job step in 20000..39999, the same on every node (two jobs on a node do not collide)."""
    return 20000 + (int(job_id) * 16 + int(step_id or 0)) % 20000


def rendezvous_env(env: Mapping[str, str], bcast=None) -> dict[str, str]:
    """The variables to set for this rank; {} where a torch/deepspeed launcher already set them.

    ``bcast(value)`` sends rank 0's value to every rank (MPI only, to agree on an address and a free
    port when none is given); it defaults to mpi4py's.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return {}
    if "OMPI_COMM_WORLD_RANK" in env:  # Open MPI's mpirun
        rank, world = env["OMPI_COMM_WORLD_RANK"], env["OMPI_COMM_WORLD_SIZE"]
        local, local_world = env["OMPI_COMM_WORLD_LOCAL_RANK"], env["OMPI_COMM_WORLD_LOCAL_SIZE"]
    elif "PMI_RANK" in env and "MPI_LOCALRANKID" in env:  # MPICH / Intel MPI
        rank, world = env["PMI_RANK"], env["PMI_SIZE"]
        local, local_world = env["MPI_LOCALRANKID"], env["MPI_LOCALNRANKS"]
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step
        out = {
            "RANK": env["SLURM_PROCID"],
            "WORLD_SIZE": env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")),
            "LOCAL_RANK": env["SLURM_LOCALID"],
            "LOCAL_WORLD_SIZE": str(
                tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"), int(env.get("SLURM_NODEID", 0)))
            ),
        }
        nodes = expand_hostlist(env.get("SLURM_STEP_NODELIST", env.get("SLURM_JOB_NODELIST", "localhost")))
        single = len(nodes) == 1
        out["MASTER_ADDR"] = env.get("MASTER_ADDR") or (LOOPBACK if single else nodes[0])
        out["MASTER_PORT"] = env.get("MASTER_PORT") or str(slurm_port(env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]))
        return out
    else:
        return {}
    out = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": local_world}
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return {**out, "MASTER_ADDR": env["MASTER_ADDR"], "MASTER_PORT": env["MASTER_PORT"]}
    if bcast is None:
        from mpi4py import MPI  # the 'mpi' extra: pip install 'dwmtrain[mpi]'

        bcast = MPI.COMM_WORLD.bcast
    single = local_world == world
    mine = None
    if rank == "0":  # rank 0 offers its address and a port free on it
        addr = env.get("MASTER_ADDR") or (LOOPBACK if single else socket.getfqdn())
        mine = (addr, free_port(LOOPBACK if single else ""))
    addr, port = bcast(mine)
    return {**out, "MASTER_ADDR": addr, "MASTER_PORT": env.get("MASTER_PORT") or str(port)}
