"""Cluster launch paths on this machine: external meta jobs, mpirun, dead ranks, kills inside a save."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dwmtrain.checkpoint.dwm_file import read_dwm_meta

from ..helpers import REPO, alive, cmdline, free_port, kill_tree, process_tree, wait_until
from .helpers import built_once, by_step, env, pretrain_cmd, run, run_until_step_then_kill, short_run, wait_for_step

pytestmark = pytest.mark.slow
MPIRUN = str(Path(sys.executable).parent / "mpirun")


def bilevel(data64, *extra):
    """8 steps, 2 stages: one meta-update at step 4."""
    return short_run(data64, "stages.total_steps=8", "stages.num_stages=2", "meta.mode=bilevel", "meta.nproc=2",
                     "meta.steps=3", "run.dist_timeout_s=4", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data64):
    """The 2-rank deepspeed launch with meta.launch=local that the other launch paths must equal."""

    def build(out: Path) -> None:
        p = run(pretrain_cmd(out / "run", bilevel(data64)))
        (out / "launch.out").write_text(p.stdout + p.stderr)

    ref = built_once(tmp_path_factory, "cluster_ref", build)
    return ref / "run", (ref / "launch.out").read_text()


def test_a_meta_job_longer_than_the_collective_timeout_keeps_the_ranks_in_touch(reference):
    ref, out = reference  # run.dist_timeout_s=4: the ranks waiting for the meta job stay in touch
    took = float(out.split("meta-update done in ")[1].split(" s")[0])
    assert took > 4, f"the meta job took only {took} s: the test shows nothing"
    assert sorted(by_step(ref / "metrics.jsonl")) == list(range(1, 9))


def test_the_meta_job_reads_consolidated_weights_equal_to_zero_to_fp32(reference):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from dwmtrain.checkpoint import safe_torch_load

    ck = reference[0] / "checkpoints"
    w = load_file(str(ck / "step0000004" / "lm_fp32.safetensors"))
    with safe_torch_load():
        z = get_fp32_state_dict_from_zero_checkpoint(str(ck), tag="step0000004")
    assert sorted(w) == sorted(z) and all(torch.equal(w[k], z[k]) for k in z)
    assert not (ck / "step0000006" / "lm_fp32.safetensors").exists()  # periodic checkpoints: shards only


def test_external_and_local_meta_launches_fit_the_same_dwm(reference, tmp_path, data64):
    local, ext = reference[0], tmp_path / "ext"
    p = run(pretrain_cmd(ext, bilevel(data64, "meta.launch=external")), check=False)
    assert p.returncode == 3, p.stderr[-3000:]
    printed = p.stderr.split("rerun this command:\n", 1)[1].splitlines()[0]
    assert "-m dwmtrain.launch.meta_job" in printed and "--lookahead-lr" not in printed
    run(shlex.split(printed))  # what a SLURM meta job runs
    run(pretrain_cmd(ext, bilevel(data64, "meta.launch=external")))
    dwm_local, dwm_ext = (read_dwm_meta(r / "dwm" / "stage2.safetensors") for r in (local, ext))
    assert dwm_ext["sha256"] == dwm_local["sha256"] and dwm_ext["lookahead_lr"] == dwm_local["lookahead_lr"]
    a, b = by_step(local / "metrics.jsonl"), by_step(ext / "metrics.jsonl")
    assert [b[s]["loss"] for s in range(1, 9)] == [a[s]["loss"] for s in range(1, 9)]


def test_mpirun_through_a_stage_boundary_equals_the_deepspeed_launch(reference, tmp_path, data64):
    ds, mpi = reference[0], tmp_path / "mpi"
    cmd = [MPIRUN, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "OMP_NUM_THREADS=1",
           sys.executable, "-m", "dwmtrain.launch.pretrain", "--config", "tiny", "--run-dir", str(mpi),
           "run.threads_per_rank=1", *bilevel(data64)]  # fmt: skip
    p = run(cmd, timeout=300)
    assert "world 2" in p.stdout + p.stderr and "meta-update done" in p.stdout + p.stderr
    a, b = by_step(ds / "metrics.jsonl"), by_step(mpi / "metrics.jsonl")
    assert [b[s]["loss"] for s in range(1, 9)] == [a[s]["loss"] for s in range(1, 9)]
    sha = [read_dwm_meta(r / "dwm" / "stage2.safetensors")["sha256"] for r in (ds, mpi)]
    assert sha[0] == sha[1]


def test_a_killed_rank_ends_the_whole_job_within_seconds(tmp_path, data64):
    run_dir = tmp_path / "r"
    cmd = pretrain_cmd(run_dir, short_run(data64, "meta.mode=none", "stages.total_steps=500"))
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    try:
        wait_for_step(p, run_dir / "metrics.jsonl", 2)
        tree = process_tree(p.pid)
        (rank1,) = [q for q in tree if "--local_rank=1" in cmdline(q)]
        t0 = time.time()
        os.kill(rank1, signal.SIGKILL)
        rc = p.wait(timeout=300)
        dt = time.time() - t0
    finally:
        kill_tree(p.pid)
    print(f"a killed rank ended the job in {dt:.1f} s (exit {rc})")
    # The job ended because the launcher noticed the dead rank, not because the surviving rank sat in a collective
    # until run.dist_timeout_s (600 s, the default here) expired. The bound is half that timeout, not a speed: a
    # busy 2-core machine may take far longer than usual to tear the job down.
    assert rc != 0 and dt < 300
    time.sleep(1.0)
    assert not [q for q in tree if alive(q)], "a rank outlived the job"


def test_a_rank_that_stops_answering_is_named_and_the_rerun_resumes(tmp_path, data64):
    """Rank 1 SIGSTOPs itself at the start of step 3 (a fault point, ``action=stop``) and stays stopped past
    run.dist_timeout_s: the job ends with one line naming rank 1, its host and pid, not gloo's traceback; the same
    command then resumes from step 2 and finishes."""
    run_dir = tmp_path / "r"
    args = short_run(data64, "meta.mode=none", "stages.total_steps=6", "stages.num_stages=1", "run.dist_timeout_s=6")
    stop = env(DWMTRAIN_FAULT="step:rank=1:step=3:action=stop")
    p = subprocess.Popen(pretrain_cmd(run_dir, args), cwd=REPO, env=stop, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        out, _ = p.communicate(timeout=300)
    finally:
        kill_tree(p.pid)
    ours = lambda: [q for q in process_tree(1) if str(run_dir) in cmdline(q)]  # noqa: E731
    wait_until(lambda: not ours(), timeout_s=30)
    left = ours()
    for q in left:  # a stopped rank the launcher could not end: the assert below fails, nothing stays behind
        os.kill(q, signal.SIGKILL)
    line = next((ln for ln in out.splitlines() if "PeerLost" in ln), "")
    assert p.returncode != 0 and "rank 1 (" in line and "stopped answering" in line, out[-3000:]
    assert "pid " in line and "dist_timeout_s=6" in line and "Traceback" not in out, out[-3000:]
    assert not left, [cmdline(q) for q in left]
    q = run(pretrain_cmd(run_dir, args))
    assert "resumed from" in q.stdout + q.stderr and "at step 2" in q.stdout + q.stderr
    assert sorted(by_step(run_dir / "metrics.jsonl")) == list(range(1, 7))


def test_resume_at_another_world_size_and_back(reference, tmp_path, data64):
    """Saved on 2 ranks, resumed on 1, saved there, resumed on 2: same samples, stage and DWM; the losses follow
    the 2-rank reference to float32 rounding (another reduction order, so not bit for bit)."""
    ref, moved = reference[0], tmp_path / "moved"
    args = bilevel(data64)  # checkpoints every 2 steps; the stage-2 DWM is fitted at step 4
    run_until_step_then_kill(pretrain_cmd(moved, args), moved / "metrics.jsonl", 5)
    assert json.loads((moved / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert (moved / "dwm" / "stage2.safetensors").exists()
    run_until_step_then_kill(pretrain_cmd(moved, args, world=1), moved / "metrics.jsonl", 7)
    assert json.loads((moved / "checkpoints" / "latest.json").read_text())["step"] == 6
    p = run(pretrain_cmd(moved, args, world=2))
    out = p.stdout + p.stderr
    assert "world size 1 -> 2" in out and "resumed from" in out and "world 2" in out
    a, b = by_step(ref / "metrics.jsonl"), by_step(moved / "metrics.jsonl")
    assert sorted(b) == list(range(1, 9))
    assert [b[s]["dwm"] for s in range(5, 9)] == [a[s]["dwm"] for s in range(5, 9)] and a[5]["dwm"].startswith(
        "stage2:"
    )
    assert [b[s]["samples_seen"] for s in range(1, 9)] == [a[s]["samples_seen"] for s in range(1, 9)]
    for s in range(5, 9):  # steps 5-6 ran on 1 rank (resumed from a 2-rank save), 7-8 on 2 (from a 1-rank save)
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5), (s, b[s]["loss"], a[s]["loss"])
        assert b[s]["lr"] == a[s]["lr"]


@pytest.mark.parametrize(
    "addr, expect",
    [
        ("no-such-host.invalid", ["does not resolve"]),
        (
            "127.0.0.1",
            [
                "could not join the process group at 127.0.0.1:",
                "; rank 0 (which hosts the rendezvous store) is not up there or stopped answering",
            ],
        ),
    ],
)
def test_a_master_that_cannot_be_reached_ends_the_rank_in_bounded_time(tmp_path, data64, addr, expect):
    cmd = [sys.executable, "-m", "dwmtrain.launch.pretrain", "--config", "tiny", "--run-dir", str(tmp_path / "r"),
           "run.dist_timeout_s=10", *short_run(data64)]  # fmt: skip
    t0 = time.time()  # rank 1 of 2 waits for a rank 0 that never comes; the subprocess timeout bounds the wait
    p = run(cmd, check=False, timeout=120, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR=addr, MASTER_PORT=str(free_port()))  # fmt: skip
    dt = time.time() - t0
    print(f"MASTER_ADDR={addr}: exit {p.returncode} after {dt:.1f} s: {p.stderr.strip().splitlines()[-1]}")
    assert p.returncode == 2 and all(e in p.stderr for e in expect) and "Traceback" not in p.stderr
