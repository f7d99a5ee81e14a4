#!/usr/bin/env python3
"""Chaos soak: a 3-stage bi-level tiny run (2 CPU ranks, a meta-update job of 2 processes at each boundary) hit by
seeded random faults, each followed by a rerun of the same command, as a user or SLURM would; at the end the run
must equal an uninterrupted one and nothing complete may have been changed or lost.

    python tools/chaos.py --seed 0 --faults 6                        # local ranks, local meta job
    python tools/chaos.py --seed 1 --faults 30 --meta external        # the meta job run by "the user" (this tool)
    python tools/chaos.py --seed 2 --faults 30 --hosts two-ssh-hosts  # deepspeed --hostfile, node-local disks
    python tools/chaos.py --seed 3 --faults 30 --slurm                # sbatch pretrain.sbatch on two slurmd nodes

A fault is a moment and an action. The moment is a named fault point (``dwmtrain/faults.py``, ``action=stop``: the
process SIGSTOPs itself there and this tool, watching the processes' states, acts on it) at a random step and rank:
``step`` (a rank starts a step), ``save`` (a rank wrote its checkpoint shards, before the ranks agree), ``marker``
(rank 0 wrote COMPLETE, before latest.json), ``resume`` (a rank loaded its checkpoint), ``broadcast`` (a rank is
inside the DWM's broadcast), ``meta`` (a meta job's rank starts a meta-step), ``dwm-write`` (the DWM's tensors are in
place, its sidecar is not); or ``anytime``: a random process of the run (a rank or a meta job's) at a random time
after the launch. The action is ``kill`` (SIGKILL), ``stall`` (SIGSTOP for a few seconds, well inside
``run.dist_timeout_s``: the run must go on), ``hang`` (a rank stopped for longer than ``run.dist_timeout_s``: the job
must end within a bound with a message naming that rank) or ``usr1`` (SIGUSR1 to every rank, SLURM's time-limit
warning: a complete checkpoint and exit 4).

Checked after every fault: no complete checkpoint or DWM file changed or lost (sha256 of every file, on every
host's disk), no process of the run left, no DeepSpeed /dev/shm buffer left. At the end: every step's loss equal
to the uninterrupted reference run's, every stage's DWM sha256 equal, and the cost of the faults (steps recomputed,
meta jobs rerun, wall time). Every launch and every wait is bounded in time. Prints a summary and writes
WORK/chaos.json; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = ROOT / "launchers" / "configs" / "tiny.yaml"
CORPUS = ROOT / "dwmtrain" / "data" / "corpus"
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
POINTS = {"step": "step", "save": "checkpoint-shards-written", "marker": "checkpoint-marker-written",
          "resume": "resume", "broadcast": "tensor-broadcast", "meta": "meta-step",
          "dwm-write": "dwm-tensors-written"}  # fmt: skip
PHASES = [*POINTS, "anytime"]
ACTIONS = ["kill", "stall", "hang", "usr1"]
LAUNCH_LIMIT_S = 420  # one launch (or one external meta job), faults and all
NODE_WAIT_S = 30  # over ssh hosts: how long a job may go on after its surviving ranks' line (frozen_node_waits)


# ---- the run ------------------------------------------------------------------------------------------------------


def overrides(args, data: Path) -> list[str]:
    return [f"data.train_data={data}", f"stages.total_steps={args.steps}", "stages.num_stages=3",
            f"run.checkpoint_every={args.checkpoint_every}", "run.log_every=1", "run.keep_last=1000",
            f"run.dist_timeout_s={args.dist_timeout}", "run.tensorboard=false", "meta.mode=bilevel", "meta.nproc=2",
            f"meta.steps={args.meta_steps}", f"meta.launch={args.meta}", "run.threads_per_rank=1"]  # fmt: skip


from dwmtrain.distributed.rendezvous import free_port  # noqa: E402
from dwmtrain.procs import stat_fields  # noqa: E402

SLURM_WAIT = """j=$(sbatch --parsable "$@") || exit 2
echo "[chaos] submitted job $j"
while :; do
  s=$(scontrol show job "$j" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
  case "$s" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|"") break ;; esac
  sleep 1
