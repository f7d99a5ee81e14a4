#!/usr/bin/env python3
"""The GPU pack: one command that, on one lent GPU, proves dwmtrain's GPU paths correct and measures them; the same
parts at tiny sizes on a CPU (``--cpu``: CI runs it, so the pack cannot rot between GPU loans).

    bash tools/gpu/check.sh          # on the device (installs .whl/ first: tools/gpu/wheels.sh builds it)
    bash tools/gpu/check.sh --cpu    # here, with this checkout's environment

Each part runs in its own process with its own time limit (a failing or hung part does not stop the others) and
prints ``name: measured / target`` lines (``  ok`` / ``  SHORT`` where a target is checked). The parts, in order:

    machine    the GPU (name, memory, SMs, driver), torch, CUDA, NCCL, DeepSpeed, transformers
    loss       the fused per-sample loss in bf16 against the full-logits path (loss and gradients against fp32,
               tolerance stated), then its extra memory and time at V=32000 (tools/bench.py loss)
    attention  which scaled-dot-product kernel the LM's attention ran (flash, cuDNN, efficient or math)
    train      a bf16 ``deepspeed`` launch through a stage boundary with a real meta-update and the DWM's broadcast,
               SIGKILLed after the boundary and rerun: every step's loss and DWM version as uninterrupted (1 GPU;
               2 CPU ranks with --cpu: CI's bf16 run)
    step_370m, step_1.3b   tokens/s, MFU (datasheet peak and a measured matmul rate), peak memory, LM alone and
               with the co-located 370M DWM, 8 x 1024; the DWM's overhead against Eq. 9 (tools/bench.py step)
    metastep   one meta-step at 370M against one training step: time, peak memory (tools/bench.py metastep)
    metaacc    the meta-gradient's error in bf16, fp32 and fp32+TF32 against the exact fp64 mode (tools/bench.py)
    boundary   a stage boundary's pause part by part (checkpoint, meta job: start-up, load, steps; broadcast) on
               the 370M preset
    fusedadam  a short run with the default optimizer: DeepSpeed's FusedAdam, JIT-built on the GPU (the other
               launches use torch's AdamW, so a failing build costs only this part)

Everything goes under ``--out`` (``$OUT`` from check.sh): one log per part, ``summary.txt`` (the lines) and
``summary.json`` (per part: status, seconds, its lines parsed into name / measured / target / ok).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "tools" / "bench.py"
CORPUS = ROOT / "dwmtrain" / "data" / "corpus"
NAME = re.compile(r"^[a-z_0-9.]+\.[a-z_0-9.]+\b")  # part.figure, as tools/bench.py names its lines


# ----------------------------------------------------------------------------- sizes: GPU, then --cpu

SIZES = {
    "gpu": {"device": "cuda",
            "loss": ["--vocab-size", "32000", "--hidden", "1024", "--seq-len", "1024", "--micro", "8"],
            "loss_check": (32000, 1024, 1024, 8), "attn_preset": ("370m", 1024),
            "train": {"preset": "small", "seq_len": 256, "ranks": 1},
            "step_370m": ["--preset", "370m", "--dwm-backbone", "370m", "--seq-len", "1024", "--micro", "8",
                          "--vocab-size", "32000", "--reps", "5"],
            "step_1.3b": ["--preset", "1.3b", "--dwm-backbone", "370m", "--seq-len", "1024", "--micro", "8",
                          "--vocab-size", "32000", "--reps", "5"],
            "metastep": ["--preset", "370m", "--dwm-backbone", "370m", "--seq-len", "1024", "--micro", "8",
                         "--vocab-size", "32000", "--reps", "3"],
            "metaacc": ["--preset", "small", "--seq-len", "128", "--micro", "8"],
            "boundary": {"preset": "370m", "seq_len": 1024, "ranks": 1}},
    "cpu": {"device": "cpu", "loss": ["--vocab-size", "4096", "--hidden", "128", "--seq-len", "128", "--micro", "4",
                                      "--reps", "2"],
            "loss_check": (4096, 128, 128, 4), "attn_preset": ("tiny", 64),
            "train": {"preset": "tiny", "seq_len": 64, "ranks": 2},
            "step_370m": ["--preset", "tiny", "--seq-len", "64", "--micro", "2", "--vocab-size", "4096", "--reps", "2"],
            "step_1.3b": ["--preset", "small", "--dwm-backbone", "tiny", "--seq-len", "64", "--micro", "2",
                          "--vocab-size", "4096", "--reps", "2"],
            "metastep": ["--preset", "tiny", "--seq-len", "64", "--micro", "4", "--vocab-size", "4096", "--reps", "2"],
            "metaacc": ["--preset", "tiny", "--seq-len", "32", "--micro", "4", "--fd-eps-list", "1e-3,1e-2,1e-1"],
            "boundary": {"preset": "tiny", "seq_len": 64, "ranks": 1}},
}  # fmt: skip
#: part: (seconds allowed on the GPU, with --cpu)
LIMITS = {"machine": (60, 60), "loss": (90, 90), "attention": (60, 60), "train": (180, 240), "step_370m": (75, 60),
          "step_1.3b": (90, 60), "metastep": (60, 60), "metaacc": (75, 90), "boundary": (120, 120),
          "fusedadam": (150, 60)}  # fmt: skip


def line(name: str, measured: str, target: str, ok: bool | None = None) -> str:
    return f"{name}: {measured} / {target}" + ("" if ok is None else "  ok" if ok else "  SHORT")


# ----------------------------------------------------------------------------- the parts (each in its own process)


def part_machine(a, sz) -> list[str]:
    import torch

    out = []
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        driver = _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "?"
        out.append(line("machine.gpu", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
                        f"driver {driver}, {torch.cuda.device_count()} visible", "-"))  # fmt: skip
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        cuda = f"CUDA {torch.version.cuda}, NCCL {nccl}, cuDNN {torch.backends.cudnn.version()}"
    else:
        cuda = "no CUDA device"
        out.append(line("machine.cpu", f"{os.cpu_count()} cores, {_cmd(['uname', '-m'])}", "-"))
    versions = []
    for mod in ("deepspeed", "transformers", "datasets", "tokenizers", "dwmtrain"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # a missing wheel is a finding, not a crash
            versions.append(f"{mod} MISSING ({type(e).__name__})")
    out.append(line("machine.software", f"python {sys.version.split()[0]}, torch {torch.__version__}, {cuda}, "
                    + ", ".join(versions), "-"))  # fmt: skip
    return out


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def part_loss(a, sz) -> list[str]:
    """The fused loss in bf16 and the full-logits path in bf16, both against fp32 full logits: the fused path's
    error must stay within 1.5x the full-logits bf16 error (+ a floor), then tools/bench.py loss."""
    import torch

    from dwmtrain.models.loss import fused_weighted_loss, per_sample_loss, weighted_loss

    dev = torch.device(sz["device"])
    V, H, T, B = sz["loss_check"]
    g = torch.Generator().manual_seed(0)
    h0, W0 = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.02
    y, w = torch.randint(0, V, (B, T), generator=g).to(dev), (torch.rand(B, generator=g) * 2).to(dev)

    def run(dtype, fused: bool):
        h, W = h0.to(dev, dtype, copy=True).requires_grad_(), W0.to(dev, dtype, copy=True).requires_grad_()
        loss = fused_weighted_loss(h, W, y, w)[0] if fused else weighted_loss(per_sample_loss(h @ W.t(), y), w)
        loss.backward()
        return loss.detach().double().cpu(), h.grad.double().cpu(), W.grad.double().cpu()

    ref, full, fused = run(torch.float32, False), run(torch.bfloat16, False), run(torch.bfloat16, True)

    def err(x):
        return [((a_ - b_).norm() / b_.norm()).item() for a_, b_ in zip(x, ref)]

    ef, eb = err(fused), err(full)
    ok = all(f <= 1.5 * b + 1e-3 for f, b in zip(ef, eb))
    size = f"V={V} T={T} B={B} H={H}"
    out = [line(f"loss.bf16_fused vs fp32 full logits ({size}; loss, dh, dW relative error)",
                ", ".join(f"{e:.1e}" for e in ef), "<= 1.5x the bf16 full-logits path's ("
                + ", ".join(f"{e:.1e}" for e in eb) + ") + 1e-3", ok)]  # fmt: skip
    return out + bench(sz, "loss", sz["loss"] + ["--dtype", "bf16"])


def bench(sz, name: str, args: list[str]) -> list[str]:
    """tools/bench.py NAME ARGS on the part's device: its result lines."""
    p = subprocess.run([sys.executable, str(BENCH), "--device", sz["device"], name, *args], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    lines = [ln for ln in p.stdout.splitlines() if ln and not ln.startswith("#")]
    if p.returncode:
        raise RuntimeError(f"tools/bench.py {name} exited {p.returncode}:\n{p.stderr[-3000:]}")
    return lines


def part_attention(a, sz) -> list[str]:
    """Profile one forward and backward of the LM with attn_implementation="sdpa" in bf16: which kernel ran."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    dev = torch.device(sz["device"])
    preset, seq = sz["attn_preset"]
    lm = build_lm(ModelSpec.from_preset(preset, 4096, seq), "sdpa", seed=0).to(dev, torch.bfloat16)
    x = torch.randint(0, 4096, (2, seq), device=dev)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        lm(input_ids=x, sample_weights=torch.ones(2, device=dev))[0].backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    names = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key.lower()
                    or "fmha" in e.key.lower()})  # fmt: skip
    fused = [n for n in names if re.search(r"flash|cudnn|efficient|fmha", n, re.I)]
    math_only = any("math" in n for n in names) and not fused
    return [
        line(
            f"attention.kernel (LM {preset}, sdpa, bf16, seq {seq}, {dev.type})",
            ", ".join(names) or "none seen",
            "a fused kernel (flash, cuDNN or efficient), not the math fallback",
            bool(fused) and not math_only,
        )
    ]


def _launch(a, sz, run_dir: Path, cfg: dict, extra: list[str]) -> list[str]:
    """The ``deepspeed`` command of a pack run: the tiny config, bf16, 8 steps in 2 stages, a meta-update."""
    from dwmtrain.distributed.rendezvous import free_port

    port = free_port()
    data = Path(a.out) / "work" / f"data-{cfg['seq_len']}"
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(cfg["ranks"]), "--master_port",
            str(port), str(ROOT / "launchers" / "pretrain.py"), "--config", str(ROOT / "launchers" / "configs" /
            "tiny.yaml"), "--run-dir", str(run_dir), f"model.preset={cfg['preset']}", f"data.seq_len={cfg['seq_len']}",
            f"data.train_data={data}", "deepspeed.precision=bf16", "stages.total_steps=8", "stages.num_stages=2",
            "run.checkpoint_every=100", f"meta.nproc={cfg['ranks']}", "meta.steps=3", "run.threads_per_rank=1",
            "deepspeed.micro_batch_size=8", f"deepspeed.global_batch_size={8 * cfg['ranks']}", *extra]  # fmt: skip


def _records(path: Path) -> dict[int, dict]:
    if not path.is_file():
        return {}
    return {r["step"]: r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())}


LAUNCHED: list[int] = []  # this part's launches (each its own process group): killed with the part


def _kill_launches(*_) -> None:
    """SIGTERM from the runner (the part's time is up): take every launch down with the part."""
    for pgid in LAUNCHED:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(124)


def _run(cmd: list[str], log: Path, kill_at_step: int = 0, metrics: Path | None = None) -> int:
    """Run ``cmd`` (its own process group) into ``log``; with ``kill_at_step``, SIGKILL it once metrics.jsonl
    shows that step. Returns the exit code (-9 when killed)."""
    # deterministic cuBLAS reductions (what an exact resume needs on CUDA; no effect on a CPU)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    with open(log, "ab") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env)
        LAUNCHED.append(p.pid)
        try:
            while p.poll() is None:
                if kill_at_step and max(_records(metrics), default=0) >= kill_at_step:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    return -9
                time.sleep(0.1)
            return p.returncode
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def part_train(a, sz) -> list[str]:
    cfg = sz["train"]
    work = Path(a.out) / "work"
    full, killed = work / "train-full", work / "train-killed"
    log = Path(a.out) / "train.runs.log"
    t0 = time.time()
    extra = ["optimizer.implementation=torch"]  # DeepSpeed's FusedAdam JIT build has its own part (fusedadam)
    if rc := _run(_launch(a, sz, full, cfg, extra), log):
        raise RuntimeError(f"the uninterrupted bf16 run exited {rc} (log: {log})")
    t_full = time.time() - t0
    if (rc := _run(_launch(a, sz, killed, cfg, extra), log, kill_at_step=6, metrics=killed / "metrics.jsonl")) != -9:
        raise RuntimeError(f"the run to be killed at step 6 exited {rc} first (log: {log})")
    latest = json.loads((killed / "checkpoints" / "latest.json").read_text())["step"]
    if rc := _run(_launch(a, sz, killed, cfg, extra), log):
        raise RuntimeError(f"the rerun after SIGKILL exited {rc} (log: {log})")
    ra, rb = _records(full / "metrics.jsonl"), _records(killed / "metrics.jsonl")
    same = all((ra[s]["loss"], ra[s]["dwm"]) == (rb[s]["loss"], rb[s]["dwm"]) for s in range(1, 9))
    worst = max(abs(ra[s]["loss"] - rb[s]["loss"]) for s in range(1, 9))
    fitted = ra[8]["dwm"] != "uniform" and ra[8]["w_max"] > ra[8]["w_min"]
    pause = json.loads((full / "meta" / "stage2.pause.json").read_text())
    what = f"{cfg['preset']}, bf16, {cfg['ranks']} rank(s), seq {cfg['seq_len']}"
    return [
        line(f"train.resume ({what}; killed at step 6, resumed from step {latest})",
             "identical losses and DWM versions over 8 steps" if same else f"differs: max |loss diff| {worst:.2e}",
             "identical", same),
        line("train.meta_update (stage 2's DWM fitted on the bf16 checkpoint and broadcast)",
             f"{'weights differ from uniform' if fitted else 'uniform weights'} at step 8, DWM {ra[8]['dwm']}; "
             f"pause {pause['total_s']:.1f} s", "fitted", fitted),
        line("train.loss (step 1 -> 8)", f"{ra[1]['loss']:.3f} -> {ra[8]['loss']:.3f} in {t_full:.0f} s", "falls",
             ra[8]["loss"] < ra[1]["loss"]),
    ]  # fmt: skip


def part_step(name):
    def part(a, sz) -> list[str]:
        return bench(sz, "step", sz[name] + ["--dtype", "bf16"])

    return part


def part_metastep(a, sz) -> list[str]:
    return bench(sz, "metastep", sz["metastep"] + ["--dtype", "bf16"])


def part_metaacc(a, sz) -> list[str]:
    return bench(sz, "metaacc", sz["metaacc"])


def part_boundary(a, sz) -> list[str]:
    cfg = sz["boundary"]
    run_dir = Path(a.out) / "work" / "boundary"
    log = Path(a.out) / "boundary.runs.log"
    # torch's AdamW: this part's figures do not hang on DeepSpeed's FusedAdam compiling (the train part uses it)
    extra = ["stages.total_steps=4", "run.eval_batches=1", "optimizer.implementation=torch"]
    extra += ["dwm.backbone=370m"] if cfg["preset"] == "370m" else []
    if rc := _run(_launch(a, sz, run_dir, cfg, extra), log):
        raise RuntimeError(f"the {cfg['preset']} run exited {rc} (log: {log})")
    p = json.loads((run_dir / "meta" / "stage2.pause.json").read_text())
    m = p.get("meta_job", {})
    steps = _records(run_dir / "metrics.jsonl")
    tps = max(r["tokens_per_s"] for r in steps.values())
    return [
        line(f"boundary.pause ({cfg['preset']}, DWM {'370m' if cfg['preset'] == '370m' else 'tiny'}, seq "
             f"{cfg['seq_len']}, bf16)", f"{p['total_s']:.1f} s = checkpoint {p['checkpoint_s']:.1f} + meta job "
             f"{p['meta_job_s']:.1f} (start-up {m.get('startup_s', 0):.1f}, load LM {m.get('load_lm_s', 0):.1f}, "
             f"meta steps {m.get('meta_steps_s', 0):.1f}) + broadcast {p['broadcast_s']:.2f}", "-"),
        line("boundary.train_tokens_per_s (best step)", f"{tps:,.0f}", "-"),
    ]  # fmt: skip


def part_fusedadam(a, sz) -> list[str]:
    """A short run with the default optimizer: on a GPU, DeepSpeed's FusedAdam, JIT-compiled here (nvcc, ninja)."""
    cfg = sz["train"]
    run_dir = Path(a.out) / "work" / "fusedadam"
    log = Path(a.out) / "fusedadam.runs.log"
    t0 = time.time()
    if rc := _run(_launch(a, sz, run_dir, cfg, ["stages.total_steps=2", "stages.num_stages=1"]), log):
        raise RuntimeError(f"the run with the default optimizer exited {rc} (log: {log})")
    torch_adam = json.loads((run_dir / "deepspeed.json").read_text())["optimizer"]["params"].get("torch_adam")
    opt = "torch's AdamW" if torch_adam else "DeepSpeed's FusedAdam (JIT-built)"
    want = "torch's AdamW" if sz["device"] == "cpu" else "DeepSpeed's FusedAdam (JIT-built)"
    steps = _records(run_dir / "metrics.jsonl")
    return [line(f"fusedadam.run ({cfg['preset']}, bf16, the default optimizer.implementation)",
                 f"{opt} in {time.time() - t0:.0f} s (its build included), loss {steps[max(steps)]['loss']:.3f} at "
                 f"step {max(steps)}", f"{want}, trained", opt == want and max(steps) == 2)]  # fmt: skip


PARTS = {"machine": part_machine, "loss": part_loss, "attention": part_attention, "train": part_train,
         "step_370m": part_step("step_370m"), "step_1.3b": part_step("step_1.3b"), "metastep": part_metastep,
         "metaacc": part_metaacc, "boundary": part_boundary, "fusedadam": part_fusedadam}  # fmt: skip


# ----------------------------------------------------------------------------- the runner


def parse_line(ln: str) -> dict | None:
    """``name: measured / target[  ok|  SHORT][  (why)]`` -> its fields (the name holds no ": ", the target no
    " / "), or None for any other line."""
    if not NAME.match(ln) or ": " not in ln or " / " not in ln:
        return None
    name, rest = ln.split(": ", 1)
    measured, target = rest.rsplit(" / ", 1)
    ok = None
    for mark, value in (("  ok", True), ("  SHORT", False)):
        if mark in target:
            target, ok = target.split(mark, 1)[0], value
    return {"name": name, "measured": measured, "target": target, "ok": ok}


def parse(lines: list[str]) -> list[dict]:
    return [f for f in map(parse_line, lines) if f is not None]


def run_part(a, name: str, limit: float) -> dict:
    """Part ``name`` in a child process within ``limit`` seconds: its status, time and lines."""
    log = Path(a.out) / f"{name}.log"
    argv = [sys.executable, __file__, "--part", name, "--out", a.out] + (["--cpu"] if a.cpu else [])
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=f, text=True, start_new_session=True)
        try:
            stdout, _ = p.communicate(timeout=limit)
            status = "ok" if p.returncode == 0 else f"failed (exit {p.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGTERM)  # the part takes its launches down (_kill_launches)
            try:
                stdout, _ = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                stdout, _ = p.communicate()
            status = f"timeout ({limit:.0f} s)"
        f.write("\n--- stdout\n" + stdout)
    lines = [ln for ln in stdout.splitlines() if parse_line(ln)]
    if status != "ok":
        tail = log.read_text().strip().splitlines()
        why = next((t for t in reversed(tail) if re.search(r"Error|error|Exception", t)), tail[-1] if tail else "")
        lines.append(line(f"{name}.part", status, "ok", False) + f"  ({why[:300]})")
    return {"status": status, "seconds": round(time.time() - t0, 1), "lines": lines, "figures": parse(lines)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="the same parts at tiny sizes on the CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-check"), help="where it all goes")
    ap.add_argument("--only", default="", help="comma-separated parts (default: all, in order)")
    ap.add_argument("--budget", type=float, default=0, help="seconds for all parts (default: 470 on GPU, 900 CPU)")
    ap.add_argument("--part", default="", help=argparse.SUPPRESS)  # a child: run one part
    a = ap.parse_args(argv)
    sz = SIZES["cpu" if a.cpu else "gpu"]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    if a.part:
        signal.signal(signal.SIGTERM, _kill_launches)
        for ln in PARTS[a.part](a, sz):
            print(ln, flush=True)
        return 0
    if not a.cpu:
        import torch

        if not torch.cuda.is_available():
            print("tools/gpu/check.py: no CUDA device (use --cpu for the CPU run)", file=sys.stderr)
            return 2
    only = set(a.only.split(",")) if a.only else set(PARTS)
    if only - set(PARTS):
        print(f"tools/gpu/check.py: --only {a.only}: no part {', '.join(sorted(only - set(PARTS)))} (parts: "
              f"{', '.join(PARTS)})", file=sys.stderr)  # fmt: skip
        return 2
    names = [n for n in PARTS if n in only]  # in the pack's order: the machine first
    budget, t0 = a.budget or (900 if a.cpu else 470), time.time()
    results = {}
    for name in names:
        left = budget - (time.time() - t0)
        limit = min(LIMITS[name][a.cpu], left)
        if limit < 10:
            lines = [line(f"{name}.part", "not run: no time left", "ok", False)]
            results[name] = {"status": "not run (the time budget is spent)", "seconds": 0, "lines": lines,
                             "figures": parse(lines)}  # fmt: skip
            continue
        results[name] = run_part(a, name, limit)
        for ln in results[name]["lines"]:
            print(ln, flush=True)
        print(f"# {name}: {results[name]['status']} in {results[name]['seconds']:.0f} s", flush=True)
        write_summary(a, results, t0)  # after every part: a machine taken back mid-pack still leaves the figures
    return write_summary(a, results, t0, final=True)


def write_summary(a, results: dict, t0: float, final: bool = False) -> int:
    """summary.txt and summary.json of the parts run so far; the pack's exit code (1 if a part failed)."""
    summary = [ln for r in results.values() for ln in r["lines"]]
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    short = [f["name"] for r in results.values() for f in r["figures"] if f["ok"] is False]
    verdict = f"# pack: {len(results) - len(failed)}/{len(results)} parts ran; {len(short)} figures short of target"
    (Path(a.out) / "summary.txt").write_text("\n".join(summary + [verdict]) + "\n")
    report = {"mode": "cpu" if a.cpu else "gpu", "parts": results, "seconds": round(time.time() - t0, 1)}
    (Path(a.out) / "summary.json").write_text(json.dumps(report, indent=1))
    if final:
        print(verdict)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
