"""Two hosts over ssh (`deepspeed --hostfile`, pdsh) with node-local run directories: each host sees only
its own ranks' files. Three bi-level stages, both meta-updates, killed and resumed with identical losses."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from ..helpers import free_port
from .helpers import DEEPSPEED, REPO, TINY, by_step, env, pretrain_cmd, run, short_run
from .services import start

pytestmark = pytest.mark.slow


def hostfile_cmd(hostfile: Path, run_dir: Path, args: list[str]) -> list[str]:
    return [DEEPSPEED, "--hostfile", str(hostfile), "--master_addr", "dwmhost1", "--master_port", str(free_port()),
            str(REPO / "launchers" / "pretrain.py"), "--config", str(TINY), "--run-dir", str(run_dir),
            "run.threads_per_rank=1", *args]  # fmt: skip


def kill_run(run_dir: Path) -> None:
    """SIGKILL every process of this run, local or started over ssh (one machine: all are visible here)."""
    for p in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(run_dir).encode() in p.read_bytes():
                os.kill(int(p.parent.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def test_two_hosts_with_node_local_run_directories(tmp_path, data64):
    run_dir, host2_view = tmp_path / "run", tmp_path / "run.host2"
    start("sshd.sh")
    start("sshd.sh", "--restart-host2", "--private", str(run_dir))  # on dwmhost2, run_dir is run.host2
    hosts = tmp_path / "hosts"
    hosts.write_text("dwmhost1 slots=1\ndwmhost2 slots=1\n")
    args = short_run(data64, "meta.mode=bilevel", "meta.nproc=2", "meta.steps=3", "run.keep_last=2")
    ref = tmp_path / "ref"
    run(pretrain_cmd(ref, args))  # one host, two local ranks

    p = subprocess.Popen(hostfile_cmd(hosts, run_dir, args), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    try:
        t0 = time.time()
        while not any(s >= 10 for s in by_step(run_dir / "metrics.jsonl")):  # stage 3, after both meta-updates
            assert p.poll() is None, f"ended with {p.returncode} before step 10:\n{p.stdout.read()[-5000:]}"
            assert time.time() - t0 < 400
            time.sleep(0.2)
    finally:
        kill_run(run_dir)
        p.wait(timeout=60)

    # node-local storage: each host holds its own rank's part; rank 0's host alone has markers and DWMs
    ck1, ck2 = run_dir / "checkpoints", host2_view / "checkpoints"
    assert (ck1 / "step0000008" / "COMPLETE").is_file() and not (ck2 / "step0000008" / "COMPLETE").exists()
    assert not (ck2 / "latest.json").exists() and not (host2_view / "dwm").exists()
    assert sorted(f.name for f in (ck2 / "step0000008").glob("*.pt")) == [
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert not list((ck1 / "step0000008").glob("zero_pp_rank_1_*"))
    assert (ck1 / "step0000008" / "lm_fp32.safetensors").is_file()  # what the meta job read
    assert (run_dir / "dwm" / "stage3.safetensors").is_file()

    p = run(hostfile_cmd(hosts, run_dir, args))  # rerun: resumes on both hosts from rank 0's choice
    assert "resumed from" in p.stdout + p.stderr
    a, b = by_step(ref / "metrics.jsonl"), by_step(run_dir / "metrics.jsonl")
    assert sorted(b) == list(range(1, 13))
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]
    assert [b[s]["dwm"] for s in (5, 12)] == [a[s]["dwm"] for s in (5, 12)]
    kept = lambda ck: sorted(d.name for d in ck.iterdir() if d.name.startswith("step"))  # noqa: E731
    assert kept(ck1) == kept(ck2) == ["step0000004", "step0000008", "step0000010", "step0000012"]  # both pruned
    assert json.loads((ck1 / "latest.json").read_text())["tag"] == "step0000012"