done
rc=$(scontrol show job "$j" 2>/dev/null | grep -o ' ExitCode=[0-9]*' | cut -d= -f2)
echo "[chaos] job $j ended: ${s:-gone}, exit ${rc:-?}"
exit "${rc:-1}"
"""  # submit, then wait for the job's end (a requeue on SIGUSR1 keeps it going), with its exit code


def train_cmd(args, run_dir: Path, data: Path, port: int, hosts: Path | None, log: Path) -> list[str]:
    if args.slurm:  # the documented batch script; its output appended to the launch's log
        batch = ROOT / "launchers" / "slurm" / "pretrain.sbatch"
        return ["bash", "-c", SLURM_WAIT, "sbatch", f"--job-name={slurm_name(run_dir)}", "--nodes=2",
                "--ntasks-per-node=1", f"--output={log}.job", str(batch), str(TINY), str(run_dir),
                *overrides(args, data)]  # fmt: skip
    where = ["--hostfile", str(hosts), "--master_addr", "dwmhost1"] if hosts else ["--num_gpus", "2"]
    return [DEEPSPEED, *where, "--master_port", str(port), str(ROOT / "launchers" / "pretrain.py"), "--config",
            str(TINY), "--run-dir", str(run_dir), *overrides(args, data)]  # fmt: skip


def append_job_log(log: Path) -> None:
    """``--slurm``: the batch job's own output (``--output=LOG.job``) appended to the launch's log."""
    job_log = Path(f"{log}.job")
    if job_log.is_file():
        with open(log, "a") as f:
            f.write(job_log.read_text(errors="replace"))
        job_log.unlink()


def slurm_name(run_dir: Path) -> str:
    """One job name per run directory: ``scancel --name`` ends its jobs."""
    return "chaos-" + hashlib.sha256(str(run_dir).encode()).hexdigest()[:8]


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DWMTRAIN_FAULT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DWMTRAIN_PYTHON": sys.executable, **extra}


def prepare(work: Path) -> Path:
    from dwmtrain.data.prepare import prepare_data

    data = work / "data-64"
    if not (data / "index.json").is_file():
        prepare_data([str(CORPUS / "sample.jsonl.zst")], str(CORPUS / "sample_sp4096.model"), str(data), seq_len=64,
                     workers=2, progress=False)  # fmt: skip
    return data


def steps_of(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return []
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return [r for r in recs if "loss" in r and "step" in r]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in steps_of(run_dir)}  # the last record of a step wins: the kept one


def dwm_shas(run_dir: Path) -> dict[int, str]:
    out = {}
    for side in sorted((run_dir / "dwm").glob("stage*.safetensors.json")):
        out[int(side.name[5:].split(".")[0])] = json.loads(side.read_text()).get("sha256", "")
    return out


def complete_step(run_dir: Path) -> int:
    """The newest complete checkpoint's step (0: none)."""
    tags = [p.parent.name for p in (run_dir / "checkpoints").glob("step*/COMPLETE")]
    return max((int(t[4:]) for t in tags), default=0)


def finished(args, run_dir: Path) -> bool:
    return complete_step(run_dir) == args.steps


