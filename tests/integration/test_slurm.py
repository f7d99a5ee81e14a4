"""SLURM as documented, on a real two-node cluster (two slurmd on this host): the stage pipeline with srun
tasks on both nodes, and a stage job stopped by the time-limit signal that requeues and continues."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO, by_step, pretrain_cmd, run, short_run
from .services import start

pytestmark = pytest.mark.slow
SLURM = REPO / "launchers" / "slurm"


@pytest.fixture(scope="module")
def slurm():
    start("slurm.sh")


def job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(JobState|ExitCode|Restarts)=(\S+)", out))


def wait_jobs(jobs: list[str], timeout: float = 600) -> dict[str, dict]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        states = {j: job_state(j) for j in jobs}
        if all(
            s.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") for s in states.values()
        ):
            return states
        time.sleep(2)
    subprocess.run(["scancel", *jobs])
    raise AssertionError(f"SLURM jobs still running after {timeout} s: {states}")


def slurm_env() -> dict:
    return dict(os.environ, DWMTRAIN_PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_pipeline_of_three_stages_on_two_nodes_equals_an_uninterrupted_run(slurm, tmp_path, data64):
    args = short_run(data64, "meta.mode=bilevel", "meta.nproc=2", "meta.steps=3", "run.threads_per_rank=1")
    ref, chained = tmp_path / "ref", tmp_path / "chained"
    run(pretrain_cmd(ref, args))  # meta.launch=local, deepspeed launcher
    p = subprocess.run(["bash", str(SLURM / "pipeline.sh"), "--train", "--nodes=2 --ntasks-per-node=1", "tiny",
                        str(chained), *args], env=slurm_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    jobs = re.search(r"submitted 5 jobs: (\S+)", p.stdout).group(1).split(",")
    assert "scancel " + ",".join(jobs) in p.stdout  # how to cancel the chain
    states = wait_jobs(jobs)
    logs = "\n".join(f.read_text() for f in sorted((chained / "slurm").glob("*.out")))
    assert all(s["JobState"] == "COMPLETED" and s["ExitCode"] == "0:0" for s in states.values()), (states, logs[-4000:])
    assert logs.count("planned stop at a stage boundary") == 2 and "n[1-2]: 2 tasks" in logs
    a, b = by_step(ref / "metrics.jsonl"), by_step(chained / "metrics.jsonl")
    assert sorted(b) == list(range(1, 13))
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]
    assert [b[s]["dwm"] for s in (5, 9)] == [a[s]["dwm"] for s in (5, 9)]  # the same DWM files (sha256)


def test_a_stage_job_sent_the_time_limit_signal_requeues_and_continues(slurm, tmp_path, data64):
    args = short_run(data64, "meta.mode=none", "stages.total_steps=40", "run.checkpoint_every=100",
                     "run.threads_per_rank=1")  # fmt: skip
    ref, job_dir = tmp_path / "ref", tmp_path / "job"
    run(pretrain_cmd(ref, args))
    job_dir.mkdir()
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={job_dir}/%j.out",
                          str(SLURM / "pretrain.sbatch"), "tiny", str(job_dir / "run"), *args],
                         env=slurm_env(), capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    metrics = job_dir / "run" / "metrics.jsonl"
    t0 = time.time()
    while len(by_step(metrics)) < 3:  # SIGUSR1 as SLURM's --signal sends it before the limit
        assert time.time() - t0 < 300 and job_state(job).get("JobState") in ("PENDING", "RUNNING"), job_state(job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = wait_jobs([job])[job]
    log = Path(job_dir / f"{job}.out").read_text()
    assert (state["JobState"], state["ExitCode"], state["Restarts"]) == ("COMPLETED", "0:0", "1"), (state, log[-3000:])
    stop = int(re.search(r"stopped at step (\d+) on SIGUSR1", log).group(1))
    assert 3 <= stop < 40 and f"resumed from {job_dir / 'run' / 'checkpoints'}/step{stop:07d}" in log
    a, b = by_step(ref / "metrics.jsonl"), by_step(metrics)
    assert sorted(b) == list(range(1, 41))
    assert [b[s]["loss"] for s in range(1, 41)] == [a[s]["loss"] for s in range(1, 41)]
