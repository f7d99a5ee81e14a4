"""A run's summary: per-stage validation, weight statistics, non-finite steps, meta-updates, and where
everything is (``dwmtrain report RUN_DIR``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dwmtrain.errors import AnalysisError
from dwmtrain.fileio import read_jsonl
from dwmtrain.rundir import RunDir


def summarize(run_dir: str | Path) -> str:
    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise AnalysisError(f"run directory {rd.root}: not found")
    steps = read_jsonl(rd.metrics)
    if not steps:
        return f"{rd.root}: no step logged yet ({rd.metrics.name} is empty or absent: no step has finished)"
    lines = [f"run: {rd.root.resolve()}", "", *stage_table(steps, read_jsonl(rd.evals))]
    lines += (
        source_lines(steps, rd)
        + domain_lines(steps, rd)
        + nonfinite_lines(steps)
        + meta_lines(rd)
        + where_lines(rd)
        + next_lines(rd.root)
    )
    return "\n".join(lines)


def stage_table(steps: list[dict], evals: list[dict]) -> list[str]:
    """One row per stage: its steps, mean losses, validation at its end, the weights' statistics, the DWM."""
    by_stage = defaultdict(list)
    for r in steps:
        by_stage[r["stage"]].append(r)
    finite = {s: [r for r in rs if not r.get("nonfinite")] or rs for s, rs in by_stage.items()}  # the means
    ev = {r["stage"]: r for r in evals}  # the evaluation at the end of each stage
    # the other sets validation reports (data.report_sets): the first named one is val_loss itself
    named = list(dict.fromkeys(k.split("/", 1)[1] for r in evals for k in r if k.startswith("val_loss/")))[1:]
    lines = ["stage  steps      loss  loss_unw  val_loss  val_acc  w_entropy   w_ess  w_min  w_max"
             + "".join(f"  {'loss:' + n:>12}" for n in named) + "  dwm"]  # fmt: skip
    for s in sorted(by_stage):
        rs, e = by_stage[s], ev.get(s, {})

        def mean(k, rs=finite[s]):  # a skipped (non-finite) step's NaN does not hide its stage's figures
            return sum(r[k] for r in rs) / len(rs)

        alarms = sum(r.get("w_alarm", 0) for r in rs)
        lines.append(
            f"{s:>5}  {rs[0]['step']:>3}-{rs[-1]['step']:<4} {mean('loss'):>8.4f}  {mean('loss_unweighted'):>8.4f}  "
            f"{e.get('val_loss', float('nan')):>8.4f}  {e.get('val_acc', float('nan')):>7.3f}  "
            f"{mean('w_entropy'):>9.4f}  {mean('w_ess'):>6.3f}  {min(r['w_min'] for r in rs):>5.3f}  "
            f"{max(r['w_max'] for r in rs):>5.3f}"
            + "".join(f"  {e.get(f'val_loss/{n}', float('nan')):>12.4f}" for n in named)
            + f"  {rs[-1]['dwm']}"
            + (f"  ALARM: collapsed weights in {alarms} logged steps" if alarms else "")
        )
    return lines


def domain_weights(steps: list[dict]) -> dict[int, dict[str, float]]:
    """{stage: {domain: the mean over the stage's logged steps of the domain's mean weight}} (``w_dom/NAME``)."""
    sums = defaultdict(lambda: defaultdict(list))
    for r in steps:
        if r.get("nonfinite"):  # a skipped step's NaN does not hide its stage's means (as in the stage table)
            continue
        for k, v in r.items():
            if k.startswith("w_dom/"):
                sums[r["stage"]][k[6:]].append(v)
    return {s: {d: sum(v) / len(v) for d, v in by.items()} for s, by in sorted(sums.items())}


def domain_lines(steps: list[dict], rd: RunDir) -> list[str]:
    """The per-domain weights by stage, as a table and a figure (RUN_DIR/analysis/domain_weights.png)."""
    table = domain_weights(steps)
    if not table:
        return []
    from dwmtrain.analysis.figures import plot_domain_weights

    names = sorted({d for row in table.values() for d in row})
    w = max(8, *map(len, names))
    lines = ["", "mean weight by domain (the logged steps; 1 = uniform):"]
    lines.append("stage" + "".join(f"  {n:>{w}}" for n in names))
    for s, row in table.items():
        lines.append(f"{s:>5}" + "".join(f"  {row[n]:>{w}.3f}" if n in row else f"  {'-':>{w}}" for n in names))
    try:
        lines.append(f"  figure: {plot_domain_weights(table, rd.analysis_dir / 'domain_weights.png')}")
    except OSError as e:  # a read-only run directory: the table is the report, the figure is extra
        lines.append(f"  (no figure: {rd.analysis_dir}: {e.strerror})")
    return lines


