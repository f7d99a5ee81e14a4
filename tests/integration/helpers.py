"""Launch real `deepspeed` jobs on 2 CPU ranks and read what they wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TINY = REPO / "launchers" / "configs" / "tiny.yaml"


def pretrain_cmd(run_dir: Path, overrides: list[str], world: int = 2, config: Path = TINY) -> list[str]:
    return [
        DEEPSPEED,
        "--num_gpus",
        str(world),
        "--master_port",
        str(29500 + os.getpid() % 1000),
        str(REPO / "launchers" / "pretrain.py"),
        "--config",
        str(config),
        "--run-dir",
        str(run_dir),
        "run.threads_per_rank=1",
        *overrides,
    ]


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


def run_until_step_then_kill(cmd: list[str], metrics: Path, step: int, timeout: int = 600) -> None:
    """Start the job, wait until metrics.jsonl shows ``step``, then SIGKILL the whole process group."""
    p = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            if p.poll() is not None:
                raise AssertionError(f"job ended (rc {p.returncode}) before step {step}")
            if metrics.exists() and any(
                json.loads(x)["step"] >= step for x in metrics.read_text().splitlines() if x.strip()
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("timed out waiting for the step")
    finally:
        kill_tree(p.pid)
        p.wait()


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop(0))
        todo += children.get(out[-1], [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every descendant, by process id (the tree is listed before anything is killed)."""
    for q in process_tree(pid):
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def by_step(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in records(path)}
