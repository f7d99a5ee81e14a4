"""The planner's printed table and its one-line verdict."""

from __future__ import annotations

from dwmtrain.plan.planner import HEADROOM, Fix, Plan, first_fix


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _hours(s: float) -> str:
    return f"{s / 3600:,.1f} h" if s >= 3600 else f"{s / 60:,.1f} min"


def verdict(p: Plan, fix: Fix | None = None) -> str:
    """One line: fits or not, the peak against the budget, and the first change that fits."""
    where = f"{p.layout.nodes} x {p.layout.gpus_per_node} {p.device.name}"
    head = f"peak {gib(p.peak)} of {gib(p.device.memory_bytes)} per device ({HEADROOM:.0%} usable)"
    meta = f"the meta job needs {gib(p.meta_peak)} per process"
    if p.fits and not p.meta_over:
        return f"plan: FITS on {where}: {head}"
    what = f"training FITS on {where} ({head}), but the META JOB DOES NOT: {meta}" if p.fits else \
        f"DOES NOT FIT on {where}: {head}" + (f"; {meta}" if p.meta_over else "")  # fmt: skip
    if fix is None:
        return f"plan: {what}; no single change found (try tensor parallelism or a larger GPU)"
    peaks = f"peak {gib(fix.plan.peak)}" + (f", meta job {gib(fix.plan.meta_peak)}" if p.cfg.meta.mode == "bilevel"
                                            else "")  # fmt: skip
    if fix.alters:
        return (f"plan: {what}; no change that keeps the method fits; {fix.label} does ({peaks}), and it CHANGES THE "
                f"METHOD: {fix.alters}")  # fmt: skip
    return f"plan: {what}; first change that fits: {fix.label} ({peaks})"


def table(p: Plan) -> list[str]:
    """The whole plan, as printed by ``dwmtrain plan``."""
    cfg, lay = p.cfg, p.layout
    nodes = f"{lay.nodes} node{'s' if lay.nodes > 1 else ''}"
    out = [f"# {cfg.run.name}: LM {p.n_params:,} parameters, DWM {p.dwm_params:,}; {nodes} x "
           f"{lay.gpus_per_node} {p.device.name} ({lay.world} ranks), ZeRO-{lay.zero_stage}"
           + (f", tensor parallel {lay.tp} x data parallel {lay.dp}" if lay.tp > 1 else "") + f", {lay.precision}",
           "", "per device (training):"]  # fmt: skip
    out += [f"  {i.name:<52} {gib(i.nbytes):>12}   {i.how}" for i in p.items]
    out.append(f"  {'total':<52} {gib(p.peak):>12}   of {gib(p.device.memory_bytes)}")
    if p.host_offload_per_node:
        out.append(f"  host memory per node for the offloaded states: {gib(p.host_offload_per_node)}")
    out += ["", f"meta job per process ({cfg.meta.nproc} processes, meta.launch={cfg.meta.launch}):"]
    out += [f"  {i.name:<52} {gib(i.nbytes):>12}   {i.how}" for i in p.meta_items]
    out.append(f"  {'total':<52} {gib(p.meta_peak):>12}")
    per, weights = p.checkpoint_bytes
    out += ["", f"checkpoints: {gib(per)} per save (+ {gib(weights)} of fp32 weights at stage boundaries and the end); "
            f"disk for the run with keep_last={cfg.run.keep_last}: {gib(p.disk_bytes)}"]  # fmt: skip
    steps = sum(p.steps_per_stage)
    out.append(f"tokens: {p.tokens_per_step:,} per step, {steps:,} steps, {p.tokens_per_step * steps / 1e9:,.2f}B "
               f"in all; {p.flops_per_token:.3g} FLOPs per token (6N + attention + recompute + DWM)")  # fmt: skip
    secs = p.stage_seconds()
    if secs:
        out.append(f"time per stage at {p.mfu:.0%} MFU: " + ", ".join(_hours(s) for s in secs)
                   + f" (all: {_hours(sum(secs))}; meta-updates not counted)")  # fmt: skip
    else:
        out.append("time per stage: no peak FLOP/s known for this device (--gpu h100|h100-pcie|h200|a100)")
    return out


def print_plan(p: Plan) -> None:
    for ln in table(p):
        print(ln)
    print()
    fits = p.fits and not p.meta_over
    print(verdict(p, None if fits else first_fix(p.cfg, p.layout.nodes, p.layout.gpus_per_node, p.device)))
