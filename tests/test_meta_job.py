"""The meta job's lifetime: a trainer that dies takes its meta job with it (no orphaned 15 GB process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .helpers import REPO, alive, ppid, wait_until

# A stand-in for the meta job's worker: the same guard dwmtrain.launch.meta_job installs.
WORKER = """
import os, sys, time
from dwmtrain.procs import exit_with_parent
if os.environ.get("TORCHELASTIC_RUN_ID"):
    exit_with_parent(poll_s=0.2)
open(sys.argv[1] + ".tmp", "w").write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""

# A stand-in for the trainer rank that starts the job at a boundary (stages.boundary calls run_meta_job).
TRAINER = """
import sys
from pathlib import Path
from dwmtrain.stages.meta_job import run_meta_job
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", sys.argv[1], sys.argv[2]]
run_meta_job(cmd, 300, Path(sys.argv[3]))
"""


def _start(tmp_path: Path):
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    pid_file = tmp_path / "worker.pid"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER, str(tmp_path / "worker.py"), str(pid_file), str(tmp_path / "meta.log")],
        env=env,
    )
    if not wait_until(pid_file.exists, 60, 0.2):
        trainer.kill()
        pytest.fail(f"the meta job's worker did not start; log:\n{(tmp_path / 'meta.log').read_text()}")
    worker = int(pid_file.read_text())
    torchrun = ppid(worker)
    assert ppid(torchrun) == trainer.pid  # trainer -> torchrun -> worker
    return trainer, torchrun, worker


def test_a_sigkilled_trainer_takes_its_meta_job_with_it(tmp_path):
    trainer, torchrun, worker = _start(tmp_path)
    try:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        assert wait_until(lambda: not alive(torchrun) and not alive(worker), 30, 0.2), "meta job outlived its trainer"
    finally:
        for pid in (torchrun, worker):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_sigkilled_torchrun_takes_its_workers_with_it(tmp_path):
    trainer, torchrun, worker = _start(tmp_path)
    try:
        os.kill(torchrun, signal.SIGKILL)
        assert wait_until(lambda: not alive(worker), 15, 0.2), "the meta job's worker outlived torchrun"
        trainer.wait(15)  # torchrun's exit is the job's failure: the trainer sees it and returns
    finally:
        if trainer.poll() is None:
            trainer.kill()
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_a_meta_job_over_nodes_is_an_srun_step_of_the_allocation_and_refused_outside_one():
    from dwmtrain.errors import ConfigError
    from dwmtrain.stages.meta_job import check_meta_nodes, external_meta_command, meta_job_command

    one = meta_job_command("/r", 2, "step0000004", 8)
    assert one[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    two = meta_job_command("/r", 2, "step0000004", 8, nodes=2)
    assert two[:6] == ["srun", "--overlap", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1"]
    assert two[-8:] == one[-8:]  # the same entry point and arguments
    assert external_meta_command("/r", 2, "step0000004", 8, 1) == " ".join(one)
    from dwmtrain.stages.meta_job import SLURM_DIR

    script = SLURM_DIR / "meta_update.sbatch"  # shipped in the package: its path in a wheel as in a checkout
    assert script.is_file() and (REPO / "launchers" / "slurm" / "meta_update.sbatch").samefile(script)
    assert external_meta_command("/r", 2, "step0000004", 8, 2) == (  # an srun step needs an allocation
        f"sbatch --nodes=2 --ntasks-per-node=8 {script} /r 2 step0000004"
    )
    check_meta_nodes(2, "external", env={})  # started by hand: nothing to check here
    check_meta_nodes(2, "local", env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "4"})
    with pytest.raises(ConfigError, match="meta.nodes=2: with meta.launch=local the meta job is an srun step"):
        check_meta_nodes(2, "local", env={})
    with pytest.raises(ConfigError, match="meta.nodes=4: the SLURM allocation has 2 nodes"):
        check_meta_nodes(4, "local", env={"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"})
