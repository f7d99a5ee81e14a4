"""The meta-update job as a process: its command line, its environment, running it with a timeout.

The job is ``python -m dwmtrain.launch.meta_job`` under torchrun (one node, ``meta.nproc`` processes), or one srun
step of ``meta.nodes`` x ``meta.nproc`` tasks inside the run's SLURM allocation, so it runs from an installed
package as well as from a checkout.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

import dwmtrain
from dwmtrain.errors import ConfigError, DWMTrainError
from dwmtrain.procs import run_logged

SLURM_DIR = Path(dwmtrain.__file__).parent / "launch" / "slurm"  #: the job scripts, shipped in the package
META_JOB_MODULE = "dwmtrain.launch.meta_job"  #: the meta job's entry point (tests/test_meta_job.py runs it)

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
#: what srun reads as its own options from the environment: the trainer task's binding and CPUs are not the meta
#: job's tasks' (its srun step gets the allocation's defaults)
_SRUN_INPUT_VARS = ("SLURM_CPU_BIND", "SLURM_CPU_BIND_LIST", "SLURM_CPU_BIND_TYPE", "SLURM_CPU_BIND_VERBOSE",
                    "SLURM_CPUS_PER_TASK", "SLURM_TRES_PER_TASK", "SLURM_DISTRIBUTION", "SLURM_MEM_BIND")  # fmt: skip


class MetaJobError(DWMTrainError, RuntimeError):
    """The meta-update job failed or timed out; the boundary checkpoint is intact, rerun to resume."""

    hint = "the stage-boundary checkpoint is complete; rerun the same command to resume"

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code  #: the job's exit code (None: it did not run to an exit, or timed out)


def meta_job_command(run_dir: str | os.PathLike, stage: int, tag: str, nproc: int, nodes: int = 1) -> list[str]:
    """The meta-update job for one boundary: torchrun on this node (it picks a free port), or with ``nodes`` > 1
    an srun step over that many nodes of the SLURM allocation, ``nproc`` tasks each (its tasks find their rank and
    rendezvous in SLURM's variables, the port per job step: ``dwmtrain.distributed.rendezvous``).

    The lookahead alpha is not passed: the job derives it from the config and the checkpoint's step
    (``meta.update.lookahead_lr``), so a job started here and one started by hand fit the same DWM.
    """
    entry = ["-m", META_JOB_MODULE, "--run-dir", str(run_dir), "--stage", str(stage), "--checkpoint", tag]
    if nodes == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *entry]
    # --overlap: the trainer's step keeps its resources while it waits; --kill-on-bad-exit: one failed task ends all
    return ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes * nproc}", f"--ntasks-per-node={nproc}",
            "--kill-on-bad-exit=1", sys.executable, *entry]  # fmt: skip


def external_meta_command(run_dir: str | os.PathLike, stage: int, tag: str, nproc: int, nodes: int) -> str:
    """What a meta.launch=external stop tells the user to run: the command itself on one node, the SLURM job
    script over more (an srun step needs an allocation of those nodes)."""
    if nodes == 1:
        return " ".join(meta_job_command(run_dir, stage, tag, nproc))
    script = SLURM_DIR / "meta_update.sbatch"
    return f"sbatch --nodes={nodes} --ntasks-per-node={nproc} {script} {run_dir} {stage} {tag}"


def check_meta_nodes(nodes: int, launch: str, env=os.environ) -> None:
    """A local meta job over ``nodes`` > 1 needs an srun of at least that many nodes (a one-line error before
    training starts, not at the first boundary)."""
    if nodes == 1 or launch != "local":
        return
    if "SLURM_JOB_ID" not in env:
        raise ConfigError(f"meta.nodes={nodes}: with meta.launch=local the meta job is an srun step of the run's "
                          "SLURM allocation, and this run is not in one; set meta.launch=external and start it "
                          "across your nodes (docs/launching.md)")  # fmt: skip
    have = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    if have < nodes:
        raise ConfigError(f"meta.nodes={nodes}: the SLURM allocation has {have} node{'s' * (have > 1)}")


def meta_job_env() -> dict:
    """The trainer's environment without its rendezvous variables, importing this same dwmtrain."""
    drop = {*_RENDEZVOUS_VARS, *_SRUN_INPUT_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(_MPI_PREFIXES)}
    pkg_parent = str(Path(dwmtrain.__file__).resolve().parents[1])
    if pkg_parent not in site.getsitepackages():  # a checkout run through launchers/*.py
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_meta_job(cmd: list[str], timeout_s: float, log_path: Path) -> None:
    """Run the meta job to completion or kill its process group at the timeout; MetaJobError on failure."""
    rc = run_logged(cmd, timeout_s, log_path, meta_job_env())
    if rc is None:
        raise MetaJobError(f"meta-update job timed out after {timeout_s:.0f} s (meta.timeout_s); log: {log_path}")
    if rc != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise MetaJobError(f"meta-update job exited with {rc}; log: {log_path}\n  " + "\n  ".join(tail), rc)
