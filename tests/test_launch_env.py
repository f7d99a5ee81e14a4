"""Rendezvous variables for mpirun / srun ranks, from the launchers' own environment (pure)."""

import pytest

from dwmtrain.distributed.rendezvous import LOOPBACK, expand_hostlist, rendezvous_env, slurm_port, tasks_on_node


def test_hostlists_and_tasks_per_node():
    assert expand_hostlist("n[01-03,7],gpu5") == ["n01", "n02", "n03", "n7", "gpu5"]
    assert expand_hostlist("a-b[9-10]x") == ["a-b9x", "a-b10x"]
    assert expand_hostlist("localhost") == ["localhost"]
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(ValueError):
        tasks_on_node("two", 0)


def test_a_torch_or_deepspeed_launcher_already_set_them():
    assert rendezvous_env({"RANK": "0", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}) == {}
    assert rendezvous_env({}) == {}


def test_open_mpi_on_one_node_agrees_on_loopback_and_a_free_port():
    sent = []

    def bcast(v):  # rank 0's value reaches every rank
        sent.append(v)
        return v

    env = {
        f"OMPI_COMM_WORLD_{k}": v for k, v in (("RANK", "0"), ("SIZE", "2"), ("LOCAL_RANK", "0"), ("LOCAL_SIZE", "2"))
    }
    out = rendezvous_env(env, bcast)
    assert out["MASTER_ADDR"] == LOOPBACK and 0 < int(out["MASTER_PORT"]) < 65536
    assert (out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"], out["LOCAL_WORLD_SIZE"]) == ("0", "2", "0", "2")
    other = {**env, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert rendezvous_env(other, lambda v: sent[0])["MASTER_PORT"] == out["MASTER_PORT"]  # rank 1 offers nothing


def test_open_mpi_across_nodes_uses_the_given_master():
    env = {
        "OMPI_COMM_WORLD_RANK": "5",
        "OMPI_COMM_WORLD_SIZE": "16",
        "OMPI_COMM_WORLD_LOCAL_RANK": "5",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "8",
        "MASTER_ADDR": "node001-ib",
        "MASTER_PORT": "31000",
    }
    out = rendezvous_env(env, bcast=lambda v: pytest.fail("no broadcast needed"))
    assert out == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "node001-ib",
        "MASTER_PORT": "31000",
    }


def test_srun_task_on_the_second_node():
    env = {
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "1234",
        "SLURM_STEP_ID": "0",
    }
    out = rendezvous_env(env)
    assert out == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(slurm_port("1234", "0")),
    }
    assert slurm_port("1234", "1") != slurm_port("1234", "0") != slurm_port("1235", "0")
    assert rendezvous_env({**env, "SLURM_STEP_NODELIST": "n1"})["MASTER_ADDR"] == LOOPBACK
    assert "SLURM_PROCID" in env and rendezvous_env({k: v for k, v in env.items() if k != "SLURM_STEP_ID"}) == {}


def test_worker_and_thread_counts_follow_the_cpus_the_scheduler_gave(monkeypatch):
    """The process's affinity (cgroups, taskset, srun's binding), capped by SLURM's allocation, not the machine's
    core count; an srun task's --cpus-per-task are its own threads."""
    import os

    from dwmtrain.distributed import cpu_threads
    from dwmtrain.procs import usable_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    assert usable_cpus() == 12 and cpu_threads(0, 4) == 3 and cpu_threads(5, 4) == 5
    assert usable_cpus({"SLURM_CPUS_ON_NODE": "8"}) == 8 and usable_cpus({"SLURM_CPUS_PER_TASK": "32"}) == 12
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "8")
    assert cpu_threads(0, 4) == 2  # a batch step's 8 CPUs shared by 4 local ranks (torchrun inside sbatch)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert cpu_threads(0, 4) == 6  # a task of an srun step: its own --cpus-per-task
