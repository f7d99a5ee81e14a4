"""The meta-update job as a process: its command line, its environment, running it with a timeout.

The job is ``python -m dwmtrain.launch.meta_update`` under torchrun (single node, ``meta.nproc``
processes), so it runs from an installed package as well as from a checkout.
"""

from __future__ import annotations

import ctypes
import os
import signal
import site
import subprocess
import sys
import threading
import time
from pathlib import Path

import dwmtrain
from dwmtrain.errors import DWMTrainError

# The trainer's rendezvous variables must not leak into the meta job's own (torchrun sets them anew).
_RENDEZVOUS_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)

_MPI_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "PRTE_")  # an mpirun-started trainer's: not the meta job's


class MetaJobError(DWMTrainError, RuntimeError):
    """The meta-update job failed or timed out; the boundary checkpoint is intact, rerun to resume."""

    hint = "the stage-boundary checkpoint is complete; rerun the same command to resume"


def meta_job_command(run_dir: str | os.PathLike, stage: int, tag: str, nproc: int) -> list[str]:
    """The single-node meta-update job for one boundary (torchrun picks a free port).

    The lookahead alpha is not passed: the job derives it from the config and the checkpoint's step
    (``meta.update.lookahead_lr``), so a job started here and one started by hand fit the same DWM.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "dwmtrain.launch.meta_update",
        "--run-dir",
        str(run_dir),
        "--stage",
        str(stage),
        "--checkpoint",
        tag,
    ]


def meta_job_env() -> dict:
    """The trainer's environment without its rendezvous variables, importing this same dwmtrain."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS and not k.startswith(_MPI_PREFIXES)}
    pkg_parent = str(Path(dwmtrain.__file__).resolve().parents[1])
    if pkg_parent not in site.getsitepackages():  # a checkout run through launchers/*.py
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _signal_on_parent_death(parent_pid: int, sig: int = signal.SIGTERM):
    """A ``preexec_fn``: the kernel sends ``sig`` to the child when the process that started it dies.

    So a trainer rank that is SIGKILLed (by the OOM killer, by a scheduler) takes its meta job with it:
    torchrun forwards SIGTERM to its workers. A parent that died before the prctl is caught by ppid.
    """

    def preexec():
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 and os.getppid() != parent_pid:
            os.kill(os.getpid(), sig)

    return preexec if sys.platform.startswith("linux") else None


def exit_with_parent(poll_s: float = 1.0) -> threading.Thread:
    """End this process when its parent dies (this process is reparented): a daemon thread polls the ppid.

    The meta job's workers call it, so a torchrun that is killed outright does not leave them running.
    Polling rather than PR_SET_PDEATHSIG, which fires when the parent's *thread* that forked exits.
    """
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"[dwmtrain] meta job: parent {parent} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    t = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    t.start()
    return t


def run_meta_job(cmd: list[str], timeout_s: float, log_path: Path) -> None:
    """Run the meta job to completion or kill its process group at the timeout; MetaJobError on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=meta_job_env(),
            start_new_session=True,
            preexec_fn=_signal_on_parent_death(os.getpid()),
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise MetaJobError(
                f"meta-update job timed out after {timeout_s:.0f} s (meta.timeout_s); log: {log_path}"
            ) from None
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise MetaJobError(f"meta-update job exited with {rc}; log: {log_path}\n  " + "\n  ".join(tail))
