#!/usr/bin/env python3
"""Exit-code stress: every outcome of a training job and of a meta-update job, many times, with the machine
loaded, counting each rank's real exit status. The exit code is the contract with SLURM and with every pipeline a
user writes (``launchers/slurm/pipeline.sh`` starts the meta job on 3 and requeues on 4): it must be right every
time.

    python tools/exit_stress.py --repeat 20 --concurrency 2 --work /tmp/exits      # the figures in docs/design.md
    python tools/exit_stress.py --repeat 1 --outcomes done,boundary-stop             # a quick look

Each job is 2 ranks started the way srun or mpirun starts them (one process per rank, the rendezvous in the
environment), so the status of every rank is the one the OS reports to its launcher; ``--concurrency`` jobs run at
once (4 processes on 2 cores: as ``make test`` loads this machine). The outcomes are driven by fault points
(``dwmtrain/faults.py``): an error on every rank or on one, a bug, SIGUSR1 on one rank or on all (SLURM's
time-limit warning), a rank killed, non-finite losses, a stage boundary with ``meta.launch=external``; and the meta
job finishing, failing, losing a rank. A rank is right when its exit status is the expected one and its output
has no abort ("terminate called", a signal it was not sent) and no traceback unless the outcome is a bug. Every
job is bounded in time (``--job-timeout``) and the whole run by ``--budget-s``. Prints N of N per outcome and writes
WORK/exit_stress.json; exits 1 if any rank was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "launchers" / "configs" / "tiny.yaml"
CORPUS = ROOT / "dwmtrain" / "data" / "corpus"
KILLED = -signal.SIGKILL


@dataclass(frozen=True)
class Outcome:
    """One way a job ends: what it runs, with which fault, and each rank's expected exit status and words."""

    name: str
    job: str  #: "train" or "meta"
    codes: tuple[int, int]  #: rank 0's and rank 1's exit status (negative: killed by that signal)
    fault: str = ""  #: DWMTRAIN_FAULT
    overrides: tuple[str, ...] = ()
    says: str = ""  #: a line some rank must print
    traceback: bool = False  #: a bug: its traceback is expected


BOUNDARY = ("stages.total_steps=8", "stages.num_stages=2", "meta.mode=bilevel", "meta.nproc=2", "meta.steps=2",
            "meta.launch=external")  # fmt: skip
OUTCOMES = [
    Outcome("done", "train", (0, 0)),
    Outcome("error", "train", (2, 2), "step:step=2:action=error", says="error (InjectedFault)"),
    Outcome("error-one-rank", "train", (2, 2), "step:rank=1:step=2:action=error", says="error (PeerLost): rank 1"),
    Outcome("bug", "train", (1, 1), "step:step=2:action=bug", says="an unexpected error", traceback=True),
    Outcome("boundary-stop", "train", (3, 3), overrides=BOUNDARY, says="stopped at a stage boundary"),
    Outcome("stop-signal", "train", (4, 4), "step:rank=1:step=2:action=usr1", says="stopped at step"),
    Outcome("time-limit", "train", (4, 4), "step:step=2:action=usr1", says="stopped at step"),
    Outcome("lost-peer", "train", (2, KILLED), "step:rank=1:step=2:action=kill", says="error (PeerLost): rank 1"),
    Outcome(
        "nonfinite",
        "train",
        (2, 2),
        "nonfinite-loss:step=2-3",
        ("run.stop_after_nonfinite=2",),
        says="error (NonFiniteError)",
    ),  # fmt: skip
    Outcome("meta-done", "meta", (0, 0), says="[meta] wrote"),
    Outcome("meta-error", "meta", (2, 2), "meta-step:step=1:action=error", says="error (InjectedFault)"),
    Outcome(
        "meta-lost-peer", "meta", (2, KILLED), "meta-step:rank=1:step=2:action=kill", says="error (PeerLost): rank 1"
    ),  # fmt: skip
]


@dataclass
class Result:
    outcome: str
    trial: int
    codes: list[int | None]
    seconds: float
    wrong: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_cmd(o: Outcome, run_dir: Path, data: Path) -> list[str]:
    if o.job == "meta":
        return [sys.executable, "-m", "dwmtrain.launch.meta_job", "--run-dir", str(run_dir), "--stage", "2"]
    base = [f"data.train_data={data}", "stages.total_steps=4", "stages.num_stages=1", "run.checkpoint_every=2",
            "run.threads_per_rank=1", "run.dist_timeout_s=4", "run.tensorboard=false"]  # fmt: skip
    return [sys.executable, "-m", "dwmtrain.launch.pretrain", "--config", str(TINY), "--run-dir", str(run_dir),
            *base, *o.overrides]  # fmt: skip


def run_job(
    o: Outcome, trial: int, work: Path, data: Path, template: Path | None, timeout_s: float, keep: bool = False
) -> Result:
    """Two ranks of ``o``'s job, started as srun would; each rank's status and output judged."""
    where = work / "jobs" / f"{o.name}-{trial}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    run_dir = where / "run"
    if o.job == "meta":
        shutil.copytree(template, run_dir)
    port, t0 = free_port(), time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "DWMTRAIN_FAULT"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))  # fmt: skip
    if o.fault:
        env["DWMTRAIN_FAULT"] = o.fault
    procs, logs = [], [where / f"rank{r}.log" for r in range(2)]
    for r in range(2):
        rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        with open(logs[r], "wb") as log:
            procs.append(subprocess.Popen(rank_cmd(o, run_dir, data), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env=rank_env, start_new_session=True))  # fmt: skip
    codes = [wait_bounded(p, t0 + timeout_s) for p in procs]
    res = Result(o.name, trial, codes, time.monotonic() - t0)
    res.wrong = judge(o, codes, [p.read_text(errors="replace") for p in logs])
    if not res.wrong and not keep:  # a wrong job's directory stays, for a look
        shutil.rmtree(where, ignore_errors=True)
    return res