def fingerprint(views: list[Path]) -> dict[str, str]:
    """sha256 of every file of every complete checkpoint (on every host's view of the run directory: node-local
    disks hold other ranks' shards) and of every complete DWM file (the sidecar is written last)."""
    from dwmtrain.rundir import RunDir

    out, tags = {}, RunDir(views[0]).complete_tags()
    for i, view in enumerate(views):
        for f in RunDir(view).complete_files(tags):
            out[f"{i}:{f.relative_to(view)}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# ---- processes ----------------------------------------------------------------------------------------------------


def run_processes(run_dir: Path) -> list[dict]:
    """Every live process whose command line names the run directory: {pid, kind (rank | meta | launcher), rank,
    state}."""
    out, key = [], str(run_dir).encode()
    for c in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cl = c.read_bytes()
            if key not in cl:
                continue
            pid = int(c.parent.name)
            if pid == os.getpid():
                continue
            env = dict(kv.split(b"=", 1) for kv in (c.parent / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        fields = stat_fields(pid)
        if not fields or fields[0] in ("Z", "X"):  # gone, or exited and not yet reaped
            continue
        state = fields[0]
        argv, kind = cl.split(b"\0"), "launcher"  # deepspeed's runner and launch, pdsh, ssh, torchrun, srun
        if b"dwmtrain.launch.meta_job" in cl and b"torch.distributed.run" not in cl and b"RANK" in env:
            kind = "meta"  # a meta-update job's worker
        elif any(a.endswith(b"pretrain.py") for a in argv) and any(a.startswith(b"--local_rank") for a in argv):
            kind = "rank"
        elif b"dwmtrain.launch.pretrain" in argv and b"SLURM_PROCID" in env and b"SLURM_STEP_ID" in env:
            kind = "rank"  # an srun task (its rank is SLURM_PROCID)
        rank = env.get(b"RANK", env.get(b"SLURM_PROCID", b"")) if kind != "launcher" else b""
        rank = int(rank) if rank.isdigit() else None
        out.append({"pid": pid, "kind": kind, "rank": rank, "state": state})
    return out


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def shm_buffers(port: int | None) -> list[Path]:
    """DeepSpeed's shared-memory buffers of the launch on ``port`` (None: any; srun's port is SLURM's choice)."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port or '*'}_*"))


# ---- planning -----------------------------------------------------------------------------------------------------


def boundaries(args) -> list[int]:
    n = args.steps // 3
    return [n, 2 * n]


def plan_fault(rng: random.Random, args, run_dir: Path, forced: tuple[str, str] | None, meta_next: bool,
               soon: bool = False) -> dict:  # fmt: skip
    """A fault this launch can meet: its phase, action and the point's conditions, drawn from what lies within
    ``--window`` steps past the newest complete checkpoint (a meta job due there for ``meta``/``dwm-write``, a
    boundary or a resume in stage 2+ for ``broadcast``): a fault far ahead would let the run finish in few faults."""
    ck, dwm = complete_step(run_dir), dwm_shas(run_dir)
    due = [s for s in (2, 3) if s not in dwm]
    near = min(args.steps, ck + args.window)  # moments close ahead, so the run outlasts the faults asked for
    saves = [s for s in range(ck + 1, near + 1) if s % args.checkpoint_every == 0 or s in boundaries(args)]
    bound_near = any(ck < b <= near for b in boundaries(args))  # a broadcast close ahead
    meta_near = bool(due) and ck <= boundaries(args)[due[0] - 2] <= near  # the next meta job too (at a resume)
    if meta_next:  # meta.launch=external: this launch is the meta job
        phases = ["meta", "dwm-write", "anytime"]
    else:  # a resume in stage 2 or 3 broadcasts its DWM too
        phases = ["step", "anytime"] + ["save", "marker"] * bool(saves) + ["resume"] * (ck > 0)
        phases += ["broadcast"] * (bound_near or ck >= boundaries(args)[0])
        phases += ["meta", "dwm-write"] * 3 * (meta_near and args.meta == "local")  # a boundary is rare: weighed up
    phase, action = forced or (rng.choice(phases), None)
    if action is None:  # hang: only a trainer rank (a meta job's worker that hangs is its own timeout's business)
        can_hang = phase in ("step", "save", "resume", "broadcast", "anytime")
        action = rng.choice([a for a in ACTIONS if a != "hang" or can_hang])
    rank = rng.randrange(2)
    f = {"phase": phase, "action": action}
    if phase == "step":
        f.update(point="step", rank=rank, step=rng.randint(ck + 1, near))
    elif phase == "save":
        f.update(point=POINTS[phase], rank=rank, step=rng.choice(saves))
    elif phase == "marker":
        f.update(point=POINTS[phase], rank=0, step=rng.choice(saves))
    elif phase == "resume":
        f.update(point="resume", rank=rank, step=ck)
    elif phase == "broadcast":
        f.update(point=POINTS[phase], rank=rank, index=rng.randrange(4))
    elif phase == "meta":
        f.update(point="meta-step", rank=rank, step=rng.randint(1, args.meta_steps))
    elif phase == "dwm-write":
        f.update(point=POINTS[phase], rank=0, stage=due[0] if due else 2)
    else:
        left = (args.steps - ck) / args.steps  # within what is left of a launch's length, and soon: its start-up
        most = 4.0 if soon else min(10.0, max(5.0, 0.8 * args.launch_s * left))  # or its first steps
        f.update(delay_s=round(rng.uniform(0.5 if soon else 1.0, most), 1))
    return f


CONDITIONS = {"step": ("rank", "step"), "checkpoint-shards-written": ("rank", "step"), "resume": ("rank", "step"),
              "checkpoint-marker-written": ("step",), "tensor-broadcast": ("rank", "index"),
              "meta-step": ("rank", "step"), "dwm-tensors-written": ("stage",)}  # fmt: skip


def spec(f: dict) -> str:
    """The fault as ``DWMTRAIN_FAULT`` (``dwmtrain/faults.py``): the point, its conditions, ``action=stop``."""
    return ":".join([f["point"], *(f"{k}={f[k]}" for k in CONDITIONS[f["point"]]), "action=stop"])


# ---- one launch ---------------------------------------------------------------------------------------------------


class Launch:
    """One command (the training launch, or an external meta job) watched until it ends: its first fault (a fault
    point, or a moment after the start), then, while the soak needs more and the launch goes on (after a stall,
    or a usr1 under ``--slurm``: the requeued job), a fault at a random moment after the last one (``more()``)."""

    def __init__(self, args, run_dir: Path, cmd: list[str], fault: dict | None, more, rng: random.Random, log: Path):
        self.args, self.run_dir, self.cmd, self.rng, self.log = args, run_dir, cmd, rng, log
        self.fault, self.more, self.fired = fault, more, []
        self.next_look, self.said_at, self.ended_by_tool = 0.0, None, None

    def start(self) -> subprocess.Popen:
        env = base_env()
        if self.fault and "point" in self.fault:
            env["DWMTRAIN_FAULT"] = spec(self.fault)
            if self.args.hosts:  # pdsh exports only what DeepSpeed's env file names to the other host
                envf = self.log.parent / "fault.env"
                envf.write_text(f"DWMTRAIN_FAULT={env['DWMTRAIN_FAULT']}")  # one line, no newline (DeepSpeed's
                env["DS_ENV_FILE"] = str(envf)  # reader keeps it in the export)
        self.t0 = self.armed = time.time()
        self.out = open(self.log, "w")
        self.out.write("$ " + shlex.join(self.cmd) + ("\n# DWMTRAIN_FAULT=" + env.get("DWMTRAIN_FAULT", "")) + "\n")
        self.out.flush()
        return subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self.out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip

    def run(self) -> dict:
        p, f, target, resume_at = self.start(), self.fault, None, None
        while p.poll() is None:
            now = time.time()
            if now > self.t0 + LAUNCH_LIMIT_S:
                self.kill_all(p)
                return self.result(p, "launch limit exceeded")
            if f is not None and resume_at is None and (target := self.moment(f, now)):
                f.update(target=f"{target['kind']} {target['rank']}", fired_s=round(now - self.t0, 1))
                self.fired.append(f)
                resume_at = self.act(f, target, now)
                f = None
            if (f is None or "point" not in f) and resume_at is None and self.args.slurm:  # a requeued job (usr1)
                for q in run_processes(self.run_dir):  # meets a fired fault's point again (new processes): it goes on
                    if q["state"] == "T" and q["pid"] != (target or {}).get("pid") and q["kind"] in ("rank", "meta"):
                        signal_pid(q["pid"], signal.SIGCONT)
            if self.frozen_node_waits(now):
                self.kill_all(p)
                return self.result(p, "")
            if resume_at is not None and now >= resume_at:  # a stall's end (or a usr1's pause)
                signal_pid(target["pid"], signal.SIGCONT)
                resume_at, self.armed = None, now
                action = self.fired[-1]["action"]
                if action == "stall" or (action == "usr1" and self.args.slurm):  # it goes on (SLURM requeues a
                    # usr1's job: the same launch): a fault at a random moment from now
                    f = self.more(len(self.fired))
            time.sleep(0.05)
        if resume_at is not None:
            signal_pid(target["pid"], signal.SIGCONT)
        if f is not None:
            self.unfired = f
        return self.result(p, "")

    def frozen_node_waits(self, now: float) -> bool:
        """Over ssh hosts, after a hang: whether the surviving ranks said their line more than ``NODE_WAIT_S`` ago
        while the job goes on. pdsh waits for every node's launcher, and the hung rank's node waits on its frozen
        rank, so such a job ends only when someone ends it (on a cluster, the scheduler): this tool does, as a
        user would, and records it (``ended_by_tool``)."""
        if not self.args.hosts or not any(f["action"] == "hang" for f in self.fired) or now < self.next_look:
            return False
        self.next_look = now + 1.0
        said = any(m in self.log.read_text(errors="replace") for m in ("error (PeerLost)", "error (RendezvousError)"))
        self.said_at = (self.said_at or now) if said else None
        if self.said_at is not None and now - self.said_at > NODE_WAIT_S:
            self.ended_by_tool = round(now - self.said_at, 1)
            return True
        return False

    def moment(self, f: dict, now: float) -> dict | None:
        """The process the fault acts on, if its moment has come: a rank or meta worker stopped at the fault point,
        or, for a timed fault, a random live one once its delay has passed (then stopped, unless it is killed)."""
        procs = run_processes(self.run_dir)
        if "point" in f:
            return next((q for q in procs if q["state"] == "T" and q["kind"] in ("rank", "meta")), None)
        kinds = ("rank",) if f["action"] in ("hang", "usr1") else ("rank", "meta")
        live = [q for q in procs if q["kind"] in kinds and q["state"] != "T"]
        if now - self.armed < f["delay_s"] or not live:
            return None
        target = self.rng.choice(live)
        if f["action"] != "kill":
            signal_pid(target["pid"], signal.SIGSTOP)
        return target

    def act(self, f: dict, target: dict, now: float) -> float | None:
        """Do the fault's action to the stopped ``target``; returns when to SIGCONT it (None: never)."""
        if f["action"] == "kill":
            signal_pid(target["pid"], signal.SIGKILL)
            return None
        if f["action"] == "usr1":  # SLURM's --signal=USR1@T reaches every task of the step
            for q in run_processes(self.run_dir):
                if q["kind"] == "rank":
                    signal_pid(q["pid"], signal.SIGUSR1)
            return now + 0.5
        if f["action"] == "stall":
            return now + self.rng.uniform(1.0, self.args.dist_timeout / 3)
        return None  # hang: stopped until the job has ended (the launcher kills it)

    def kill_all(self, p: subprocess.Popen) -> None:
        if self.args.slurm:
            subprocess.run(["scancel", f"--name={slurm_name(self.run_dir)}"], check=False, timeout=60)
        for q in run_processes(self.run_dir):
            signal_pid(q["pid"], signal.SIGKILL)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=30)

    def result(self, p: subprocess.Popen, problem: str) -> dict:
        self.out.close()
        append_job_log(self.log)
        text = self.log.read_text(errors="replace")
        r = {"rc": p.returncode, "seconds": round(time.time() - self.t0, 1), "faults": self.fired,
             "unfired": getattr(self, "unfired", None), "problems": [problem] if problem else [],
             "ended_by_tool": self.ended_by_tool}  # fmt: skip
        for f in (f for f in self.fired if f["action"] == "hang"):
            ended = r["seconds"] - f["fired_s"]
            wait = 60 if self.args.slurm else 30  # srun --wait=60, or DeepSpeed's launcher's SIGTERM wait
            bound = self.args.dist_timeout + 20 + wait + 30  # collective timeout + roll call + that wait + slack
            named = f"rank {f['target'].split()[1]} (" in text and "stopped answering" in text
            if not named and "did not arrive (not started, or stopped answering)" not in text:  # or, hung before
                r["problems"].append(f"hang of {f['target']}: no message naming it")  # the rendezvous: rank 0's line
            if ended > bound:
                r["problems"].append(f"hang of {f['target']}: the job ended {ended:.0f} s after it, bound {bound} s")
        return r


# ---- the soak -----------------------------------------------------------------------------------------------------


def wait_gone(run_dir: Path, limit_s: float = 60.0) -> list[dict]:
    """The run's processes still alive after ``limit_s`` (each is then killed, so the soak can go on)."""
    t0 = time.time()
    while (left := run_processes(run_dir)) and time.time() - t0 < limit_s:
        for q in left:
            if q["state"] == "T":
                signal_pid(q["pid"], signal.SIGCONT)  # a stopped process cannot act on the launcher's SIGTERM
        time.sleep(0.2)
    for q in left:
        signal_pid(q["pid"], signal.SIGKILL)
    return left


def reference(args, data: Path) -> Path:
    """The uninterrupted run (kept in WORK/ref for the next soak of the same size); sets ``args.launch_s``, its
    wall time, the scale of an ``anytime`` fault's delay."""
    ref, took = args.work / "ref", args.work / "ref.seconds"
    if not finished(args, ref):
        shutil.rmtree(ref, ignore_errors=True)
        a = argparse.Namespace(**{**vars(args), "meta": "local"})
        ref.mkdir(parents=True)
        log = ref.parent / "ref.log"
        cmd, t0 = train_cmd(a, ref, data, free_port(), None, log), time.time()
        with open(log, "w") as out:
            p = subprocess.run(cmd, cwd=ROOT, env=base_env(), stdout=out, stderr=subprocess.STDOUT, timeout=900)
        append_job_log(log)
        if p.returncode != 0 or not finished(args, ref):
            sys.exit(f"chaos: the reference run failed (exit {p.returncode}); see {ref.parent / 'ref.log'}")
        took.write_text(f"{time.time() - t0:.1f}\n")
    args.launch_s = float(took.read_text()) if took.is_file() else 30.0
    return ref


def setup_hosts(args, run_dir: Path) -> Path:
    services = ROOT / ".ci" / "services"
    for extra in ([], ["--restart-host2", "--private", str(run_dir)]):
        subprocess.run(["bash", str(services / "sshd.sh"), *extra], check=True, capture_output=True, timeout=300)
    hosts = args.work / "hosts"
    hosts.write_text("dwmhost1 slots=1\ndwmhost2 slots=1\n")
    return hosts


def parse_plan(text: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, text.split(",")):
        phase, _, action = item.partition(":")
        if phase not in PHASES or action not in ACTIONS:
            sys.exit(f"chaos: --plan {item!r}: phase must be one of {PHASES}, action one of {ACTIONS}")
        out.append((phase, action))
    return out


def soak(args) -> dict:
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work)
    if args.slurm:  # before the reference: with --slurm it is a batch job too
        subprocess.run(["bash", str(ROOT / ".ci" / "services" / "slurm.sh")], check=True, capture_output=True,
                       timeout=300)  # fmt: skip
    ref = reference(args, data)
    run_dir = args.work / "chaos"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(Path(f"{run_dir}.host2"), ignore_errors=True)
    hosts = setup_hosts(args, run_dir) if args.hosts else None
    views = [run_dir] + ([Path(f"{run_dir}.host2")] if hosts else [])
    logs = args.work / "launches"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    plan, t_start, records, problems, seen = parse_plan(args.plan), time.time(), [], [], {}
    meta_cmd, meta_runs, reached, recomputed, carry = None, 0, 0, 0, None
    fired = lambda: sum(len(r["faults"]) for r in records)  # noqa: E731
    for n in range(args.faults + 40):  # every fault, then reruns until the run is finished (bounded)
        if finished(args, run_dir) and meta_cmd is None:
            break
        fault = None
        if fired() < args.faults:  # a fault the last launch ended before is this launch's (not lost from the plan)
            forced = (carry["phase"], carry["action"]) if carry else plan.pop(0) if plan else None
            fault = plan_fault(rng, args, run_dir, forced, meta_cmd is not None)

        def more(in_launch: int):  # after a stall (or a requeue), while the soak needs faults: a random moment
            if fired() + in_launch >= args.faults:
                return None
            forced = ("anytime", plan.pop(0)[1]) if plan else ("anytime", None)
            return plan_fault(rng, args, run_dir, forced, False, soon=True)  # within seconds of the stall's end

        port, ck = free_port(), complete_step(run_dir)
        recomputed += max(0, reached - ck)  # steps the last launch took past the checkpoint this one resumes from
        cmd = meta_cmd or train_cmd(args, run_dir, data, port, hosts, logs / f"{n:03d}.log")
        meta_runs += meta_cmd is not None
        launch = Launch(args, run_dir, cmd, fault, more, rng, logs / f"{n:03d}.log")
        r = launch.run()
        r.update(launch=n, meta_job=meta_cmd is not None, resumed_at=ck)
        reached = max([ck, *losses(run_dir)])
        left = wait_gone(run_dir)
        if left:
            r["problems"].append(f"processes left after the launch ended: {[(q['kind'], q['pid']) for q in left]}")
        if shm := shm_buffers(None if args.slurm else port):
            r["problems"].append(f"/dev/shm buffers left: {[s.name for s in shm]}")
            for s in shm:
                s.unlink(missing_ok=True)
        now = fingerprint(views)
        changed = [k for k, h in seen.items() if now.get(k) != h]
        if changed:
            r["problems"].append(f"complete files changed or lost: {changed[:5]}")
        seen.update(now)
        text = (logs / f"{n:03d}.log").read_text(errors="replace")
        meta_cmd = None
        if r["rc"] == 3 and "rerun this command:\n" in text:  # meta.launch=external: the user runs the meta job
            meta_cmd = shlex.split(text.split("rerun this command:\n", 1)[1].splitlines()[0])
            meta_cmd = meta_cmd[1:] if meta_cmd[0].endswith(":") else meta_cmd  # pdsh's "HOST: " prefix
        elif r["rc"] not in (0, 4) and not r["faults"]:
            r["problems"].append(f"exit {r['rc']} with no fault fired (see {logs / f'{n:03d}.log'})")
        carry = r["unfired"]
        records.append(r)
        problems += [f"launch {n}: {p}" for p in r["problems"]]
        say = f"launch {n:3d}: exit {r['rc']} in {r['seconds']:6.1f} s" + ("  (meta job)" if r["meta_job"] else "")
        if r["ended_by_tool"]:
            say += f"  (ended by this tool {r['ended_by_tool']} s after the surviving ranks' line)"
        for f in r["faults"] + ([r["unfired"]] if r["unfired"] else []):
            where = {k: v for k, v in f.items() if k in ("rank", "step", "index", "stage", "delay_s", "target")}
            say += f"\n    {f['phase']:9s} {f['action']:5s} {where}" + ("" if "target" in f else "  (did not fire)")
        print(say + "".join(f"\n    PROBLEM {p}" for p in r["problems"]), flush=True)
    return summarize(args, ref, run_dir, records, problems, meta_runs, recomputed, time.time() - t_start)


def summarize(args, ref: Path, run_dir: Path, records: list[dict], problems: list[str], meta_runs: int,
              recomputed: int, seconds: float) -> dict:  # fmt: skip
    a, b = losses(ref), losses(run_dir)
    if not finished(args, run_dir):
        problems.append("the run did not finish")
    missing = [s for s in range(1, args.steps + 1) if s not in b]
    differ = [s for s in range(1, args.steps + 1) if s in b and b[s] != a.get(s)]
    if missing or differ:
        problems.append(f"steps missing {missing[:10]}, losses differing from the reference at {differ[:10]}")
    if dwm_shas(run_dir) != dwm_shas(ref):
        problems.append(f"DWM sha256 differ: {dwm_shas(run_dir)} vs the reference's {dwm_shas(ref)}")
    fired = [f for r in records for f in r["faults"]]
    meta_logs = sorted((run_dir / "meta").glob("stage*.log")) if (run_dir / "meta").is_dir() else []
    meta_jobs = meta_runs if args.meta == "external" else sum(f.read_text(errors="replace").count("\n$ ")
                                                              for f in meta_logs)  # fmt: skip
    out = {
        "seed": args.seed, "hosts": args.hosts or ("two-slurm-nodes" if args.slurm else "one"),
        "meta": args.meta, "faults_asked": args.faults, "faults": len(fired),
        "by_kind": dict(Counter(f"{f['phase']}:{f['action']}" for f in fired)),
        "did_not_fire": sum(1 for r in records if r["unfired"]), "launches": len(records),
        "ended_by_tool": sum(1 for r in records if r["ended_by_tool"]),
        "steps": args.steps, "steps_recomputed": recomputed, "meta_jobs": meta_jobs,
        "meta_jobs_reference": 2, "wall_s": round(seconds, 1), "survived": not problems, "problems": problems,
    }  # fmt: skip
    (args.work / "chaos.json").write_text(json.dumps({**out, "launches_detail": records}, indent=1, default=str))
    print(f"\nchaos seed {args.seed} ({out['hosts']} host(s), meta job {args.meta}): {out['faults']} faults fired "
          f"(of {args.faults} asked) in {out['launches']} launches, {out['wall_s']:.0f} s")  # fmt: skip
    for k, v in sorted(out["by_kind"].items()):
        print(f"  {k:22s} {v}")
    print(
        f"steps recomputed {out['steps_recomputed']} (of {args.steps}); meta-update jobs {meta_jobs} (2 without faults)"
    )
    print(f"losses of all {args.steps} steps equal to the reference: {not missing and not differ}; DWMs equal: "
          f"{dwm_shas(run_dir) == dwm_shas(ref)}")  # fmt: skip
    print("SURVIVED: every check held" if out["survived"] else "FAILED:\n  " + "\n  ".join(problems))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faults", type=int, default=6, help="faults that fire (the soak then finishes the run)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "chaos")
    ap.add_argument(
        "--hosts",
        choices=["two-ssh-hosts"],
        default=None,
        help="deepspeed --hostfile over the loopback ssh hosts (.ci/services/sshd.sh), node-local disks",
    )
    slurm = "each launch: launchers/slurm/pretrain.sbatch on two slurmd nodes (.ci/services/slurm.sh)"
    ap.add_argument("--slurm", action="store_true", help=slurm)
    ap.add_argument("--meta", choices=["local", "external"], default="local", help="meta.launch")
    ap.add_argument("--steps", type=int, default=24, help="the run's steps (3 stages)")
    ap.add_argument("--checkpoint-every", type=int, default=2)
    ap.add_argument("--window", type=int, default=6, help="a step or save fault lies at most this far past the "
                    "newest complete checkpoint (a longer run with a short window takes more faults)")  # fmt: skip
    ap.add_argument("--meta-steps", type=int, default=3)
    ap.add_argument("--dist-timeout", type=int, default=15, help="run.dist_timeout_s")
    ap.add_argument("--plan", default="", help="the first faults, PHASE:ACTION,... (the rest drawn at random)")
    args = ap.parse_args(argv)
    if args.slurm and (args.hosts or args.meta == "external"):  # the stage pipeline's meta jobs: test_slurm.py
        ap.error("--slurm runs one launch path: not with --hosts, and with meta.launch=local")
    if args.steps % 3 or args.steps < 6:
        ap.error("--steps: a multiple of 3, at least 6")
    args.work = args.work.resolve()
    return args


def main(argv=None) -> int:
    out = soak(parse_args(argv))
    return 0 if out["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())