def source_lines(steps: list[dict], rd: RunDir) -> list[str]:
    """A blend's sources (data.sources): each one's weight and size, what the run has drawn of it (epochs), the
    step it first repeats, and the samples the logged steps counted of it (its realized share)."""
    if not rd.config.is_file():
        return []
    from dwmtrain.config import load_config
    from dwmtrain.data.mixture import current_segment, open_training_data, source_plans
    from dwmtrain.errors import DWMTrainError
    from dwmtrain.models.spec import lm_spec

    cfg = load_config(rd.config)
    if not cfg.data.sources:
        return []
    last = steps[-1]
    lines = ["", f"sources (data.sources), drawn by step {last['step']}:"]
    try:
        data = open_training_data(cfg.data, lm_spec(cfg.model).vocab_size)
    except DWMTrainError as e:
        return [*lines, f"  cannot be read now: {e}"]
    batch = last["samples_seen"] // last["step"]
    counted = {k[6:]: 0 for r in steps for k in r if k.startswith("n_dom/")}
    for r in steps:
        for k, v in r.items():
            if k.startswith("n_dom/"):
                counted[k[6:]] += v
    total = sum(counted.values())
    seg = current_segment(rd.data_mixture)
    if seg and seg["from_step"]:
        lines[-1] += f" (this blend from step {seg['from_step']}: data_mixture.json)"
    for p in source_plans(data, data.order(cfg.run.seed, seg), last["step"], batch):
        share = f"; logged steps: {counted[p.name] / total:.3f} of their samples" if total and p.name in counted else ""
        lines.append(f"  {p.line(cfg.data.seq_len)}{share}")
    return lines


def nonfinite_lines(steps: list[dict]) -> list[str]:
    """How many steps had a non-finite loss or gradient norm (each skipped), and which; the last gradient norm."""
    bad = [r["step"] for r in steps if r.get("nonfinite")]
    norms = [r["grad_norm"] for r in steps if r.get("grad_norm") is not None]
    total = max((r.get("nonfinite_steps", 0) for r in steps), default=0)
    lines = [""]
    if norms:
        lines.append(f"gradient norm (before clipping): last {norms[-1]:.3g}, max {max(norms):.3g}")
    shown = ", ".join(map(str, bad[:20])) + (", ..." if len(bad) > 20 else "")
    lines.append(
        f"non-finite steps: {total} (skipped: no update, the LR schedule waited)" + (f": {shown}" if bad else "")
    )
    return lines


def meta_lines(rd: RunDir) -> list[str]:
    """First and last meta-step of every meta-update."""
    metas = sorted(rd.meta_dir.glob("stage*.jsonl")) if rd.meta_dir.exists() else []
    lines = []
    for m in metas:
        if rs := read_jsonl(m):
            a, b = rs[0], rs[-1]
            val = ""  # meta.v=boundary takes no lookahead: there is no R(theta*) to follow
            if "val_loss_theta_star" in a and "val_loss_theta_star" in b:
                val = f"val* {a['val_loss_theta_star']:.4f} -> {b['val_loss_theta_star']:.4f}, "
            lines.append(
                f"  {m.stem}: {len(rs)} steps, {val}entropy {a['weight_entropy']:.4f} -> "
                f"{b['weight_entropy']:.4f}, |g| {b['grad_norm']:.3g}"
            )
    if not lines:
        return []
    return ["", "meta-updates (first -> last meta-step): val loss at theta*, weight entropy, grad norm", *lines]


def where_lines(rd: RunDir) -> list[str]:
    tags = rd.complete_tags()
    dwms = sorted(p.name for p in rd.dwm_dir.glob("*.safetensors")) if rd.dwm_dir.exists() else []
    return [
        "",
        "where things are:",
        f"  checkpoints  {rd.checkpoints}  ({', '.join(tags)}; newest complete in latest.json)",
        f"  DWM files    {rd.dwm_dir}  ({', '.join(dwms) or 'none'}; sha256 in each .json sidecar)",
        f"  metrics      {rd.metrics} (per step), {rd.evals} (per stage)",
        f"  meta logs    {rd.meta_dir}  (stageK.jsonl per meta-step, stageK.log job output)",
        f"  TensorBoard  {rd.tensorboard}",
        f"  config       {rd.config}, {rd.deepspeed_json}",
    ]


def next_lines(run: Path) -> list[str]:
    return [
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