def wait_bounded(p: subprocess.Popen, deadline: float) -> int | None:
    """The process's exit status, or None if it was still running at ``deadline`` (then its group is killed)."""
    try:
        return p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None


def judge(o: Outcome, codes: list[int | None], outputs: list[str]) -> list[str]:
    """What was wrong with each rank (empty: every rank ended as it should)."""
    wrong = []
    for r, (got, want, out) in enumerate(zip(codes, o.codes, outputs)):
        if got != want:
            wrong.append(f"rank {r} exited {'(timed out)' if got is None else got}, not {want}: {tail(out)}")
        if "terminate called" in out:
            wrong.append(f"rank {r} aborted: {tail(out)}")
        if "Traceback" in out and not o.traceback:
            wrong.append(f"rank {r} printed a traceback: {tail(out)}")
    if o.says and not any(o.says in out for out in outputs):
        wrong.append(f"no rank said {o.says!r}: {tail(outputs[0])}")
    return wrong


def tail(out: str, n: int = 6) -> str:
    return " | ".join(out.strip().splitlines()[-n:])[-900:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="jobs per outcome")
    ap.add_argument("--concurrency", type=int, default=2, help="jobs at once (each 2 ranks)")
    ap.add_argument("--outcomes", default="", help="comma-separated names (default: all): " + ",".join(
        o.name for o in OUTCOMES))  # fmt: skip
    ap.add_argument("--work", type=Path, default=Path("/tmp/dwmtrain-exit-stress"))
    ap.add_argument("--data", type=Path, default=None, help="a prepared tiny dataset (seq_len 64)")
    ap.add_argument("--seed", type=int, default=0, help="the order the jobs run in")
    ap.add_argument("--job-timeout", type=float, default=180.0)
    ap.add_argument("--budget-s", type=float, default=3600.0, help="no job starts after this many seconds")
    a = ap.parse_args(argv)
    chosen = [o for o in OUTCOMES if not a.outcomes or o.name in a.outcomes.split(",")]
    if not chosen:
        sys.exit(f"exit_stress: --outcomes {a.outcomes}: none of {[o.name for o in OUTCOMES]}")
    a.work.mkdir(parents=True, exist_ok=True)
    data, template = prepare(a)
    jobs = [(o, t) for o in chosen for t in range(1, a.repeat + 1)]
    random.Random(a.seed).shuffle(jobs)
    t0 = time.monotonic()

    def one(job):
        if time.monotonic() - t0 > a.budget_s:
            return None
        return run_job(*job, a.work, data, template, a.job_timeout)

    with ThreadPoolExecutor(a.concurrency) as pool:
        results = [r for r in pool.map(one, jobs) if r is not None]
    return report(chosen, results, a, time.monotonic() - t0)


def prepare(a) -> tuple[Path, Path]:
    """The data (the bundled corpus at seq_len 64, unless ``--data``) and a run stopped at its stage boundary: the
    directory every meta job starts from (a copy each)."""
    data = a.data
    if data is None:
        data = a.work / "data64"
        if not (data / "index.json").is_file():
            from dwmtrain.data.prepare import prepare_data

            prepare_data([str(CORPUS / "sample.jsonl.zst")], str(CORPUS / "sample_sp4096.model"), str(data),
                         seq_len=64, workers=2, progress=False)  # fmt: skip
    boundary = next(o for o in OUTCOMES if o.name == "boundary-stop")
    template = a.work / "meta-template"
    shutil.rmtree(template, ignore_errors=True)
    res = run_job(boundary, 0, a.work, data, None, a.job_timeout, keep=True)
    if res.wrong:
        sys.exit("exit_stress: the boundary run the meta jobs start from failed: " + "; ".join(res.wrong))
    shutil.move(a.work / "jobs" / "boundary-stop-0" / "run", template)
    return data, template


def report(chosen: list[Outcome], results: list[Result], a, wall: float) -> int:
    """N of N per outcome; every wrong rank with its output's last lines; WORK/exit_stress.json."""
    print(f"{'outcome':<16} {'codes':<12} {'right':>9}  {'s/job':>6}")
    bad = []
    for o in chosen:
        mine = [r for r in results if r.outcome == o.name]
        right = sum(not r.wrong for r in mine)
        secs = sum(r.seconds for r in mine) / max(len(mine), 1)
        print(f"{o.name:<16} {str(list(o.codes)):<12} {right:>4} of {len(mine):<3} {secs:>6.1f}")
        bad += [r for r in mine if r.wrong]
    for r in bad:
        print(f"WRONG {r.outcome} #{r.trial}: " + "; ".join(r.wrong))
    total = len(results)
    print(f"{total - len(bad)} of {total} jobs right ({2 * total} ranks), {a.concurrency} at once, in {wall:.0f} s")
    out = {"repeat": a.repeat, "concurrency": a.concurrency, "wall_s": wall, "results": [r.__dict__ for r in results]}
    (a.work / "exit_stress.json").write_text(json.dumps(out, indent=1))
    return 1 if bad or total < len(chosen) * a.repeat else 0


if __name__ == "__main__":
    sys.exit(main())
