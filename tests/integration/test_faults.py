"""Faults injected at named points (``dwmtrain/faults.py``), one after another in one run directory, each
followed by a rerun of the same command: the run ends with per-step losses equal to an uninterrupted run's,
and no complete checkpoint or DWM file written before a fault is changed by it.

The order is the order a 3-stage run meets them: a crash between the COMPLETE marker and latest.json, a meta
job that times out, a meta job killed while it writes the DWM file, rank 0 killed while it broadcasts the DWM,
a rank killed inside a save, a disk too full for the next checkpoint (a real tmpfs), and the trainer killed
in stage 3 after that stage's DWM exists."""

import hashlib
import json
import shutil
import subprocess

import pytest

from dwmtrain.checkpoint.dwm_file import load_dwm_state, read_dwm_meta
from dwmtrain.rundir import RunDir

from .helpers import by_step, pretrain_cmd, run, run_until_step_then_kill
from .services import unavailable

pytestmark = pytest.mark.slow


def fingerprint(run_dir) -> dict[str, str]:
    """sha256 of every file of every complete checkpoint and every complete DWM file."""
    files = RunDir(run_dir).complete_files()
    return {str(f.relative_to(run_dir)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def unchanged(before: dict[str, str], run_dir) -> list[str]:
    now = fingerprint(run_dir)
    return [f for f, h in before.items() if now.get(f) != h]


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MiB tmpfs: a disk that can really fill up."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        unavailable(f"cannot mount a tmpfs (needs root): {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_faults_at_every_named_point_then_the_same_command_finishes_the_run(bilevel_reference, tmpfs, tmp_path):
    ref, args = bilevel_reference
    f = tmp_path / "f"
    f.mkdir()
    (f / "checkpoints").symlink_to(tmpfs)  # the run's checkpoints live on the small disk
    cmd = pretrain_cmd(f, args)

    def faulted(fault: str | None, *extra: str, expect: str) -> str:
        before = fingerprint(f)
        p = run(
            pretrain_cmd(f, [*args, *extra]), check=False, timeout=300, **({"DWMTRAIN_FAULT": fault} if fault else {})
        )
        out = p.stdout + p.stderr
        assert p.returncode != 0, f"{fault}: the run did not stop\n{out[-3000:]}"
        assert expect in out, f"{fault}: no {expect!r} in\n{out[-3000:]}"
        assert not unchanged(before, f), f"{fault} changed {unchanged(before, f)}"
        return out

    # 1. rank 0 dies after writing step 2's marker, before latest.json: the marker is the commit point
    faulted("checkpoint-marker-written:step=2", expect="")
    assert (f / "checkpoints" / "step0000002" / "COMPLETE").exists() and not (
        f / "checkpoints" / "latest.json"
    ).exists()
    # 2. the stage-2 meta job takes longer than meta.timeout_s
    out = faulted(None, "meta.timeout_s=1", expect="timed out after 1 s")
    assert "resumed from" in out and "at step 2" in out and "rerun the same command" in out
    # 3. the meta job is killed between writing the DWM's tensors and its sidecar
    faulted("dwm-tensors-written:stage=2", expect="meta-update job exited with")
    assert (f / "dwm" / "stage2.safetensors").exists() and not (f / "dwm" / "stage2.safetensors.json").exists()
    # 4. rank 0 is killed while it broadcasts the (recomputed, complete) stage-2 DWM
    out = faulted("tensor-broadcast:rank=0:index=3", expect="recomputing")
    load_dwm_state(f / "dwm" / "stage2.safetensors")  # complete and verified
    # 5. rank 1 is killed after writing its shards of step 6, before the ranks agree the save is complete
    out = faulted("checkpoint-shards-written:rank=1:step=6", expect="stage 2: reusing")
    assert not (f / "checkpoints" / "step0000006" / "COMPLETE").exists()
    assert json.loads((f / "checkpoints" / "latest.json").read_text())["tag"] == "step0000004"
    assert (f / "checkpoints" / "step0000004" / "lm_fp32.safetensors").is_file()  # stage ends: the LM's weights
    # 6. the disk is too full for the next checkpoint: refused before a byte is written
    free = shutil.disk_usage(tmpfs).free
    (tmpfs / "filler").write_bytes(b"\0" * (free - (2 << 20)))  # leave 2 MiB
    out = faulted(None, expect="nothing was written")
    assert "has 2.0 MiB free and a checkpoint takes" in out and "Traceback" not in out
    (tmpfs / "filler").unlink()
    # 7. the trainer is killed in stage 3, after the stage-3 DWM was fitted
    run_until_step_then_kill(cmd, f / "metrics.jsonl", 10)
    assert (f / "dwm" / "stage3.safetensors.json").exists()
    jobs = (f / "meta" / "stage3.log").read_text().count("\n$ ")
    # 8. the same command finishes the run: every step's loss equals the uninterrupted run's
    p = run(cmd)
    assert "stage 3: reusing" in p.stdout + p.stderr
    assert (f / "meta" / "stage3.log").read_text().count("\n$ ") == jobs  # the finished DWM was not refitted
    a, b = by_step(ref / "metrics.jsonl"), by_step(f / "metrics.jsonl")
    assert sorted(b) == list(range(1, 13))
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]
    for stage in (2, 3):
        assert (
            read_dwm_meta(f / "dwm" / f"stage{stage}.safetensors")["sha256"]
            == read_dwm_meta(ref / "dwm" / f"stage{stage}.safetensors")["sha256"]
        )
