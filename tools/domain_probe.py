#!/usr/bin/env python3
"""Does the DWM steer toward a target? A benchmark where the target is one domain of the bundled corpus.

For each target domain T (``--targets``):
1. T's documents are split in two: half stay in the training mixture (the LM sees the domain at its natural
   share), half become the target set (``data.target``), which every run splits again into its reward part (the
   meta job's only data) and its report part (the target loss every arm is scored on).
2. The mixture (every other document and T's training half) is prepared once, 5% held out (the general loss).
3. Arms, each over ``--seeds`` seeds with the same steps, tokens and data order: uniform; the DWM (bi-level,
   rewarded on the target's reward part); loss reweighting; DSIR selection toward the target's reward documents
   (then uniform); T up-weighted by a fixed factor (``meta.mode=domain_weights``: the static baseline a user tries
   first); the domain oracle (only T's documents weigh: every other domain 0).
4. Per arm: the target loss (the report part), the general held-out loss, the share of the best static arm's
   target gain over uniform it reaches, and the mean weight of each domain per stage (a figure for the DWM).

    python tools/domain_probe.py --work runs/domain [--targets python_reference,licenses] [--seeds 3]

Results go to WORK/result.json and WORK/result.md; nothing here is a test (tests/integration/test_target.py is).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dwmtrain.fileio import read_jsonl  # noqa: E402
from dwmtrain.rundir import RunDir  # noqa: E402
from tools.noise_probe import SP, at_step, mean_std, sh, write_documents  # noqa: E402

CORPUS = ROOT / "dwmtrain" / "data" / "corpus" / "sample.jsonl.zst"
DOMAIN = "meta.redpajama_set_name"
ARMS = ("uniform", "dwm", "loss", "dsir", "upweight", "oracle")  #: the default arms
MORE_ARMS = ("refresh",)  #: the DWM with its backbone refreshed from the LM at every boundary
STATIC = ("upweight", "oracle", "dsir")  #: the arms without a learned weighting: the bar the DWM must clear


def split_corpus(work: Path, target: str, seed: int) -> dict:
    """WORK/T/mixture.jsonl and WORK/T/target.jsonl: half of T's documents (seeded) held out of the mixture."""
    from dwmtrain.data.readers import iter_records

    out = work / target
    out.mkdir(parents=True, exist_ok=True)
    recs = [r.rec for r in iter_records([str(CORPUS)])]
    ours = [i for i, r in enumerate(recs) if (r.get("meta") or {}).get("redpajama_set_name") == target]
    if len(ours) < 40:
        sys.exit(f"domain_probe: --targets {target}: {len(ours)} documents in the corpus (>= 40 needed)")
    held = set(random.Random(seed).sample(ours, len(ours) // 2))
    with open(out / "mixture.jsonl", "w") as m, open(out / "target.jsonl", "w") as t:
        for i, r in enumerate(recs):
            (t if i in held else m).write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"documents": len(recs), "target_documents": len(held), "domain_documents": len(ours)}


def prepare(work: Path, target: str, seq_len: int) -> Path:
    from dwmtrain.data.prepare import prepare_data

    data = work / target / "data"
    if not (data / "index.json").is_file():
        prepare_data([str(work / target / "mixture.jsonl")], str(SP), str(data), seq_len=seq_len, workers=2,
                     heldout_fraction=0.05, progress=False)  # fmt: skip
    return data


def reward_documents(work: Path, target: str, args) -> Path:
    """The target documents the runs reward on (their own split, recomputed the same way): DSIR's target, so the
    selection never sees the report part either."""
    from dwmtrain.config import load_config
    from dwmtrain.data.validation import REWARD, validation_set

    cfg = load_config(str(ROOT / "launchers" / "configs" / "tiny.yaml"), common(args, work, target))
    return write_documents(validation_set(cfg, REWARD), work / target / "target.jsonl",
                           work / target / "target_reward.jsonl")  # fmt: skip


def dsir_data(work: Path, target: str, args, log: Path) -> Path:
    from dwmtrain.data.prepare import prepare_data

    out = work / target / "data-dsir"
    if (out / "index.json").is_file():
        return out
    sel = work / target / "dsir.jsonl"
    n = sum(1 for _ in open(work / target / "mixture.jsonl"))
    sh([sys.executable, "-m", "dwmtrain", "select", "dsir", "--input", str(work / target / "mixture.jsonl"),
        "--out", str(sel), "--target-file", str(reward_documents(work, target, args)), "--budget-docs",
        str(n // 2), "--no-progress", "--overwrite"], log)  # fmt: skip
    prepare_data([str(sel)], str(SP), str(out), seq_len=args.seq_len, workers=2, heldout_fraction=0.05,
                 progress=False)  # fmt: skip
    return out


def common(args, work: Path, target: str) -> list[str]:
    """Every arm's run: the target set (its report part is the target loss), the mixture's held-out split beside."""
    return [f"data.train_data={work / target / 'data'}", f"data.seq_len={args.seq_len}", "data.val_source=target",
            f"data.target.path={work / target / 'target.jsonl'}", "data.report_sets=[heldout]",
            f"meta.val_batch_size={args.val_batch}"]  # fmt: skip


def arm_overrides(arm: str, args, work: Path, target: str, log: Path) -> list[str]:
    names = json.loads((work / target / "data" / "index.json").read_text())["domains"]
    return {
        "uniform": ["meta.mode=none"],
        "dwm": ["meta.mode=bilevel"],
        "refresh": ["meta.mode=bilevel", "dwm.refresh_backbone=true"],
        "loss": ["meta.mode=loss_reweight"],
        "dsir": ["meta.mode=none", f"data.train_data={dsir_data(work, target, args, log)}"] if arm == "dsir" else [],
        "upweight": ["meta.mode=domain_weights", f"meta.domain_weights.factors={{{target}: {args.factor}}}"],
        "oracle": ["meta.mode=oracle", f"meta.oracle.drop=[{','.join(n for n in names if n != target)}]"],
    }[arm]


def pretrain(run: Path, args, overrides: list[str], log: Path) -> None:
    """One 2-rank deepspeed launch of the tiny config with ``overrides`` (the probe's model and optimizer first)."""
    import os

    sh([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(args.ranks), "--master_port",
        str(29900 + os.getpid() % 90), str(ROOT / "launchers" / "pretrain.py"), "--config",
        str(ROOT / "launchers" / "configs" / "tiny.yaml"), "--run-dir", str(run), f"model.preset={args.preset}",
        f"dwm.backbone={args.preset}", "data.raw=[]", "run.threads_per_rank=1", f"optimizer.lr={args.lm_lr}",
        f"meta.lr={args.meta_lr}", f"meta.nproc={args.ranks}", f"meta.lookahead_lr={args.alpha}",
        f"meta.backbone_trainable={not args.head_only}", f"deepspeed.global_batch_size={8 * args.ranks}",
        *overrides, *args.set], log)  # fmt: skip


def run_arm(arm: str, seed: int, args, target: str, log: Path) -> dict:
    """One run; its stage-end target and general losses and the per-domain weights by stage."""
    from dwmtrain.report import domain_weights

    work = args.work
    run = work / target / f"{arm}-s{seed}"
    over = [*common(args, work, target), *arm_overrides(arm, args, work, target, log),
            f"stages.total_steps={args.steps}", f"stages.num_stages={args.stages}", "run.eval_batches=8",
            f"run.seed={seed}", "run.checkpoint_every=100000", f"meta.steps={args.meta_steps}"]  # fmt: skip
    t0 = time.time()
    if not (RunDir(run).evals.is_file() and len(read_jsonl(RunDir(run).evals)) >= args.stages):
        pretrain(run, args, over, log)
    evals = read_jsonl(RunDir(run).evals)
    return {"target": {e["step"]: e["val_loss/target"] for e in evals},
            "general": {e["step"]: e["val_loss/heldout"] for e in evals},
            "domains": domain_weights(read_jsonl(RunDir(run).metrics)), "seconds": time.time() - t0}  # fmt: skip


def summarize(res: dict, arms: list[str], last: int) -> dict:
    """Per arm: the final target and general losses (mean, std over seeds), and the share of the best static
    arm's target gain over uniform that the arm reaches (1: as good as it; above 1: better)."""
    out = {}
    for arm in arms:
        t = [at_step(r["target"], last) for r in res[arm]]
        g = [at_step(r["general"], last) for r in res[arm]]
        out[arm] = {"target": mean_std(t), "general": mean_std(g), "target_per_seed": t, "general_per_seed": g}
    for arm in out if "uniform" in out else ():  # paired with uniform, seed by seed (positive: the arm helps)
        gains = [u - x for u, x in zip(out["uniform"]["target_per_seed"], out[arm]["target_per_seed"])]
        cost = [x - u for u, x in zip(out["uniform"]["general_per_seed"], out[arm]["general_per_seed"])]
        m, sd = mean_std(gains)
        out[arm].update(gain=(m, sd), gain_in_std=m / sd if sd > 0 else 0.0, better_seeds=sum(x > 0 for x in gains),
                        general_cost=mean_std(cost))  # fmt: skip
    if "uniform" in out and (static := [a for a in STATIC if a in out]):
        best = min(static, key=lambda a: out[a]["target"][0])
        u, b = out["uniform"]["target"][0], out[best]["target"][0]
        for arm in out:
            out[arm]["share_of_best_static"] = (u - out[arm]["target"][0]) / (u - b) if u != b else None
        out["_best_static"] = best
    return out


def table(target: str, s: dict, arms: list[str], seeds: int) -> list[str]:
    lines = [f"### target: {target} ({seeds} seeds; loss at the last step, mean ± std over seeds)", "",
             "| arm | target loss (report part) | uniform − arm, paired (nats) | in std | better than uniform | "
             "general held-out loss | its cost over uniform | share of the best static arm's target gain |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm in arms:
        r = s[arm]
        share = r.get("share_of_best_static")
        gain = f"{r['gain'][0]:+.4f} ± {r['gain'][1]:.4f} | {r['gain_in_std']:.1f} | {r['better_seeds']} of {seeds}" \
            if "gain" in r and arm != "uniform" else "- | - | -"  # fmt: skip
        cost = (
            f"{r['general_cost'][0]:+.4f} ± {r['general_cost'][1]:.4f}"
            if "general_cost" in r and arm != "uniform"
            else "-"
        )
        share = "-" if share is None else f"{100 * share:.0f}%"
        lines.append(f"| {arm} | {r['target'][0]:.4f} ± {r['target'][1]:.4f} | {gain} | {r['general'][0]:.4f} ± "
                     f"{r['general'][1]:.4f} | {cost} | {share} |")  # fmt: skip
    return lines + ["", f"best static arm: {s.get('_best_static', '-')}", ""]


def mean_domains(runs: list[dict]) -> dict[int, dict[str, float]]:
    """{stage: {domain: weight}} averaged over seeds (a run's table read back from JSON has string stages)."""
    out: dict[int, dict[str, list[float]]] = {}
    for r in runs:
        for stage, row in r["domains"].items():
            for d, w in row.items():
                out.setdefault(int(stage), {}).setdefault(d, []).append(w)
    return {s: {d: sum(v) / len(v) for d, v in row.items()} for s, row in sorted(out.items())}


def weights_table(target: str, res: dict, arms: list[str]) -> list[str]:
    """Per arm and stage: the target domain's mean training weight, and the mean of the other domains' (seeds
    averaged; uniform = 1)."""
    arms = [a for a in arms if a != "uniform"]
    stages = sorted({int(s) for a in arms for r in res[a] for s in r["domains"]})
    head = "| arm | " + " | ".join(f"stage {s}" for s in stages) + " |"
    lines = [f"per-domain training weights, {target}: target domain / mean of the others, by stage (seeds averaged)",
             "", head, "|---" * (len(stages) + 1) + "|"]  # fmt: skip
    for arm in arms:
        table, cells = mean_domains(res[arm]), []
        for st in stages:
            row = table.get(st, {})
            others = [w for d, w in row.items() if d != target]
            cells.append(f"{row.get(target, float('nan')):.3f} / {sum(others) / max(len(others), 1):.3f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(args, result: dict) -> None:
    """WORK/result.md (the tables) and WORK/T-dwm-domain-weights.png (the DWM's per-domain weights, seeds
    averaged) from ``result``."""
    from dwmtrain.analysis.figures import plot_domain_weights

    md = ["## Domain-target probe", ""]
    for target, r in result.items():
        arms = [a for a in args.arms if a in r["runs"]]
        last = max(int(k) for k in r["runs"][arms[0]][0]["target"])
        md += table(target, summarize(r["runs"], arms, last), arms, len(r["runs"][arms[0]]))
        md += weights_table(target, r["runs"], arms)
        if "dwm" in r["runs"]:
            plot_domain_weights(mean_domains(r["runs"]["dwm"]), args.work / f"{target}-dwm-domain-weights.png")
    (args.work / "result.md").write_text("\n".join(md))
    print("\n".join(md), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--targets", default="python_reference,licenses", help="domains of the corpus, comma-separated")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--meta-steps", type=int, default=16)
    ap.add_argument("--factor", type=float, default=4.0, help="the upweight arm's factor for the target domain")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--val-batch", type=int, default=16)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--lm-lr", type=float, default=3e-3)
    ap.add_argument("--meta-lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=0.0)
    ap.add_argument("--head-only", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="the target documents' split out of the mixture")
    ap.add_argument("--set", nargs="*", default=[], help="more overrides for every run")
    ap.add_argument("--report-only", action="store_true", help="rewrite result.md and the figures from result.json")
    a = ap.parse_args(argv)
    a.targets, a.arms = a.targets.split(","), a.arms.split(",")
    if unknown := set(a.arms) - set(ARMS) - set(MORE_ARMS):
        ap.error(f"--arms: unknown arm(s) {sorted(unknown)} (arms: {', '.join(ARMS + MORE_ARMS)})")
    a.work = a.work.resolve()
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log, result = args.work / "log.txt", {}
    if args.report_only:
        write_report(args, json.loads((args.work / "result.json").read_text()))
        return 0
    for target in args.targets:
        info = split_corpus(args.work, target, args.seed)
        prepare(args.work, target, args.seq_len)
        res = {arm: [run_arm(arm, s, args, target, log) for s in range(args.seeds)] for arm in args.arms}
        last = max(res[args.arms[0]][0]["target"])
        result[target] = {"corpus": info, "runs": res, "summary": summarize(res, args.arms, last)}
        (args.work / "result.json").write_text(json.dumps(result, indent=1, default=str))
        write_report(args, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
