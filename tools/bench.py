#!/usr/bin/env python3
"""dwmtrain's benchmark suite: each hot path measured side by side with what it is compared to, in one run.

Every benchmark prints lines ``name: measured / target``; a ratio is taken between two variants measured
in the same run (interleaved repetitions, or sibling processes for peak memory), because an absolute time
on a shared CPU means little. Figures and commands go into docs/benchmarks.md.

    python tools/bench.py --quick                 # every CPU benchmark at sizes that finish in < 10 min here
    python tools/bench.py --only loss,meta         # some of them, each with its own defaults
    python tools/bench.py loss --hidden 1024 --reps 3                                  # one, with its options
    python tools/bench.py --device cuda step --preset 1.3b --dwm-backbone 370m --seq-len 1024 --dtype bf16
    python tools/bench.py NAME --help             # a benchmark's own options

Benchmarks:
  loss     the training loss at vocab 32,000 / seq 1,024 / micro-batch 8: the fused, chunked LM-head loss
           against the full-logits path. Extra peak memory (target <= 0.25x) and time (target <= 1.0x).
  step     LM step with and without the frozen DWM forward: overhead against the paper's Eq. 9
           prediction 2*P_w / 6*P (target: measured <= predicted). On CUDA also tokens/s, MFU, memory.
  meta     the fd meta-step against the textbook unrolled create_graph step (Meta-Weight-Net / higher):
           time and peak memory (target <= 1.0x each), and their meta-gradients' agreement.
  dwmcompile  the frozen DWM's forward, eager against torch.compile (time, compile time, agreement).
  metastep one fd meta-step (the meta job's) against one training step of the same LM: time, peak memory.
  metaacc  the meta-gradient dR/dw in fp32 and bf16 (and fp32 with TF32 matmuls on CUDA) against the exact
           one (per_sample mode in fp64), with the fd step's error across fd_eps, and the error of the
           default (fd_eps by dtype and parameter norm, metagrad.FD_EPS) against the grid's best (<= 3x).
  prepare  prepare-data end to end against raw sentencepiece encoding of the same text on one core,
           with 1 and 2 workers (target >= 0.8 of the raw rate per worker, 2 workers >= 1.8x one).
  loop     dwmtrain's uniform training step against the bare DeepSpeed + Hugging Face loop a user writes instead,
           both launched on 2 CPU ranks (tools/bench_loop.py): time per optimizer step (target <= 1.0x).
  build    host memory per rank while the LM is built at start-up (--ranks gloo processes): the partitioned
           build (zero.Init, rank 0 alone builds the seeded copy) against every rank building the full LM.
           Target: each rank holds at most 1.1/ranks of the full LM after the build; peaks reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CORPUS = ROOT / "dwmtrain" / "data" / "corpus"


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev) -> float:
    """Seconds one call of ``fn`` takes (synchronized on CUDA)."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def interleaved(fns: dict, dev, reps: int) -> dict[str, float]:
    """Median time of each function, repetitions interleaved so that drifts hit all alike (after a warm-up)."""
    for f in fns.values():
        f()
    times: dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(timed(f, dev))
    return {k: statistics.median(v) for k, v in times.items()}


def line(name: str, measured: str, target: str, ok: bool | None = None) -> str:
    mark = "" if ok is None else ("  ok" if ok else "  SHORT")
    return f"{name}: {measured} / {target}{mark}"


def peak_in_child(a, variant: str, env: dict | None = None) -> dict:
    """Run benchmark ``a.bench`` with its options as ``a`` holds them in a child process (with ``env`` added to its
    environment), as a peak-memory probe of ``variant``; the child prints a JSON line with the result."""
    args = ["--device", a.device, a.bench, *option_argv(PARSERS[a.bench], a), "--probe", variant]
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=1200,
                       env={**os.environ, **(env or {})})  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"probe {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    for ln in open("/proc/self/status"):
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_during(fn, dev) -> float:
    """MiB ``fn`` needed at its peak above what was allocated when it started (GPU memory on CUDA, else the
    process's resident set)."""
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base


# ----------------------------------------------------------------------------------------------- loss


def _loss_inputs(a, dev):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(a.micro, a.seq_len, a.hidden, generator=g).to(dev, a.torch_dtype).requires_grad_()
    W = (torch.randn(a.vocab_size, a.hidden, generator=g) * 0.02).to(dev, a.torch_dtype).requires_grad_()
    y = torch.randint(0, a.vocab_size, (a.micro, a.seq_len), generator=g).to(dev)
    w = torch.rand(a.micro, generator=g).to(dev) * 2
    return h, W, y, w


def _loss_fns(a, dev):
    from dwmtrain.models.loss import fused_weighted_loss, per_sample_loss, weighted_loss

    h, W, y, w = _loss_inputs(a, dev)

    def logits_path():
        weighted_loss(per_sample_loss(h @ W.t(), y), w).backward()
        h.grad = W.grad = None

    def fused():
        fused_weighted_loss(h, W, y, w, chunk=a.chunk)[0].backward()
        h.grad = W.grad = None

    return {"logits": logits_path, "fused": fused}


def probe_loss(a) -> None:
    """Child process: extra peak memory of one loss forward+backward over the inputs (RSS high-water mark)."""
    dev = torch.device(a.device)
    print(json.dumps({"extra_mib": peak_during(_loss_fns(a, dev)[a.probe], dev)}))


