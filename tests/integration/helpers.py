"""Launch real `deepspeed` jobs on 2 CPU ranks and read what they wrote."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ..helpers import REPO, free_port, kill_tree, wait_until
from ..helpers import cmdline as cmdline  # re-exported: the launch tests read their processes through here
from ..helpers import process_tree as process_tree

DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY = REPO / "launchers" / "configs" / "tiny.yaml"
TASK_DATA = REPO / "tests" / "data" / "lmeval"  # a few lm-eval records of each task, made up


def pretrain_cmd(run_dir: Path, overrides: list[str], world: int = 2, config: Path = TINY) -> list[str]:
    """A deepspeed launch of launchers/pretrain.py on its own free rendezvous port (``master_port(cmd)``)."""
    return [
        DEEPSPEED,
        "--num_gpus",
        str(world),
        "--master_port",
        str(free_port()),
        str(REPO / "launchers" / "pretrain.py"),
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "run.threads_per_rank=1",
        *overrides,
    ]


def master_port(cmd: list[str]) -> str:
    """The rendezvous port a launch command was given."""
    return cmd[cmd.index("--master_port") + 1]


def short_run(data_dir: Path, *extra: str) -> list[str]:
    """Overrides for a 12-step, 3-stage tiny run checkpointing every 2 steps, then ``extra`` (later wins)."""
    return [
        f"data.train_data={data_dir}",
        "stages.total_steps=12",
        "stages.num_stages=3",
        "run.checkpoint_every=2",
        *extra,
    ]


def env(**extra: str) -> dict:
    e = dict(os.environ, **extra)
    e["PYTHONUNBUFFERED"] = "1"
    e.setdefault("OMP_NUM_THREADS", "1")
    return e


def run(cmd: list[str], timeout: int = 600, check: bool = True, **extra_env: str) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{cmd} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
        )
    return p


def wait_for_step(p: subprocess.Popen, metrics: Path, step: int, timeout: float = 300, interval_s: float = 0.1) -> None:
    """Poll until metrics.jsonl shows ``step``; fail if the job ends first or ``timeout`` seconds pass."""

    def reached() -> bool:
        assert p.poll() is None, f"job ended (rc {p.returncode}) before step {step}"
        return any(r["step"] >= step for r in by_step(metrics).values())

    if not wait_until(reached, timeout, interval_s):
        raise AssertionError(f"no step {step} within {timeout} s")


def run_until_step_then_kill(cmd: list[str], metrics: Path, step: int, timeout: int = 600) -> None:
    """Start the job, wait until metrics.jsonl shows ``step``, then SIGKILL the whole process group."""
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_for_step(p, metrics, step, timeout, interval_s=0.05)
    finally:
        kill_tree(p.pid)
        p.wait()


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def by_step(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(path)}


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(dir)`` once for the whole session, whichever pytest-xdist worker asks first: the others wait for it
    on a lock and read the same directory (what it holds is read-only to the tests). Built per worker, the shared
    runs cost CI minutes twice."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out, done = root / name, root / f"{name}.built"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, by a crashed builder too
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)  # a builder that failed left half a directory
            out.mkdir()
            build(out)
            done.touch()
    return out
