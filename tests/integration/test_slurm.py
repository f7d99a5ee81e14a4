"""SLURM as documented, on a real two-node cluster (two slurmd on this host): the stage pipeline with srun
tasks on both nodes, and a stage job stopped by the time-limit signal that requeues and continues."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO, by_step, pretrain_cmd, run, short_run
from .services import start

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one job at a time on the two-node cluster
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


def test_a_meta_job_over_two_nodes_fits_the_dwm_of_one_node_with_as_many_processes(slurm, tmp_path, bilevel_reference):
    """meta.nodes=2, meta.nproc=1 against the reference's meta jobs of 1 node x 2 processes (launch=local under
    the deepspeed launcher): the same world, the same DWM files. External: the stage-2 boundary's job as its own
    2-node SLURM job; local: a 2-node training job whose rank 0 starts each meta job as an srun step of both nodes."""
    ref, args = bilevel_reference
    want = {k: json.loads((ref / "dwm" / f"stage{k}.safetensors.json").read_text())["sha256"] for k in (2, 3)}

    ext = tmp_path / "external"
    shutil.copytree(ref, ext, ignore=shutil.ignore_patterns("stage2.safetensors*", "stage3.safetensors*"))
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", f"--output={tmp_path}/meta-%j.out",
                          str(SLURM / "meta_update.sbatch"), str(ext), "2", "step0000004"],
                         env={**slurm_env(), "DWMTRAIN_META_NPROC": "1"}, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    state, log = wait_jobs([job])[job], (tmp_path / f"meta-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", (state, log[-3000:])
    assert "1 processes x 2 nodes" in log and "meta-steps x 2 proc" in log
    got = json.loads((ext / "dwm" / "stage2.safetensors.json").read_text())
    assert (got["sha256"], got["world_size"]) == (want[2], 2)

    local = tmp_path / "local"
    local.mkdir()
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={local}/%j.out",
                          str(SLURM / "pretrain.sbatch"), "tiny", str(local / "run"), *args, "meta.nodes=2",
                          "meta.nproc=1", "run.threads_per_rank=1"], env=slurm_env(), capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    state, log = wait_jobs([job])[job], (local / f"{job}.out").read_text()
    assert state["JobState"] == "COMPLETED", (state, log[-3000:])
    assert log.count("running the meta-update job (1 proc x 2 nodes)") == 2
    meta_log = (local / "run" / "meta" / "stage2.log").read_text()
    assert "srun --overlap --nodes=2" in meta_log and "meta-steps x 2 proc" in meta_log
    for k in (2, 3):
        assert json.loads((local / "run" / "dwm" / f"stage{k}.safetensors.json").read_text())["sha256"] == want[k]
    a, b = by_step(ref / "metrics.jsonl"), by_step(local / "run" / "metrics.jsonl")
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]


def test_prepare_data_as_a_job_array_of_four_parts_on_two_nodes_equals_one_prepare(slurm, tmp_path):
    """launchers/slurm/prepare_array.sh: 4 array tasks over the 2 nodes, then the merge (afterok): the shards and
    index one prepare-data of the same inputs writes, byte for byte."""
    from ..conftest import SP_MODEL
    from ..test_parts import pool, same_dataset

    src = pool(tmp_path / "pool")
    opts = ["--seq-len", "64", "--shard-sequences", "300", "--workers", "1"]
    run([sys.executable, "-m", "dwmtrain", "prepare-data", "--input", str(src), "--tokenizer", str(SP_MODEL),
         "--out", str(tmp_path / "one"), *opts])  # fmt: skip
    out = tmp_path / "array"
    p = subprocess.run(["bash", str(SLURM / "prepare_array.sh"), "--sbatch", "--nodes=1", "4", str(out),
                        str(SP_MODEL), str(src), *opts], env=slurm_env(), capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    parts, merge = Path(f"{out}.slurm/jobs.txt").read_text().strip().split(",")
    assert f"dwmtrain data-status {out}" in p.stdout
    states = wait_jobs([parts, merge])
    logs = "\n".join(f.read_text() for f in sorted(Path(f"{out}.slurm").glob("*.out")))
    assert all(s["JobState"] == "COMPLETED" for s in states.values()), (states, logs[-3000:])
    hosts = set(re.findall(r"\[slurm\] part \d/4 of \S+ on (\w+),", logs))
    assert len(re.findall(r"part \d/4: \d+ files[^,]*, [\d,]+ documents, [\d,]+ tokens in", logs)) == 4, logs[-3000:]
    assert hosts and hosts <= {"n1", "n2"} and "merge of the parts" in logs  # SLURM placed the tasks
    same_dataset(tmp_path / "one", out)


def test_dsir_selection_as_job_arrays_on_two_nodes_equals_one_select(slurm, tmp_path):
    """launchers/slurm/select_array.sh dsir: the scan array (3 tasks over the 2 nodes), the weights array after it,
    then the merge: the records and report one dwmtrain select of the same pool and seed writes."""
    from ..test_select_parts import CASES, without_paths, write_pool

    src = write_pool(tmp_path / "pool")
    args = ["--input", str(src), *CASES["dsir"], "--seed", "7"]
    run([sys.executable, "-m", "dwmtrain", "select", "dsir", *args, "--out", str(tmp_path / "one.jsonl.zst"),
         "--no-progress"])  # fmt: skip
    out = tmp_path / "array.jsonl.zst"
    p = subprocess.run(["bash", str(SLURM / "select_array.sh"), "--sbatch", "--nodes=1", "3", "dsir", *args,
                        "--out", str(out)], env=slurm_env(), capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    jobs = (tmp_path / "array.slurm" / "jobs.txt").read_text().strip().split(",")
    assert len(jobs) == 3 and f"dwmtrain data-status {out}" in p.stdout  # scan, weights, merge
    states = wait_jobs(jobs)
    logs = "\n".join(f.read_text() for f in sorted((tmp_path / "array.slurm").glob("*.out")))
    assert all(s["JobState"] == "COMPLETED" for s in states.values()), (states, logs[-3000:])
    assert len(re.findall(r"part \d/3 scanned: \d+ files, [\d,]+ documents in .* docs/s", logs)) == 3, logs[-3000:]
    assert len(re.findall(r"part \d/3 weighed: ", logs)) == 3 and "merge of the dsir selection" in logs
    assert set(re.findall(r"\[slurm\] dsir part \d/3 on (\w+)", logs)) <= {"n1", "n2"}
    assert out.read_bytes() == (tmp_path / "one.jsonl.zst").read_bytes()
    one, merged = (json.loads((tmp_path / f"{n}.report.json").read_text()) for n in ("one", "array"))
    assert without_paths(merged) == without_paths(one) and merged["parts"] == 3