def bench_loss(a) -> list[str]:
    dev = torch.device(a.device)
    mem = {v: peak_in_child(a, v)["extra_mib"] for v in ("logits", "fused")}
    t = interleaved(_loss_fns(a, dev), dev, a.reps)
    size = f"V={a.vocab_size} T={a.seq_len} B={a.micro} H={a.hidden} {a.dtype}, chunk {a.chunk}"
    mr, tr = mem["fused"] / max(mem["logits"], 1e-9), t["fused"] / t["logits"]
    return [
        line(f"loss.extra_memory fused/logits ({size})",
             f"{mr:.3f}x ({mem['fused']:.0f} vs {mem['logits']:.0f} MiB)", "<= 0.25x", mr <= 0.25),
        line(f"loss.time fused/logits ({size})",
             f"{tr:.2f}x ({t['fused'] * 1e3:.0f} vs {t['logits'] * 1e3:.0f} ms fwd+bwd)", "<= 1.0x", tr <= 1.0),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- actckpt

CKPT_VARIANTS = {"off": 0, "full": 1, "every2": 2}


def _ckpt_step(a, dev, every: int):
    """One LM forward+backward (fused weighted loss) with activation checkpointing every ``every``-th layer."""
    from dwmtrain.models.lm import build_lm, enable_activation_checkpointing
    from dwmtrain.models.spec import ModelSpec

    lm = build_lm(ModelSpec.from_preset(a.preset, a.vocab_size, a.seq_len), seed=0).to(dev, a.torch_dtype).train()
    enable_activation_checkpointing(lm, every)
    x = torch.randint(0, lm.config.vocab_size, (a.micro, a.seq_len), generator=torch.Generator().manual_seed(0))
    x, w = x.to(dev), torch.ones(a.micro, device=dev)

    def step():
        lm(input_ids=x, sample_weights=w)[0].backward()
        for p in lm.parameters():
            p.grad = None

    step()  # the gradients' first allocation and the allocator's warm-up are not the activations' cost
    return step


def probe_actckpt(a) -> None:
    dev = torch.device(a.device)
    print(json.dumps({"extra_mib": peak_during(_ckpt_step(a, dev, CKPT_VARIANTS[a.probe]), dev)}))


def bench_actckpt(a) -> list[str]:
    """Activation checkpointing (model.activation_checkpointing) against none: the step's peak memory above the
    model states, and its time."""
    dev = torch.device(a.device)
    mem = {v: peak_in_child(a, v)["extra_mib"] for v in CKPT_VARIANTS}
    t = interleaved({v: _ckpt_step(a, dev, k) for v, k in CKPT_VARIANTS.items()}, dev, a.reps)
    size = f"{a.preset}, {a.micro}x{a.seq_len} {a.dtype} on {dev.type}"
    out = []
    for v in ("full", "every2"):
        mr, tr = mem[v] / max(mem["off"], 1e-9), t[v] / t["off"]
        out += [
            line(f"actckpt.peak_activations {v}/off ({size})", f"{mr:.3f}x ({mem[v]:.0f} vs {mem['off']:.0f} MiB)",
                 "< 1x" if v == "every2" else "<= 0.5x", mr < 1 if v == "every2" else mr <= 0.5),
            line(f"actckpt.step_time {v}/off", f"{tr:.2f}x ({t[v] * 1e3:.0f} vs {t['off'] * 1e3:.0f} ms)", "-"),
        ]  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- step


def matmul_flops(dev, dtype, n: int = 0, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in ``dtype`` measured here (mean of ``reps`` after three warm-ups; n:
    8192 on CUDA, 512 on a CPU): the rate MFU is set against beside the datasheet's."""
    n = n or (8192 if dev.type == "cuda" else 512)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
    for _ in range(3):
        x @ y
    t = timed(lambda: [x @ y for _ in range(reps)], dev)
    return 2 * n**3 * reps / t


def bench_step(a) -> list[str]:
    """LM step (forward, backward, AdamW) with and without the frozen DWM's forward: the DWM's overhead against the
    paper's Eq. 9 (2 P_w / 6 P); tokens/s; on CUDA the MFU of the LM's model FLOPs (6N + attention) against the
    datasheet's dense bf16 peak and against a matrix product's rate measured in the same run, and peak memory."""
    from dwmtrain.accelerators import peak_flops
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch, dwm_forward_flops_per_token
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec, model_flops_per_token

    dev = torch.device(a.device)
    dt = a.torch_dtype
    torch.manual_seed(0)
    spec = ModelSpec.from_preset(a.preset, a.vocab_size, a.seq_len)
    lm = build_lm(spec, seed=0).to(dev, dt)
    V = lm.config.vocab_size
    arch = DWMArch(a.dwm_backbone or a.preset, V, a.seq_len)
    dwm = DataWeightingModel(arch).to(dev, dt).eval().requires_grad_(False)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randint(0, V, (a.micro, a.seq_len), device=dev)
    P, Pw = spec.num_parameters(), sum(p.numel() for p in dwm.parameters())

    def lm_step(w=None):
        w = torch.ones(a.micro, device=dev) if w is None else w
        lm(input_ids=x, sample_weights=w)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def lm_step_dwm():
        with torch.inference_mode():
            w = dwm(x).float()
        lm_step(w.clone())

    t = interleaved({"lm": lm_step, "dwm": lm_step_dwm}, dev, a.reps)
    tokens = a.micro * a.seq_len
    measured, predicted = t["dwm"] / t["lm"] - 1, Pw / (3 * P)
    size = f"LM {a.preset} ({P:,}), DWM {arch.backbone} ({Pw:,}), {a.micro}x{a.seq_len} {a.dtype} on {dev.type}"
    out = [
        line(f"step.dwm_overhead ({size})", f"{100 * measured:.1f}% ({t['lm'] * 1e3:.0f} -> {t['dwm'] * 1e3:.0f} ms)",
             f"<= Eq. 9's {100 * predicted:.1f}%", measured <= predicted),
        line("step.tokens_per_s (LM alone / with DWM)", f"{tokens / t['lm']:.0f} / {tokens / t['dwm']:.0f}", "-"),
    ]  # fmt: skip
    flops = model_flops_per_token(spec, a.seq_len)  # per token, forward and backward
    dwm_flops = dwm_forward_flops_per_token(arch, a.seq_len, Pw)
    rate = matmul_flops(dev, dt)
    out.append(line("step.mfu_vs_measured_matmul (LM alone / LM FLOPs with DWM / LM+DWM FLOPs)",
                    f"{100 * flops * tokens / t['lm'] / rate:.1f}% / {100 * flops * tokens / t['dwm'] / rate:.1f}% / "
                    f"{100 * (flops + dwm_flops) * tokens / t['dwm'] / rate:.1f}% of {rate / 1e12:.1f} TFLOP/s "
                    f"measured ({a.dtype} matmul)", "-"))  # fmt: skip
    peak = peak_flops(torch.cuda.get_device_name()) if dev.type == "cuda" else None
    if peak:
        lm_mfu, with_dwm = flops * tokens / t["lm"] / peak, flops * tokens / t["dwm"] / peak
        out += [
            line(f"step.mfu (LM alone, 6N + attention, of {peak / 1e12:.0f} TFLOP/s)", f"{100 * lm_mfu:.1f}%",
                 ">= 45%", lm_mfu >= 0.45),
            line("step.mfu (LM FLOPs, DWM co-located)", f"{100 * with_dwm:.1f}% (the DWM's forward: "
                 f"{100 * dwm_flops * tokens / t['dwm'] / peak:.1f}% more)", ">= 40%", with_dwm >= 0.40),
        ]  # fmt: skip
    if dev.type == "cuda":
        mem = {}
        for k, f in (("lm", lm_step), ("dwm", lm_step_dwm)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            f()
            torch.cuda.synchronize()
            mem[k] = torch.cuda.max_memory_allocated() / 2**30
        out.append(line("step.peak_memory (LM alone / with DWM)", f"{mem['lm']:.2f} / {mem['dwm']:.2f} GiB", "-"))
    return out


def _metastep_fns(a):
    """(train_step, meta_step) of ``a``'s LM and DWM, the optimizer's states already allocated (they belong to the
    model states, not to a step)."""
    from dwmtrain.meta.metagrad import dwm_surrogate, lm_params, meta_gradient
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    dev, dt = torch.device(a.device), a.torch_dtype
    torch.manual_seed(0)
    lm = build_lm(ModelSpec.from_preset(a.preset, a.vocab_size, a.seq_len), seed=0).to(dev, dt)
    V = lm.config.vocab_size
    dwm = DataWeightingModel(DWMArch(a.dwm_backbone or a.preset, V, a.seq_len)).to(dev, dt).train()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randint(0, V, (a.micro, a.seq_len), device=dev)
    vb = {"input_ids": x.flip(0), "attention_mask": torch.ones_like(x), "labels": x.flip(0)}

    def train_step():
        lm.train().requires_grad_(True)
        lm(input_ids=x, sample_weights=torch.ones(a.micro, device=dev))[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def meta_step():
        lm.eval().requires_grad_(False)
        w = dwm(x)
        g = meta_gradient(lm, lm_params(lm), x, vb, w.detach().float(), 1e-3, "fd")
        dwm_surrogate(w, g.dR_dw).backward()
        dwm.zero_grad(set_to_none=True)

    train_step()  # the optimizer's states and the gradients' first allocation belong to the model states
    meta_step()
    return train_step, meta_step


def probe_metastep(a) -> None:
    """Child process (freed memory returned to the system, as dwmtrain's CPU ranks run): one step's peak above
    what the models hold."""
    fns = dict(zip(("train", "meta"), _metastep_fns(a)))
    print(json.dumps({"extra_mib": peak_during(fns[a.probe], torch.device(a.device))}))


def bench_metastep(a) -> list[str]:
    """One meta-step as the meta job takes it (the fd meta-gradient through the LM, the DWM's surrogate backward)
    against one training step of the same LM (forward, backward, AdamW): time and peak memory above the models'
    (target: the meta-step's peak <= 2x the training step's). On CPU each peak is taken in a child process whose
    allocator returns freed memory to the system (dwmtrain's CPU ranks run so: launch.cli.CPU_MALLOC_ENV): with
    glibc's defaults a repeated step reuses pages already resident and shows no growth at all."""
    from dwmtrain.launch.cli import CPU_MALLOC_ENV

    dev = torch.device(a.device)
    train_step, meta_step = _metastep_fns(a)
    if dev.type == "cuda":
        mem = {k: peak_during(f, dev) for k, f in (("train", train_step), ("meta", meta_step))}
    else:
        mem = {v: peak_in_child(a, v, CPU_MALLOC_ENV)["extra_mib"] for v in ("train", "meta")}
    t = interleaved({"train": train_step, "meta": meta_step}, dev, a.reps)
    r = mem["meta"] / max(mem["train"], 1e-9)
    size = f"{a.preset}, DWM {a.dwm_backbone or a.preset}, {a.micro}x{a.seq_len} {a.dtype} on {dev.type}"
    return [
        line(f"metastep.time meta/train step ({size})", f"{t['meta'] / t['train']:.2f}x ({t['meta'] * 1e3:.0f} vs "
             f"{t['train'] * 1e3:.0f} ms)", "-"),
        line("metastep.peak_memory meta/train step", f"{r:.2f}x ({mem['meta']:.0f} vs {mem['train']:.0f} MiB above "
             "the models)", "<= 2x", r <= 2),
    ]  # fmt: skip


def bench_dwmcompile(a) -> list[str]:
    """The frozen DWM's forward (inference mode, the LM's dtype) eager against torch.compile: time, the
    one-off compile time, and the weights' agreement."""
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch

    dev, dt = torch.device(a.device), a.torch_dtype
    torch.manual_seed(0)
    arch = DWMArch(a.dwm_backbone or a.preset, a.vocab_size or 32000, a.seq_len)
    dwm = DataWeightingModel(arch).to(dev, dt).eval().requires_grad_(False)
    x = torch.randint(0, arch.vocab_size, (a.micro, a.seq_len), device=dev)
    compiled = torch.compile(dwm)

    def run(m):
        def f():
            with torch.inference_mode():
                return m(x)

        return f

    ref = run(dwm)()
    t0 = time.perf_counter()
    got = run(compiled)()
    sync(dev)
    compile_s = time.perf_counter() - t0
    diff = (got.float() - ref.float()).abs().max().item()
    t = interleaved({"eager": run(dwm), "compiled": run(compiled)}, dev, a.reps)
    r = t["compiled"] / t["eager"]
    size = f"DWM {arch.backbone}, {a.micro}x{a.seq_len} {a.dtype} on {dev.type}"
    return [
        line(f"dwm.compile compiled/eager ({size})", f"{r:.2f}x ({t['compiled'] * 1e3:.1f} vs {t['eager'] * 1e3:.1f} "
             f"ms; compiling took {compile_s:.0f} s; max |w diff| {diff:.1e})", "< 1.0x where it pays", r < 1.0),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------------- meta


def _meta_fns(a, dev):
    from dwmtrain.meta.metagrad import dwm_surrogate, lm_params, meta_gradient
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    torch.manual_seed(0)
    attn = "eager"  # create_graph's double backward has no fused-SDPA kernel
    lm = build_lm(ModelSpec.from_preset(a.preset, a.vocab_size, a.seq_len), attn, seed=0).to(dev, a.torch_dtype)
    lm.eval().requires_grad_(False)
    V = lm.config.vocab_size
    params = lm_params(lm)
    x = torch.randint(0, V, (a.micro, a.seq_len), device=dev)
    vb = {"input_ids": x.flip(0), "attention_mask": torch.ones_like(x), "labels": x.flip(0)}
    dwm = DataWeightingModel(DWMArch(a.dwm_backbone or a.preset, V, a.seq_len, attn_implementation=attn))
    dwm = dwm.to(dev, a.torch_dtype).train()
    torch.nn.init.normal_(dwm.fc2.weight, std=0.5)
    grads = {}

    def step(mode, with_before=False):
        def f():
            w = dwm(x)
            g = meta_gradient(lm, params, x, vb, w.detach().float(), 1e-3, mode, with_before=with_before)
            dwm_surrogate(w, g.dR_dw).backward()
            grads[mode] = g.dR_dw.detach().clone()
            dwm.zero_grad(set_to_none=True)

        return f

    # fd as the meta job runs it (R(theta), a logging-only forward, at 1 step in meta.log_every), fd computing
    # R(theta) every step (as before), and the textbook unrolled step
    return {"fd": step("fd"), "fd_logged": step("fd", True), "unrolled": step("unrolled")}, grads


def probe_meta(a) -> None:
    dev = torch.device(a.device)
    fns, _ = _meta_fns(a, dev)
    print(json.dumps({"extra_mib": peak_during(fns[a.probe], dev)}))


def bench_meta(a) -> list[str]:
    dev = torch.device(a.device)
    mem = {v: peak_in_child(a, v)["extra_mib"] for v in ("fd", "unrolled")}
    fns, grads = _meta_fns(a, dev)
    t = interleaved(fns, dev, a.reps)
    g1, g2 = grads["fd"].double(), grads["unrolled"].double()
    cos = (g1 @ g2 / (g1.norm() * g2.norm())).item()
    rel = ((g1 - g2).norm() / g2.norm()).item()
    size = f"{a.preset}, {a.micro}x{a.seq_len} {a.dtype}"
    tr, mr = t["fd"] / t["unrolled"], mem["fd"] / max(mem["unrolled"], 1e-9)
    return [
        line(f"meta.time fd/unrolled ({size})", f"{tr:.2f}x ({t['fd'] * 1e3:.0f} vs {t['unrolled'] * 1e3:.0f} ms)",
             "<= 1.0x", tr <= 1.0),
        line(f"meta.peak_memory fd/unrolled ({size})", f"{mr:.2f}x ({mem['fd']:.0f} vs {mem['unrolled']:.0f} MiB)",
             "<= 1.0x", mr <= 1.0),
        line("meta.time fd / fd computing R(theta) every step", f"{t['fd'] / t['fd_logged']:.2f}x", "< 1.0x",
             t["fd"] < t["fd_logged"]),
        line("meta.gradient fd vs unrolled (dR/dw)", f"cosine {cos:.6f}, relative error {rel:.1e}", "cosine > 0.999",
             cos > 0.999),
    ]  # fmt: skip


def to_tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (fp32) rounded to TF32's 10-bit mantissa, to nearest (ties away from zero: the bit pattern's magnitude
    plus half of the dropped 13 bits), as tensor cores read fp32 inputs when TF32 is allowed."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    """On any device: every fp32 matrix product (mm, addmm, bmm, baddbmm: the forward's and autograd's backward
    alike) takes its operands rounded to TF32 and accumulates in fp32, which is what a GPU's TF32 tensor-core
    matmul computes (the accumulation order aside)."""

    OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        which = self.OPERANDS.get(func.overloadpacket.__name__, ())
        args = [to_tf32(x) if i in which and x.dtype == torch.float32 else x for i, x in enumerate(args)]
        return func(*args, **(kwargs or {}))


def bench_metaacc(a) -> list[str]:
    """The meta-gradient dR/dw in each dtype against the exact one (``per_sample`` mode in fp64), and the fd
    step's error across ``fd_eps``: where truncation (large eps) meets rounding (small eps) per dtype."""
    from dwmtrain.meta.metagrad import default_fd_eps, lm_params, meta_gradient
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    dev = torch.device(a.device)
    lm0 = (
        build_lm(ModelSpec.from_preset(a.preset, a.vocab_size, a.seq_len), "eager", seed=0).eval().requires_grad_(False)
    )
    V = lm0.config.vocab_size
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (a.micro, a.seq_len), generator=g).to(dev)
    vx = torch.randint(0, V, (2 * a.micro, a.seq_len), generator=g).to(dev)
    vb = {"input_ids": vx, "attention_mask": torch.ones_like(vx), "labels": vx}
    w = torch.softmax(torch.randn(a.micro, generator=g), 0).to(dev) * a.micro
    alpha = 1e-3

    copies: dict = {}

    def dR_dw(dtype, mode, eps=1e-2, tf32=""):
        """``tf32``: "" off, "gpu" (cuBLAS's TF32 matmuls), "emulated" (``EmulatedTF32``, on any device)."""
        if dtype not in copies:  # one copy of the LM per dtype, not one per call
            copies[dtype] = copy.deepcopy(lm0).to(dev, dtype)
        lm = copies[dtype]
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32 == "gpu"
        try:
            with EmulatedTF32() if tf32 == "emulated" else contextlib.nullcontext():
                return meta_gradient(lm, lm_params(lm), x, vb, w.to(dtype), alpha, mode, eps, False).dR_dw.double()
        finally:
            if dev.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = False

    exact = dR_dw(torch.float64, "per_sample")

    def rel(d: torch.Tensor) -> float:
        return ((d - exact).norm() / exact.norm()).item()

    dtypes = {"fp64": (torch.float64, ""), "fp32": (torch.float32, ""), "fp32+tf32 (emulated)": (torch.float32,
              "emulated"), "bf16": (torch.bfloat16, "")}  # fmt: skip
    if dev.type == "cuda":
        dtypes["fp32+tf32"] = (torch.float32, "gpu")
    out = []
    for name, (dt, tf32) in dtypes.items():
        errs = {eps: rel(dR_dw(dt, "fd", eps, tf32)) for eps in a.fd_eps_list}
        ps_err = rel(dR_dw(dt, "per_sample", tf32=tf32))
        auto = rel(dR_dw(dt, "fd", 0.0, tf32))
        auto_eps = default_fd_eps(lm_params(copies[dt]))
        best = min(errs, key=errs.get)
        curve = ", ".join(f"{e:g}: {errs[e]:.1e}" for e in a.fd_eps_list)
        out.append(line(f"metaacc.{name} fd relative error by fd_eps ({a.preset}, {a.micro}x{a.seq_len})", curve,
                        f"best fd_eps {best:g}; exact per_sample mode in {name}: {ps_err:.1e}"))  # fmt: skip
        out.append(line(f"metaacc.{name} default fd_eps {auto_eps:.3g} / best", f"{auto / errs[best]:.2f}x "
                        f"({auto:.1e} vs {errs[best]:.1e})", "<= 3x", auto <= 3 * errs[best]))  # fmt: skip
        if dt != torch.float64:
            copies.pop(dt)  # the fp64 copy serves the reference; the others are done (fp32 twice: made again)
    return out


# ----------------------------------------------------------------------------------------------- prepare


def bench_prepare(a) -> list[str]:
    """prepare-data end to end against one core of the raw tokenizer on the same text.

    The input is the bundled corpus repeated ``--copies`` times (16M tokens at 4): on the 4M-token corpus itself,
    one-off costs (the JSON reader's set-up, the worker start) weigh as much as encoding. ``--tokenizer sp``: the
    bundled sentencepiece model; ``hf``: a byte-level BPE tokenizer.json of the same vocabulary trained on it.
    """
    import io

    import zstandard

    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.tokenizer import load_tokenizer

    src, model = CORPUS / "sample.jsonl.zst", str(CORPUS / "sample_sp4096.model")
    raw_bytes = zstandard.ZstdDecompressor().stream_reader(open(src, "rb")).read() * a.copies
    texts = [json.loads(x)["text"] for x in io.BytesIO(raw_bytes)]
    out, raws, runs = [], [], {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        if a.tokenizer == "hf":
            from dwmtrain.data.hf_tokenizer import train_hf_tokenizer

            model = str(train_hf_tokenizer(texts[: len(texts) // a.copies], Path(tmp) / "hf", 4096) / "tokenizer.json")
        tok = load_tokenizer(model)
        corpus = Path(tmp) / "corpus.jsonl"
        corpus.write_bytes(raw_bytes)
        for rep_i in range(a.reps):  # interleaved repetitions; the best of each is reported
            t0 = time.perf_counter()
            n_raw = sum(len(ids) + tok.specials_per_document for ids in tok.encode_batch(texts, num_threads=1))
            raws.append(n_raw / (time.perf_counter() - t0))
            for workers in (1, 2):
                t0 = time.perf_counter()
                rep = prepare_data([str(corpus)], model, f"{tmp}/w{workers}-{rep_i}", seq_len=1024, workers=workers,
                                   progress=False)  # fmt: skip
                runs[workers].append((rep.tokens / (time.perf_counter() - t0), rep))
                assert rep.tokens == n_raw, (rep.tokens, n_raw)
        raw, rates = max(raws), {}
        for workers in (1, 2):
            rate, rep = max(runs[workers], key=lambda r: r[0])
            rates[workers] = rate
            plural = "s" * (workers > 1)
            name = type(tok).__name__
            out.append(line(f"prepare.rate per worker / raw {name} on one core ({workers} worker{plural}, "
                            f"{n_raw / 1e6:.1f}M tokens)", f"{rate / workers / raw:.2f} ({rate:,.0f} vs {raw:,.0f} "
                            "tokens/s)", ">= 0.8", rate / workers / raw >= 0.8))  # fmt: skip
            reported = rep.tokens / rep.seconds
            out.append(line(f"prepare.reported_rate / measured ({workers} worker{plural})", f"{reported / rate:.2f}",
                            "~1.0 (the rate prepare-data reports is end to end)"))  # fmt: skip
        out.append(line("prepare.scaling 2 workers / 1 worker", f"{rates[2] / rates[1]:.2f}x",
                        f">= 1.8x (near-linear; {os.cpu_count()} cores here)", rates[2] / rates[1] >= 1.8))  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------- build


def _build_rank(rank: int, world: int, port: int, preset: str, variant: str, out: str) -> None:
    """One rank of the build benchmark: its resident-set growth (MiB) while the LM is built, to ``out``."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import deepspeed

    from dwmtrain.config import build_deepspeed_config, load_config
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec
    from dwmtrain.train.engine import build_partitioned_lm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from dwmtrain.distributed import skip_cpu_inference_op

    skip_cpu_inference_op()  # as every dwmtrain rank does
    deepspeed.init_distributed()
    cfg = load_config(None, [f"model.preset={preset}", f"deepspeed.global_batch_size={8 * world}"])
    vocab = ModelSpec.from_preset(preset).vocab_size
    ds = build_deepspeed_config(cfg, world, "cpu")
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mib("VmRSS")
    t = time.perf_counter()
    spec = ModelSpec.from_preset(preset, vocab)
    if variant == "plain":  # what every rank held before deepspeed.initialize
        lm = build_lm(spec, seed=cfg.run.seed)
    else:
        lm = build_partitioned_lm(spec, cfg.model.attn_implementation, cfg.run.seed, ds)
    dist.barrier()
    res = {"peak_mib": _status_mib("VmHWM") - base, "after_mib": _status_mib("VmRSS") - base}
    res["seconds"] = time.perf_counter() - t
    del lm
    Path(out, f"{variant}{rank}.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()
    from dwmtrain.entry import exit_process

    exit_process(0)  # the result is on disk: no native teardown at exit (dwmtrain.entry)


def bench_loop(a) -> list[str]:
    """dwmtrain's uniform training step (meta.mode=none) against the bare DeepSpeed + Hugging Face loop a user
    writes instead, both launched on 2 CPU ranks in this run (tools/bench_loop.py): time per step, target <= 1.0x."""
    import statistics

    sys.path.insert(0, str(ROOT / "tools"))
    from bench_loop import WARMUP, bare_steps, dwmtrain_steps

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = str(prepared_corpus(work / f"sample-{a.seq_len}", a.seq_len))
    from dwmtrain.config import batch_plan, load_config

    full = ("model.loss_chunk_tokens=0",)  # the full-logits head: the loop's own cost apart from the fused loss
    mine, logits, bare = [], [], []
    for rep in range(a.reps):  # alternated: a drift of the machine hits all alike
        mine += dwmtrain_steps(data, a.steps, work, rep)[WARMUP - 1 : -1]  # the last: its checkpoint and eval
        logits += dwmtrain_steps(data, a.steps, work, rep, full)[WARMUP - 1 : -1]
        bare += bare_steps(data, a.steps, work, rep)[WARMUP:-1]
    m, f, b = (statistics.median(x) for x in (mine, logits, bare))
    plan = batch_plan(load_config("small", [f"data.seq_len={a.seq_len}"]), 2)
    size = (f"small, 2 CPU ranks, {plan.micro_batch_size} x {a.seq_len} tokens x {plan.gradient_accumulation_steps} "
            f"micro-batches a step; medians of {len(mine)} steps each")  # fmt: skip
    return [
        line(f"loop.step dwmtrain / bare ({size})", f"{m / b:.3f}x ({m * 1e3:.0f} vs {b * 1e3:.0f} ms)", "<= 1.0x",
             m <= b),
        line("loop.step dwmtrain with the full-logits head / bare (the loop's own cost: statistics, agreement, "
             "logging)", f"{f / b:.3f}x ({f * 1e3:.0f} vs {b * 1e3:.0f} ms)", "-"),
    ]  # fmt: skip


def prepared_corpus(out: Path, seq_len: int) -> Path:
    """The bundled corpus prepared at ``seq_len`` (once: kept in ``out``)."""
    if not (out / "index.json").is_file():
        from dwmtrain.data.prepare import prepare_data

        prepare_data([str(CORPUS / "sample.jsonl.zst")], str(CORPUS / "sample_sp4096.model"), str(out),
                     seq_len=seq_len, workers=2, progress=False)  # fmt: skip
    return out


def bench_select(a) -> list[str]:
    """``dwmtrain select random`` at two document budgets 10x apart, each in a fresh process: its peak resident
    set (the selected text passes through rank buckets on disk, never all in memory). The pool is the bundled
    corpus repeated ``--copies`` times as one JSONL file."""
    import io

    import zstandard

    raw = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / "sample.jsonl.zst", "rb")).read() * a.copies
    n_docs = sum(1 for _ in io.BytesIO(raw))
    budgets = (n_docs // 20, n_docs // 2)  # 10x apart
    # "whole": the same command with one bucket for every rank, i.e. all the selected text in memory at once
    whole = (
        "import functools, sys; from dwmtrain.select import driver; driver.write_selected = functools.partial("
        "driver.write_selected, bucket=10**12); from dwmtrain.launch.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    peaks, sizes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        pool = Path(tmp) / "pool.jsonl"
        pool.write_bytes(raw)
        for variant, b in ((None, budgets[0]), (None, budgets[1]), ("whole", budgets[1])):
            out = Path(tmp) / f"sel-{b}-{variant}.jsonl"
            entry = ["-c", whole] if variant else ["-m", "dwmtrain"]
            cmd = [sys.executable, *entry, "select", "random", "--input", str(pool), "--out", str(out),
                   "--budget-docs", str(b), "--seed", "1"]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-2000:]}")
            peaks[variant, b], sizes[b] = usage.ru_maxrss / 1024, out.stat().st_size / 2**20  # KiB -> MiB
    lo, hi = budgets
    ratio, vs_whole = peaks[None, hi] / peaks[None, lo], peaks[None, hi] / peaks["whole", hi]
    return [
        line(f"select.peak_rss budget {hi:,} / {lo:,} docs (pool {n_docs:,} docs, {len(raw) / 2**20:,.0f} MiB)",
             f"{ratio:.2f}x ({peaks[None, hi]:,.0f} vs {peaks[None, lo]:,.0f} MiB; selected text {sizes[hi]:,.0f} vs "
             f"{sizes[lo]:,.0f} MiB)", "< 1.2x: bounded whatever the budget", ratio < 1.2),
        line(f"select.peak_rss rank buckets / all selected records in memory (budget {hi:,} docs)",
             f"{vs_whole:.2f}x ({peaks[None, hi]:,.0f} vs {peaks['whole', hi]:,.0f} MiB)",
             "report: where the scan's per-file read is the peak, the write pass's saving does not show"),
    ]  # fmt: skip


def bench_build(a) -> list[str]:
    import torch.multiprocessing as mp

    from dwmtrain.distributed.rendezvous import free_port
    from dwmtrain.models.spec import ModelSpec

    full = ModelSpec.from_preset(a.preset).num_parameters() * 4 / 2**20  # fp32 MiB
    res = {}
    with tempfile.TemporaryDirectory() as out:
        for variant in ("plain", "partitioned"):
            args = (a.ranks, free_port(), a.preset, variant, out)
            mp.start_processes(_build_rank, args, nprocs=a.ranks, start_method="spawn")
            res[variant] = [json.loads(Path(out, f"{variant}{r}.json").read_text()) for r in range(a.ranks)]
    pr, pa = res["plain"], res["partitioned"]

    def per_rank(rs, k):
        return ", ".join(f"{r[k]:,.0f}" for r in rs)

    held = max(r["after_mib"] for r in pa) / full
    return [
        f"# build {a.preset} ({full:,.0f} MiB in fp32), {a.ranks} ranks: peak resident-set growth per rank, MiB "
        f"(plain: {per_rank(pr, 'peak_mib')}; partitioned: {per_rank(pa, 'peak_mib')}); held after the build, "
        f"partitioned: {per_rank(pa, 'after_mib')}; seconds plain {max(r['seconds'] for r in pr):.1f}, "
        f"partitioned {max(r['seconds'] for r in pa):.1f}",
        line(
            "build: LM held per rank after the build, partitioned / full LM",
            f"{held:.3f}x",
            f"<= {1.1 / a.ranks:.3f}x (1.1 / ranks)",
            held <= 1.1 / a.ranks,
        ),  # fmt: skip
        line(
            "build: peak host memory at start-up, ranks 1.. partitioned / plain",
            f"{max(r['peak_mib'] for r in pa[1:]) / max(r['peak_mib'] for r in pr[1:]):.3f}x",
            "report (CPU: shards and transients in host memory; on GPU they are device memory)",
        ),
        line(
            "build: peak host memory at start-up, all ranks partitioned / plain",
            f"{sum(r['peak_mib'] for r in pa) / sum(r['peak_mib'] for r in pr):.3f}x",
            "report",
        ),
    ]


# ----------------------------------------------------------------------------------------------- options


def _dtype(p, default="fp32"):
    p.add_argument("--dtype", default=default, choices=("fp32", "bf16"))


def _lm_shape(p, seq_len=128):
    p.add_argument("--preset", default="small", help="the LM preset")
    p.add_argument("--vocab-size", type=int, default=0, help="the LM's vocabulary (0: the preset's)")
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--micro", type=int, default=8, help="micro-batch")


def loss_options(p):
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (370m: 1024, 1.3b: 2048)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per LM-head chunk")
    p.add_argument("--reps", type=int, default=5)
    _dtype(p)


def step_options(p):  # step, meta and dwmcompile: an LM (and a DWM backbone) of a preset
    _lm_shape(p)
    p.add_argument("--dwm-backbone", default="", help="the DWM backbone's preset (default: the LM's)")
    p.add_argument("--reps", type=int, default=5)
    _dtype(p)


def actckpt_options(p):
    _lm_shape(p, seq_len=1024)
    p.add_argument("--reps", type=int, default=3)
    _dtype(p)


def metaacc_options(p):
    _lm_shape(p)
    p.add_argument("--fd-eps-list", type=lambda v: [float(e) for e in v.split(",")],
                   default=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], help="the fd_eps values to try")  # fmt: skip


def prepare_options(p):
    p.add_argument("--tokenizer", default="sp", choices=("sp", "hf"), help="sentencepiece, or a HF tokenizer.json")
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions (the best is kept)")
    p.add_argument("--copies", type=int, default=4, help="copies of the bundled corpus to read")


def select_options(p):
    p.add_argument("--copies", type=int, default=8, help="copies of the bundled corpus in the pool")


def loop_options(p):
    p.add_argument("--steps", type=int, default=40, help="optimizer steps of each job")
    p.add_argument("--reps", type=int, default=2, help="jobs of each loop, alternated")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--work", default="runs/bench-loop")


def build_options(p):
    p.add_argument("--preset", default="1.3b", help="the LM preset built at start-up")
    p.add_argument("--ranks", type=int, default=2, help="processes")


#: name: (run, its options, its option defaults under --quick)
BENCHES = {
    "loss": (bench_loss, loss_options, {"hidden": 256, "reps": 3}),
    "step": (bench_step, step_options, {"reps": 3}),
    "meta": (bench_meta, step_options, {"reps": 3}),
    "metaacc": (bench_metaacc, metaacc_options, {}),
    "metastep": (bench_metastep, step_options, {"reps": 2}),
    "dwmcompile": (bench_dwmcompile, step_options, {"reps": 3}),
    "prepare": (bench_prepare, prepare_options, {}),
    "build": (bench_build, build_options, {}),
    "select": (bench_select, select_options, {}),
    "actckpt": (bench_actckpt, actckpt_options, {"reps": 2}),
    "loop": (bench_loop, loop_options, {"reps": 1}),
}
PROBES = {"loss": probe_loss, "meta": probe_meta, "actckpt": probe_actckpt, "metastep": probe_metastep}
PARSERS: dict[str, argparse.ArgumentParser] = {}


def option_argv(parser: argparse.ArgumentParser, a) -> list[str]:
    """``a``'s values of ``parser``'s options, as a command line (for a probe in a child process)."""
    out = []
    for act in parser._actions:
        if act.option_strings and act.dest not in ("help", "probe"):
            v = getattr(a, act.dest)
            out += [act.option_strings[0], ",".join(map(str, v)) if isinstance(v, list) else str(v)]
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="every benchmark, CPU sizes that finish in < 10 min")
    ap.add_argument("--only", default=",".join(BENCHES), help="these benchmarks, each with its own defaults")
    sub = ap.add_subparsers(dest="bench", metavar="NAME", help="one benchmark with its own options")
    for name, (fn, options, _) in BENCHES.items():
        PARSERS[name] = sub.add_parser(name, help=(fn.__doc__ or "").split("\n")[0] or None)
        options(PARSERS[name])
        PARSERS[name].add_argument("--probe", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def benchmark_args(a) -> list[argparse.Namespace]:
    """The benchmarks to run: the one named with its options, else ``--only``'s with their defaults."""
    if a.bench:
        return [a]
    out = []
    for name in a.only.split(","):
        ns = PARSERS[name].parse_args([])
        if a.quick:
            vars(ns).update({k: min(getattr(ns, k), v) for k, v in BENCHES[name][2].items()})
        out.append(argparse.Namespace(**vars(ns), bench=name, device=a.device))
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    if a.bench and a.probe:
        a.torch_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
        PROBES[a.bench](a)
        return 0
    print(f"# tools/bench.py {' '.join(argv if argv is not None else sys.argv[1:])} on {a.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)  # fmt: skip
    t_all = time.time()
    for b in benchmark_args(a):
        t0 = time.time()
        b.torch_dtype = torch.bfloat16 if getattr(b, "dtype", "fp32") == "bf16" else torch.float32
        for ln in BENCHES[b.bench][0](b):
            print(ln, flush=True)
        print(f"#   {b.bench}: {time.time() - t0:.0f} s", flush=True)
    print(f"# all: {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
