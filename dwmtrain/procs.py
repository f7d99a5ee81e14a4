"""Process helpers for the jobs dwmtrain starts (the meta job) and the workers inside them: a child that dies
with its parent, a worker that exits when its parent is gone, a command run to completion or killed at a
timeout, when this process started, and this host's memory."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def signal_on_parent_death(parent_pid: int, sig: int = signal.SIGTERM):
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
        print(f"[dwmtrain] parent {parent} is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    t = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    t.start()
    return t


TERM_GRACE_S = 10.0  #: seconds a timed-out child's process group has between SIGTERM and SIGKILL


def run_logged(cmd: list[str], timeout_s: float, log_path: Path, env: dict) -> int | None:
    """Run ``cmd`` with its output appended to ``log_path``, in its own session, dying with this process.
    Returns its exit code, or None when it ran past ``timeout_s`` (its whole process group is then killed)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=signal_on_parent_death(os.getpid()),
        )
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            # SIGTERM first: srun passes it to its tasks on every node and ends the step (a SIGKILLed srun cannot);
            # what has not ended after the grace is killed
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=TERM_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group's stragglers
            return None


def process_started_at() -> float:
    """When this process started (wall clock), from /proc: Python start-up and imports count in a pause."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        boot = next(float(x.split()[1]) for x in open("/proc/stat") if x.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def stat_fields(pid: int | str) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (which may hold spaces and parentheses): the state first, then
    the parent's pid, ...; None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """``pid`` exists and has not exited (a zombie no one reaps has exited)."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def usable_cpus(env=None) -> int:
    """The CPUs this process may use, as the scheduler gave them: its affinity (cgroups, taskset, srun's binding),
    capped by SLURM's allocation when it says (``SLURM_CPUS_PER_TASK`` for a task, else ``SLURM_CPUS_ON_NODE``);
    not ``os.cpu_count()``, the machine's."""
    env = os.environ if env is None else env
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if env.get(var, "").isdigit() and int(env[var]) > 0:
            return min(n, int(env[var]))
    return max(1, n)


def host_memory(field: str = "MemTotal") -> int | None:
    """A /proc/meminfo figure of this host in bytes (MemTotal, MemAvailable, ...), or None where there is none."""
    try:
        for ln in open("/proc/meminfo"):
            if ln.startswith(field + ":"):
                return int(ln.split()[1]) * 1024
    except OSError:
        pass
    return None
