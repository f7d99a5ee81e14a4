"""The meta-signal's ground truth at a run's stage-boundary checkpoints (``dwmtrain.analysis.diagnostic``).

For each checkpoint: the LM (its consolidated fp32 weights) and AdamW's moments (its ZeRO shards, through
DeepSpeed's universal conversion), ``--samples`` training sequences in random micro-batches, and for each sequence
its true effect on the reward-part loss by finite differences through the real AdamW step (``--k-steps`` real
steps), against which every estimator and every stage's fitted DWM is scored: Spearman (over all samples and
within micro-batches) and, on data with ``corrupted-*`` domains (tools/noise_probe.py), clean-vs-corrupted AUC.

    python tools/meta_diagnostic.py RUN_DIR [--tags step0000200,step0000600] [--samples 256] [--out diag.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dwmtrain.analysis.diagnostic import correlations, diagnose  # noqa: E402
from dwmtrain.analysis.preferences import load_run  # noqa: E402
from dwmtrain.checkpoint import RunState  # noqa: E402
from dwmtrain.checkpoint.dwm_file import load_dwm, read_dwm_meta  # noqa: E402
from dwmtrain.data.mixture import open_training_data  # noqa: E402
from dwmtrain.data.validation import REWARD, open_validation  # noqa: E402
from dwmtrain.lr_schedule import scheduled_lr  # noqa: E402
from dwmtrain.meta.metagrad import forward_reads, lm_params, reward_gradient  # noqa: E402
from dwmtrain.meta.rollout import RealStep  # noqa: E402
from dwmtrain.meta.update import checkpoint_lm, checkpoint_moments  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def boundary_tags(rd) -> list[str]:
    """The run's stage-boundary checkpoints (those with consolidated LM weights), oldest first."""
    tags = [p.name for p in sorted(rd.checkpoints.glob("step*")) if rd.lm_weights(p.name).is_file()]
    return [t for t in tags if RunState.read(rd.marker(t)).stage_boundary]


def stage_dwms(rd, num_stages: int) -> dict[int, torch.nn.Module]:
    return {s: load_dwm(rd.dwm(s)).eval() for s in range(2, num_stages + 1) if rd.dwm(s).is_file()}


def diagnose_tag(cfg, rd, tag: str, a, dwms: dict) -> dict:
    state = RunState.read(rd.marker(tag))
    lm = checkpoint_lm(cfg, rd, tag, "eager")[0].to(DTYPES[a.dtype]).eval().requires_grad_(False)
    params = lm_params(lm)
    adam = checkpoint_moments(rd, tag, params)
    step = RealStep(adam, scheduled_lr(cfg, state.scheduler_steps), cfg.optimizer.grad_clip)
    val = open_validation(cfg, rd, REWARD)
    reward = list(val.chunked(range(min(val.n, a.reward_examples)), 32))
    v, tot = reward_gradient(lm, params, reward)
    v = {k: t.div_(tot[1].item()).to(params[k].dtype) for k, t in v.items()}
    data = open_training_data(cfg.data, lm.config.vocab_size)
    B = cfg.deepspeed.micro_batch_size
    idx = np.random.default_rng(a.seed).permutation(len(data))[: a.samples // B * B].reshape(-1, B)
    mbs = [data.batch(list(map(int, row))) for row in idx]

    def dwm_scores(x):  # a DWM that reads the LM's forward reads this LM's (right for the DWM fitted here)
        with torch.no_grad():
            losses, hidden = forward_reads(lm, params, x)
            return {f"dwm_stage{s}": m.score(m.embed(x, hidden=hidden), losses.float() if m.arch.loss_feature else None)
                    .double() for s, m in dwms.items()}  # fmt: skip

    t0 = time.time()
    cols = diagnose(lm, params, mbs, step, reward, v, a.h, a.k_steps, dwm_scores,
                    lambda j: print(f"  {tag}: micro-batch {j}/{len(mbs)}", end="\r", flush=True))  # fmt: skip
    truth = cols.pop("true_effect")
    domains = [data.domain(int(i)) for i in idx.reshape(-1)]
    corr = correlations(cols, truth, domains, B)
    fitted_here = [s for s in dwms if read_dwm_meta(rd.dwm(s))["lm_step"] == state.step]
    return {"tag": tag, "step": state.step, "stage": state.stage, "lr": step.lr, "adam_step": adam.step,
            "samples": len(truth), "reward_examples": int(tot[1].item()), "k_steps": a.k_steps, "h": a.h,
            "dwm_fitted_here": fitted_here, "seconds": time.time() - t0, "correlations": corr,
            "true_effect_std": float(truth.std()), "true_effect_positive": float((truth > 0).mean())}  # fmt: skip


def table(results: list[dict]) -> str:
    """Markdown: one row per checkpoint and score: Spearman with the truth (all, within micro-batch), AUC."""
    rows = ["| checkpoint | score | Spearman | within-batch | AUC all | AUC by kind |", "|---|---|---|---|---|---|"]
    for r in results:
        for name, c in r["correlations"].items():
            mark = " (fitted here)" if name.removeprefix("dwm_stage").isdigit() and int(
                name.removeprefix("dwm_stage")) in r["dwm_fitted_here"] else ""  # fmt: skip
            auc = c.get("auc", {})
            kinds = ", ".join(f"{k} {v:.2f}" for k, v in auc.items() if k != "all")
            rho, within, every = c["spearman"], c["within_batch_spearman"], auc.get("all", float("nan"))
            rows.append(f"| step {r['step']} | {name}{mark} | {rho:+.2f} | {within:+.2f} | {every:.2f} | {kinds} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--tags", default="", help="checkpoints, comma-separated (default: every stage boundary kept)")
    ap.add_argument("--samples", type=int, default=256, help="training sequences (whole micro-batches)")
    ap.add_argument("--reward-examples", type=int, default=256, help="reward-part examples R is measured on")
    ap.add_argument("--k-steps", type=int, default=1, help="real steps in each rollout (the first is perturbed)")
    ap.add_argument("--h", type=float, default=1.0, help="weight perturbation (1: drop vs double the sample)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    rd, cfg = load_run(a.run_dir)
    tags = [t for t in a.tags.split(",") if t] or boundary_tags(rd)
    if not tags:
        print(f"{rd.checkpoints}: no stage-boundary checkpoint", file=sys.stderr)
        return 2
    dwms = stage_dwms(rd, cfg.stages.num_stages)
    results = []
    for tag in tags:
        results.append(diagnose_tag(cfg, rd, tag, a, dwms))
        print(f"{tag}: {results[-1]['seconds']:.0f} s" + " " * 20)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
