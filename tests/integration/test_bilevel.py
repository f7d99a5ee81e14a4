"""Stage boundaries with the bi-level meta-update: 2 training ranks, a separate meta job, broadcast."""

import json
import subprocess
import time

import pytest

from dwmtrain.models.dwm import read_dwm_meta

from .helpers import (
    REPO,
    by_step,
    cmdline,
    env,
    kill_tree,
    pretrain_cmd,
    process_tree,
    records,
    run,
    run_until_step_then_kill,
    short_run,
)

pytestmark = pytest.mark.slow


def args(data64, *extra):
    return short_run(data64, "meta.mode=bilevel", "meta.nproc=2", "meta.steps=3", *extra)


def kill_meta_job_when_it_starts(cmd, run_dir, stage, timeout=300):
    """Run training; SIGKILL the stage's meta-update job (not the trainer) once it is running."""
    p = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pattern = f"dwmtrain.launch.meta_update --run-dir {run_dir} --stage {stage}"
    t0, killed = time.time(), False
    while time.time() - t0 < timeout and p.poll() is None:
        job = next((q for q in process_tree(p.pid) if pattern in cmdline(q)), None)  # torchrun, then its workers
        if job is not None:
            time.sleep(1.0)  # let it get going
            kill_tree(job)
            killed = True
            break
        time.sleep(0.1)
    out, err = p.communicate(timeout=timeout)
    assert killed, "the meta job never started"
    return p.returncode, out, err


def test_three_stages_two_meta_updates_broadcast_failures_and_resume(tmp_path, data64):
    ref, b = tmp_path / "ref", tmp_path / "b"
    p = run(pretrain_cmd(ref, args(data64)))
    a = by_step(ref / "metrics.jsonl")
    m2, m3 = (
        read_dwm_meta(ref / "dwm" / "stage2.safetensors"),
        read_dwm_meta(ref / "dwm" / "stage3.safetensors"),
    )
    assert (m2["stage"], m2["lm_step"], m3["stage"], m3["lm_step"]) == (2, 4, 3, 8)
    assert [a[s]["dwm"] for s in (4, 5, 8, 9)] == [
        "uniform",
        f"stage2:{m2['sha256'][:12]}",
        f"stage2:{m2['sha256'][:12]}",
        f"stage3:{m3['sha256'][:12]}",
    ]
    assert all(a[s]["w_min"] < 1 < a[s]["w_max"] for s in range(9, 13))
    log3 = (ref / "meta" / "stage3.log").read_text()
    assert "continued from" in log3 and "--nproc_per_node=2" in log3
    meta_recs = records(ref / "meta" / "stage2.jsonl")
    assert len(meta_recs) == 3
    for k in ("val_loss_theta", "val_loss_theta_star", "weight_entropy", "grad_norm"):
        assert k in meta_recs[0]
    assert "meta-update job" in p.stdout + p.stderr

    # 1. the meta job times out: training stops with a clear error and a complete boundary checkpoint
    p = run(pretrain_cmd(b, args(data64, "meta.timeout_s=1")), check=False)
    assert p.returncode != 0 and "timed out after 1 s" in p.stderr and "rerun the same command" in p.stderr
    assert json.loads((b / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (b / "dwm" / "stage2.safetensors").exists()

    # 2. rerun: resumes at the boundary, fits stage 2; the stage-3 meta job is killed -> clear error
    rc, out, err = kill_meta_job_when_it_starts(pretrain_cmd(b, args(data64)), b, 3)
    assert rc != 0 and "meta-update job exited with" in err
    assert json.loads((b / "checkpoints" / "latest.json").read_text())["step"] == 8
    assert (b / "dwm" / "stage2.safetensors").exists() and not (b / "dwm" / "stage3.safetensors").exists()

    # 3. rerun, and SIGKILL the trainer in stage 3 after its DWM exists
    run_until_step_then_kill(pretrain_cmd(b, args(data64)), b / "metrics.jsonl", 10)
    assert (b / "dwm" / "stage3.safetensors").exists()
    jobs_before = (b / "meta" / "stage3.log").read_text().count("\n$ ")

    # 4. rerun: the finished stage-3 DWM is reused, not recomputed; the run ends exactly like the reference
    p = run(pretrain_cmd(b, args(data64)))
    assert "stage 3: reusing" in p.stdout + p.stderr
    assert (b / "meta" / "stage3.log").read_text().count("\n$ ") == jobs_before
    got = by_step(b / "metrics.jsonl")
    assert sorted(got) == list(range(1, 13))
    assert [got[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]
    assert read_dwm_meta(b / "dwm" / "stage3.safetensors")["sha256"] == m3["sha256"]
