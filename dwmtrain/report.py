"""A run's summary: per-stage validation, weight statistics, meta-updates, and where everything is."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from dwmtrain.rundir import RunDir


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def summarize(run_dir: str | Path) -> str:
    rd = RunDir(run_dir)
    run = rd.root
    steps = _records(rd.metrics)
    evals = _records(rd.evals)
    if not steps:
        return f"{run}: no metrics.jsonl yet"
    by_stage = defaultdict(list)
    for r in steps:
        by_stage[r["stage"]].append(r)
    ev = {}
    for r in evals:
        ev[r["stage"]] = r  # the evaluation at the end of each stage
    lines = [
        f"run: {run.resolve()}",
        "",
        "stage  steps      loss  loss_unw  val_loss  lambada_acc  w_entropy   w_ess  w_min  w_max  dwm",
    ]
    for s in sorted(by_stage):
        rs = by_stage[s]

        def mean(k, rs=rs):
            return sum(r[k] for r in rs) / len(rs)

        e = ev.get(s, {})
        lines.append(
            f"{s:>5}  {rs[0]['step']:>3}-{rs[-1]['step']:<4} {mean('loss'):>8.4f}  {mean('loss_unweighted'):>8.4f}  "
            f"{e.get('val_loss', float('nan')):>8.4f}  {e.get('val_acc', float('nan')):>11.3f}  "
            f"{mean('w_entropy'):>9.4f}  {mean('w_ess'):>6.3f}  {min(r['w_min'] for r in rs):>5.3f}  "
            f"{max(r['w_max'] for r in rs):>5.3f}  {rs[-1]['dwm']}"
            + (f"  ALARM: collapsed weights in {n} logged steps" if (n := sum(r.get("w_alarm", 0) for r in rs)) else "")
        )
    metas = sorted(rd.meta_dir.glob("stage*.jsonl")) if rd.meta_dir.exists() else []
    if metas:
        lines += ["", "meta-updates (first -> last meta-step): val loss at theta*, weight entropy, grad norm"]
        for m in metas:
            rs = _records(m)
            if rs:
                a, b = rs[0], rs[-1]
                lines.append(
                    f"  {m.stem}: {len(rs)} steps, val* {a['val_loss_theta_star']:.4f} -> "
                    f"{b['val_loss_theta_star']:.4f}, entropy {a['weight_entropy']:.4f} -> "
                    f"{b['weight_entropy']:.4f}, |g| {b['grad_norm']:.3g}"
                )
    ck = rd.checkpoints
    tags = rd.complete_tags()
    dwms = sorted(p.name for p in rd.dwm_dir.glob("*.safetensors")) if rd.dwm_dir.exists() else []
    lines += [
        "",
        "where things are:",
        f"  checkpoints  {ck}  ({', '.join(tags)}; newest complete in latest.json)",
        f"  DWM files    {rd.dwm_dir}  ({', '.join(dwms) or 'none'}; sha256 in each .json sidecar)",
        f"  metrics      {rd.metrics} (per step), {rd.evals} (per stage)",
        f"  meta logs    {rd.meta_dir}  (stageK.jsonl per meta-step, stageK.log job output)",
        f"  TensorBoard  {rd.tensorboard}",
        f"  config       {rd.config}, {rd.deepspeed_json}",
        "",
        "next (docs/experiments.md; docs/evaluation.md prepares the task data DIR once):",
        "  lm-eval at every stage end (9 tasks 0/2-shot + LAMBADA), tables and Figure 2:",
        f"    dwmtrain eval {run} --task-data DIR",
        "  side by side with another run (RANDOM vs RANDOM+DWM):",
        f"    dwmtrain eval {run} OTHER_RUN --labels A,B --task-data DIR",
        "  what each stage's DWM prefers (domains, weights, rank correlation; figures):",
        f"    dwmtrain analyze-preferences {run}",
        "  the newest checkpoint as a Hugging Face model:",
        f"    dwmtrain export {run} --out DIR",
    ]
    return "\n".join(lines)
