#!/usr/bin/env python3
"""Does the bi-level DWM learn? Inject token-shuffled documents and measure how it weighs them.

1. Corrupt a fraction (30% by default) of the bundled corpus's documents by shuffling their tokens
   (domain label "corrupted"), and prepare the mix.
2. Train a short uniform stage (meta.mode=none) with the real deepspeed launcher.
3. Run one meta-update job (python -m dwmtrain.launch.meta_job) on the stage-end checkpoint.
4. Score held-out micro-batches of 8 with the learned DWM and print the ROC-AUC of the weights for
   clean (positive) against corrupted sequences.

With --compare, also train uniform vs bi-level DWM over the same steps on the noisy corpus and report
the validation loss both ways.

    python tools/noise_probe.py --work runs/noise [--preset tiny] [--min-auc 0.8] [--compare]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dwmtrain.analysis.stats import auc_by_kind  # noqa: E402
from dwmtrain.fileio import read_jsonl  # noqa: E402
from dwmtrain.rundir import RunDir  # noqa: E402
from dwmtrain.stages.meta_job import meta_job_command, meta_job_env  # noqa: E402

CORPUS = ROOT / "dwmtrain" / "data" / "corpus"
SP = CORPUS / "sample_sp4096.model"


BOILERPLATE = [
    "Click here to subscribe to our newsletter and never miss an update!",
    "Copyright (c) All rights reserved. Terms of use | Privacy policy | Cookie settings",
    "Share this: Facebook Twitter LinkedIn Email Print",
    "Home > Products > Category > Page 1 of 12 > Next",
    "This website uses cookies to improve your experience. Accept Reject Read more",
]
CORRUPTIONS = ("shuffle", "random", "boilerplate", "file")


def corrupt(text: str, kind: str, rng: random.Random, tok, bad_docs: list[str]) -> str:
    """One corrupted document of about the same length: token-shuffled, uniformly random tokens, repeated
    boilerplate lines, or the next document of a user-given bad file."""
    if kind == "file":
        return bad_docs[rng.randrange(len(bad_docs))]
    ids = tok.encode(text)
    if kind == "shuffle":  # the same tokens, order destroyed
        rng.shuffle(ids)
        return tok.decode(ids)
    if kind == "random":  # pieces drawn uniformly from the vocabulary (byte pieces and specials excluded)
        return tok.decode([rng.randrange(259, tok.vocab_size) for _ in ids])
    lines, n = [], 0
    while n < len(ids):  # boilerplate: a few navigation / legal lines repeated to the original length
        line = BOILERPLATE[rng.randrange(len(BOILERPLATE))]
        lines.append(line)
        n += len(tok.encode(line)) + 1
    return "\n".join(lines)


def build_noisy_corpus(
    out: Path, clean_out: Path, n_docs: int, fraction: float, seed: int, kinds=("shuffle",), bad_file: str = ""
) -> dict:
    """The bundled corpus with ``fraction`` of its documents corrupted, each by one of ``kinds`` (domain label
    ``corrupted-<kind>``), and clean documents the LM never sees (the meta-update's validation set)."""
    from dwmtrain.data.readers import iter_records, text_skip_reason
    from dwmtrain.data.tokenizer import load_tokenizer
    from dwmtrain.errors import DataError

    tok = load_tokenizer(SP)
    rng = random.Random(seed)
    try:
        bad_docs = [r.rec["text"] for r in iter_records([bad_file]) if not text_skip_reason(r.rec.get("text"))] \
            if "file" in kinds else []  # fmt: skip
    except DataError as e:
        sys.exit(f"noise_probe: {e}")
    if "file" in kinds and not bad_docs:
        sys.exit(f"noise_probe: {bad_file}: no documents")
    recs = []
    for r in iter_records([str(CORPUS / "sample.jsonl.zst")]):
        recs.append(r.rec)
        if len(recs) >= n_docs + n_docs // 4:
            break
    # documents the LM never trains on, uncorrupted: the validation set of the meta-update
    with open(clean_out, "w", encoding="utf-8") as f:
        for r in recs[n_docs:]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    recs = recs[:n_docs]
    n_bad = {k: 0 for k in kinds}
    with open(out, "w", encoding="utf-8") as f:
        for r in recs:
            if rng.random() < fraction:
                kind = kinds[rng.randrange(len(kinds))]
                r = {
                    "text": corrupt(r["text"], kind, rng, tok, bad_docs),
                    "meta": {"redpajama_set_name": f"corrupted-{kind}", "original": r["meta"]["redpajama_set_name"]},
                }
                n_bad[kind] += 1
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"documents": len(recs), "corrupted": sum(n_bad.values()), "corrupted_by_kind": n_bad}


def sh(cmd: list[str], log: Path, env: dict | None = None) -> None:
    env = dict(env or os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode:
        sys.exit(f"noise_probe: command failed ({p.returncode}), see {log}: {' '.join(cmd)}")


def pretrain(run_dir: Path, args, overrides: list[str], log: Path) -> None:
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    sh(
        [
            deepspeed,
            "--num_gpus",
            str(args.ranks),
            "--master_port",
            str(29700 + os.getpid() % 200),
            str(ROOT / "launchers" / "pretrain.py"),
            "--config",
            str(ROOT / "launchers" / "configs" / "tiny.yaml"),
            "--run-dir",
            str(run_dir),
            *base_overrides(args),
            *overrides,
        ],
        log,
    )


VALIDATION = {  # the runs' validation source: the meta job's reward part and the report part never share a document
    "heldout": lambda work: ["data.val_source=target", f"data.target.path={work / 'clean.jsonl'}"],
    "lambada": lambda work: ["data.val_source=lambada"],
}


def base_overrides(args) -> list[str]:
    return [
        f"model.preset={args.preset}",
        f"dwm.backbone={args.preset}",
        f"data.train_data={args.work / 'data'}",
        "data.raw=[]",
        f"data.seq_len={args.seq_len}",
        "run.threads_per_rank=1",
        "run.checkpoint_every=1000",
        f"optimizer.lr={args.lm_lr}",
        f"meta.steps={args.meta_steps}",
        f"meta.lr={args.meta_lr}",
        f"meta.nproc={args.ranks}",
        f"meta.lookahead_lr={args.alpha}",
        f"meta.backbone_trainable={not args.head_only}",
        f"deepspeed.global_batch_size={8 * args.ranks}",
        *VALIDATION[args.val](args.work),
        f"meta.val_batch_size={args.val_batch}",
        f"run.seed={args.seed}",
        *args.set,
    ]


def lm_of(run_dir: Path, stage: int, dwm):
    """What ``dwm`` reads of the forward of the LM a stage's DWM was fitted on (its losses, its hidden states)."""
    from dwmtrain.checkpoint.dwm_file import read_dwm_meta
    from dwmtrain.config import load_config
    from dwmtrain.meta.metagrad import lm_params
    from dwmtrain.meta.update import checkpoint_lm, lm_reads

    rd = RunDir(run_dir)
    lm, _ = checkpoint_lm(load_config(rd.config), rd, RunDir.tag(read_dwm_meta(rd.dwm(stage))["lm_step"]))
    lm.eval().requires_grad_(False)
    return lambda x: lm_reads(dwm, lm, lm_params(lm), x)


def score_heldout(run_dir: Path, data_dir: Path, stage: int, passes: int, seed: int):
    """The stage's DWM weights of every held-out sequence, ``passes`` times, each pass in fresh random micro-batches
    of 8 (a weight depends on the batch it is scored in): ([score], [domain]) of equal length."""
    import torch

    from dwmtrain.checkpoint.dwm_file import load_dwm
    from dwmtrain.data.dataset import TokenDataset

    dwm = load_dwm(RunDir(run_dir).dwm(stage)).eval()
    reads = lm_of(run_dir, stage, dwm) if dwm.reads_lm else lambda x: {}
    ds = TokenDataset(data_dir, "heldout")
    rng = random.Random(seed)
    scores, domains = [], []
    with torch.no_grad():
        for _ in range(passes):
            order = rng.sample(range(len(ds)), len(ds))
            for b in range(len(ds) // 8):
                idx = order[8 * b : 8 * b + 8]
                x = ds.batch(idx)
                scores += dwm(x, **reads(x)).tolist()
                domains += [ds.domain(i) for i in idx]
    return scores, domains


def stage_end_val(run_dir: Path) -> dict[int, float]:
    """{step: clean held-out validation loss} at every stage end (eval.jsonl)."""
    recs = read_jsonl(RunDir(run_dir).evals)
    return {r["step"]: r["val_loss"] for r in recs}


ARMS = {
    "uniform": ["meta.mode=none"],
    "oracle": ["meta.mode=oracle"],  # every corrupted-<kind> domain weighted 0: the headroom (drop list: compare)
    "oracle2": ["meta.mode=oracle", "meta.oracle.from_stage=2"],  # the same after a uniform stage 1, as the DWM
    "dwm": ["meta.mode=bilevel"],
    "refresh": ["meta.mode=bilevel", "dwm.refresh_backbone=true"],  # the backbone copied from the LM at every boundary
    "lossfeat": ["meta.mode=bilevel", "dwm.loss_feature=true"],  # the LM's per-sample loss an input of the DWM
    "adam": ["meta.mode=bilevel", "meta.lookahead=adam"],  # the AdamW lookahead from the checkpoint's moments
    # the fitted DWM's logit scale chosen by 20-step real rollouts from the checkpoint, scored on the reward part
    "strength": ["meta.mode=bilevel", "meta.strength=[0,0.5,1,2]", "meta.strength_steps=20"],
    # no backbone: the LM's own hidden states of each forward
    "hidden": ["meta.mode=bilevel", "dwm.features=lm", "dwm.backbone=lm"],
    # weighting from step 50 (stage 1 a twentieth of the run, not a fifth), boundaries dense at the start: the paper's
    # DWM refitted early and often (for a run of 1,000 steps; other lengths scale the boundaries)
    "early": ["meta.mode=bilevel", "stages.num_stages=6"],
    "warm": ["meta.mode=bilevel"],  # + meta.init_dwm: a proxy run's DWM weighs stage 1 (compare trains the proxy)
    # + meta.init_dwm: the same seed's finished dwm arm's last DWM weighs stage 1 and is continued (the paper's
    # Tables 10/11: a mature DWM from the start); its reward part is the one every arm's meta job uses
    "mature": ["meta.mode=bilevel"],
    "loss": ["meta.mode=loss_reweight"],  # Sow et al. 2025, linupper, tau 1, uniform for the first 5% of steps
    "dsir": ["meta.mode=none"],  # + data.train_data: uniform training on the DSIR-selected part of the pool
    # + data.train_data: uniform training on a QuRating-style selection (sampled ∝ exp(score / 2)), the score a
    # proxy LM's per-document loss (negated): no QuRater exists offline for this corpus (qurating_data)
    "qurating": ["meta.mode=none"],
}
EARLY = (50, 100, 200, 400, 700)  #: the early arm's stage starts per 1,000 steps
PROXY_SHARE = 10  # the warm start's proxy run: a tenth of the main run's steps (tokens), 2 stages


def arm_overrides(arm: str, args, seed: int, log: Path) -> list[str]:
    """What an arm adds to the runs' common overrides, training what it needs first (the warm start's proxy run,
    the DSIR selection of the pool)."""
    if arm.startswith("oracle"):
        return [f"meta.oracle.drop=[{','.join(f'corrupted-{k}' for k in args.corruption)}]"]
    if arm == "warm":
        proxy = args.work / f"proxy-s{seed}"
        steps = max(args.compare // PROXY_SHARE, 4)
        t0 = time.time()
        pretrain(proxy, args, ["meta.mode=bilevel", f"stages.total_steps={steps}", "stages.num_stages=2",
                               "run.eval_batches=8", f"run.seed={seed}"], log)  # fmt: skip
        (proxy / "proxy_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        return [f"meta.init_dwm={proxy}"]
    if arm == "dsir":
        return [f"data.train_data={dsir_data(args, log)}"]
    if arm == "mature":
        donor = args.work / f"cmp-dwm-s{seed}"
        if not (donor / "dwm").is_dir():
            raise SystemExit(f"--arms mature needs the dwm arm of seed {seed} first ({donor})")
        return [f"meta.init_dwm={donor}"]
    if arm == "early":
        return [f"stages.boundaries=[{','.join(str(args.compare * k // 1000) for k in EARLY)}]"]
    if arm == "qurating":
        return [f"data.train_data={qurating_data(args, log)}"]
    return []


def qurating_data(args, log: Path) -> Path:
    """A QuRating-style selection of the pool (``select qurating``: sampled ∝ exp(score / 2), the paper's τ, as
    many documents as the pool has clean ones), the score of a document minus its mean token loss under a proxy LM
    (a tenth of the main run's steps on the pool, uniform; its first 128 tokens): a perplexity filter in
    QuRating's selection. Made once for every seed."""
    out = args.work / "data-qurating"
    if (out / "index.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.tokenizer import load_tokenizer

    proxy, hf = args.work / "proxy-lm", args.work / "proxy-lm-hf"
    pretrain(proxy, args, ["meta.mode=none", f"stages.total_steps={max(args.compare // PROXY_SHARE, 4)}",
                           "stages.num_stages=1", "run.seed=0"], log)  # fmt: skip
    sh([sys.executable, "-m", "dwmtrain", "export", str(proxy), "--out", str(hf), "--overwrite"], log)
    lm, tok = AutoModelForCausalLM.from_pretrained(hf).eval(), load_tokenizer(SP)
    scored = args.work / "select" / "scored.jsonl"
    scored.parent.mkdir(parents=True, exist_ok=True)
    with open(args.work / "noisy.jsonl", encoding="utf-8") as f, open(scored, "w", encoding="utf-8") as g:
        for ln in f:
            rec = json.loads(ln)
            ids = torch.tensor([tok.document(rec["text"])[:128]])
            with torch.no_grad():
                loss = lm(input_ids=ids, labels=ids).loss.item()
            rec.setdefault("meta", {})["quality"] = {"minus_proxy_loss": -loss}
            g.write(json.dumps(rec, ensure_ascii=False) + "\n")
    info = json.loads((args.work / "corpus.json").read_text())
    sel = args.work / "select" / "qurating.jsonl"
    sh([sys.executable, "-m", "dwmtrain", "select", "qurating", "--input", str(scored), "--out", str(sel),
        "--score-field", "meta.quality.minus_proxy_loss", "--temperature", "2.0", "--normalize", "--budget-docs",
        str(info["documents"] - info["corrupted"]), "--no-progress", "--overwrite"], log)  # fmt: skip
    prepare_data([str(sel)], str(SP), str(out), seq_len=args.seq_len, workers=2, heldout_fraction=0.05,
                 progress=False)  # fmt: skip
    return out


def dsir_data(args, log: Path) -> Path:
    """The pool's DSIR selection (target: the clean documents of the meta job's reward part, never the report part
    the arms are scored on; as many documents as the pool has clean ones), prepared like the pool; made once for
    every seed."""
    out = args.work / "data-dsir"
    if (out / "index.json").is_file():
        return out
    from dwmtrain.data.prepare import prepare_data

    sel = args.work / "select" / "dsir.jsonl"
    info = json.loads((args.work / "corpus.json").read_text())
    sh([sys.executable, "-m", "dwmtrain", "select", "dsir", "--input", str(args.work / "noisy.jsonl"), "--out",
        str(sel), "--target-file", str(reward_documents(args)), "--budget-docs",
        str(info["documents"] - info["corrupted"]), "--no-progress", "--overwrite"], log)  # fmt: skip
    prepare_data([str(sel)], str(SP), str(out), seq_len=args.seq_len, workers=2, heldout_fraction=0.05,
                 progress=False)  # fmt: skip
    return out


def reward_documents(args) -> Path:
    """WORK/clean_reward.jsonl: the clean documents in the runs' reward part (their split, computed the same way)."""
    from dwmtrain.config import load_config
    from dwmtrain.data.validation import REWARD, validation_set

    if args.val != "heldout":  # the clean documents are no run's reward or report then: all of them
        return args.work / "clean.jsonl"
    cfg = load_config(str(ROOT / "launchers" / "configs" / "tiny.yaml"), base_overrides(args))
    return write_documents(validation_set(cfg, REWARD), args.work / "clean.jsonl", args.work / "clean_reward.jsonl")


def write_documents(part, source: Path, out: Path) -> Path:
    """The records of ``source`` (JSON lines) whose documents are in ``part`` (a target's validation part)."""
    keep = {part.docs[i] for i in part.ids}
    lines = [x for x in source.read_text(encoding="utf-8").split("\n") if x.strip()]  # as the reader splits them
    out.write_text("".join(x + "\n" for place, x in enumerate(lines) if place in keep), encoding="utf-8")
    return out


def gap_table(vals: dict, last: int) -> list[dict]:
    """Per arm and oracle: the share of the oracle's gain over uniform the arm closes at step ``last`` (of the means,
    and per seed), and its paired gain over uniform in nats and in standard deviations."""
    out = []
    if "uniform" not in vals:
        return out
    u = [v[last] for v in vals["uniform"]]
    for oracle in [o for o in ("oracle", "oracle2") if o in vals]:
        o = [v[last] for v in vals[oracle]]
        for arm in [a for a in vals if a not in ("uniform", "oracle", oracle)]:
            x = [v[last] for v in vals[arm]]
            gains = [a - b for a, b in zip(u, x)]  # positive: the arm helps
            gm, gs = mean_std(gains)
            out.append({"arm": arm, "oracle": oracle,
                        "gap_of_means": (mean_std(u)[0] - mean_std(x)[0]) / (mean_std(u)[0] - mean_std(o)[0]),
                        "gap_per_seed": [(a - b) / (a - c) for a, b, c in zip(u, x, o)], "gain": gm, "gain_std": gs,
                        "gain_in_std": gm / gs if gs > 0 else float("inf"),
                        "better_seeds": sum(g > 0 for g in gains)})  # fmt: skip
    return out


def proxy_cost(args) -> dict:
    """The warm start's proxy run against the main run: its share of the training tokens (steps: the same batch and
    model) and of the wall time measured here, over the seeds."""
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    proxy = sum(float((args.work / f"proxy-s{s}" / "proxy_seconds.txt").read_text()) for s in seeds)
    main = sum(float((args.work / f"cmp-warm-s{s}" / "seconds.txt").read_text()) for s in seeds)
    return {"tokens": max(args.compare // PROXY_SHARE, 4) / args.compare, "seconds": proxy / main}


ARM_LABELS = {"uniform": "uniform", "oracle": "oracle (corrupted weighted 0)", "oracle2": "oracle from stage 2",
              "dwm": "DWM (bi-level, uniform stage 1)", "warm": "DWM warm-started from a proxy",
              "refresh": "DWM, backbone refreshed at every boundary",
              "lossfeat": "DWM with the LM's per-sample loss as input", "adam": "DWM, AdamW lookahead",
              "hidden": "DWM on the LM's own hidden states",
              "strength": "DWM, strength chosen by rollouts",
              "early": "DWM, stage 1 of 50 steps, dense early boundaries",
              "mature": "DWM warm-started from a finished run's last DWM",
              "loss": "loss reweighting (linupper)", "dsir": "DSIR-selected data",
              "qurating": "QuRating-style selection (proxy-LM loss)"}  # fmt: skip


def figure(compare: dict, path: Path) -> Path:
    """Clean held-out validation loss at every stage end, per arm: the mean over seeds and a band of one std."""
    from dwmtrain.analysis.plots import new_figure, save_png

    fig = new_figure(7.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for arm, runs in compare["val_loss"].items():
        steps = sorted(int(s) for s in runs[0])  # each arm's own stage ends
        ms = [mean_std([at_step(r, s) for r in runs]) for s in steps]
        m, sd = [x[0] for x in ms], [x[1] for x in ms]
        ax.plot(steps, m, marker="o", ms=3, label=f"{ARM_LABELS.get(arm, arm)} ({len(runs)} seeds)")
        ax.fill_between(steps, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.15)
    ax.set_xlabel("step (stage ends)")
    ax.set_ylabel("clean held-out validation loss")
    ax.legend(fontsize=7)
    return save_png(fig, path)


def at_step(by_step: dict, step):
    """A value at ``step`` (a run's table read back from JSON has string steps)."""
    return by_step[step] if step in by_step else by_step[str(step)]


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1)) ** 0.5


def finished(run: Path, steps: int) -> bool:
    """A run this probe finished before (its time written, its last step evaluated): read, not relaunched."""
    return (run / "seconds.txt").is_file() and RunDir(run).evals.is_file() and steps in stage_end_val(run)


def compare(args, log: Path) -> dict:
    """uniform / oracle / DWM over the same steps, data order and seed (per seed); stage-end validation."""
    vals: dict[str, list[dict[int, float]]] = {arm: [] for arm in args.arms}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for arm in args.arms:
            run = args.work / f"cmp-{arm}-s{seed}"
            if not finished(run, args.compare):
                over = [f"stages.total_steps={args.compare}", f"stages.num_stages={args.stages}", "run.eval_batches=8"]
                extra = arm_overrides(arm, args, seed, log)
                t0 = time.time()
                pretrain(run, args, [*over, *ARMS[arm], *extra, f"run.seed={seed}"], log)  # the arm's stages win
                (run / "seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
            vals[arm].append(stage_end_val(run))
            print(f"  {arm} seed {seed}: " + ", ".join(f"{v:.4f}" for v in vals[arm][-1].values()), flush=True)
    steps = sorted(vals[args.arms[0]][0])
    lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for arm in args.arms:  # an arm of other stage ends (early) has no figure at some steps
        cells = [mean_std([v[s] for v in vals[arm]]) if all(s in v for v in vals[arm]) else None for s in steps]
        lines.append(f"| {arm} | " + " | ".join(f"{c[0]:.4f} ± {c[1]:.4f}" if c else "-" for c in cells) + " |")
    out = {"steps": steps, "val_loss": vals, "gaps": gap_table(vals, steps[-1])}
    for g in out["gaps"]:
        lines.append(
            f"\n{g['arm']} at step {steps[-1]} against {g['oracle']}: {100 * g['gap_of_means']:.1f}% of its gain "
            f"closed (of the means; per seed {', '.join(f'{100 * x:.1f}%' for x in g['gap_per_seed'])}); better than "
            f"uniform by {g['gain']:.4f} ± {g['gain_std']:.4f} nats ({g['gain_in_std']:.1f} std; better in "
            f"{g['better_seeds']} of {len(g['gap_per_seed'])} seeds)"
        )
    if "warm" in vals:
        out["proxy_cost"] = proxy_cost(args)
        lines.append(f"\nthe warm start's proxy: {out['proxy_cost']['tokens']:.1%} of the main run's training tokens, "
                     f"{out['proxy_cost']['seconds']:.1%} of its time (here)")  # fmt: skip
    out["table"] = "\n".join(lines)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "noise")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--docs", type=int, default=1500)
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1500, help="uniform stage length (optimizer steps)")
    ap.add_argument("--meta-steps", type=int, default=80)
    ap.add_argument("--meta-lr", type=float, default=5e-4)
    ap.add_argument("--lm-lr", type=float, default=3e-3)
    ap.add_argument("--alpha", type=float, default=1e-3, help="lookahead step size")
    ap.add_argument("--head-only", action="store_true", help="train only the DWM head, not its backbone")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument(
        "--val",
        default="heldout",
        choices=("heldout", "lambada"),
        help="validation source: the clean documents the LM never trains on (default; whole documents split into "
        "the meta job's reward part and the reported part) or the cloze set",
    )
    ap.add_argument("--val-batch", type=int, default=16)
    ap.add_argument("--score-passes", type=int, default=2, help="held-out scoring: passes over every sequence")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-auc", type=float, default=0.0, help="exit 1 if the AUC is below this")
    ap.add_argument(
        "--compare",
        type=int,
        default=0,
        metavar="STEPS",
        help="also train the --arms for STEPS steps (5 stages) per seed and tabulate stage-end validation loss",
    )
    ap.add_argument("--compare-only", action="store_true", help="skip the AUC probe (e.g. --fraction 0: clean data)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="delete --work first (default: keep it; a run already there "
        "resumes or, finished, is read as it is; the corpus is rebuilt the same from the same settings)",
    )
    ap.add_argument("--first-seed", type=int, default=0, help="--compare: seeds FIRST..FIRST+N-1")
    ap.add_argument("--stages", type=int, default=5, help="--compare: stages per run (stage 1 uniform)")
    ap.add_argument("--seeds", type=int, default=1, help="--compare: seeds 0..N-1 (data order and init)")
    ap.add_argument("--arms", default="uniform,oracle,dwm", type=lambda v: v.split(","),
                    help=f"--compare arms: {', '.join(ARMS)}")  # fmt: skip
    ap.add_argument(
        "--corruption", default="shuffle", type=lambda v: v.split(","),
        help=f"how corrupted documents are made, comma-separated kinds mixed at random: {', '.join(CORRUPTIONS)}",
    )  # fmt: skip
    ap.add_argument("--bad-file", default="", help="--corruption file: SlimPajama JSONL of bad documents to mix in")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every run and the meta job (e.g. meta.spread_penalty=1.0)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if unknown := set(args.arms) - set(ARMS):
        ap.error(f"--arms: unknown arm(s) {sorted(unknown)} (arms: {', '.join(ARMS)})")
    if unknown := set(args.corruption) - set(CORRUPTIONS):
        ap.error(f"--corruption: unknown kind(s) {sorted(unknown)} (kinds: {', '.join(CORRUPTIONS)})")
    if ("file" in args.corruption) != bool(args.bad_file):
        ap.error("--bad-file goes with --corruption file (and needs it)")
    args.work = args.work.resolve()
    return args


def prepare_corpora(args) -> dict:
    """The noisy corpus written and prepared; the clean documents written (every run splits them into the meta
    job's reward part and the report part, whole documents on one side)."""
    from dwmtrain.data.prepare import prepare_data

    info = build_noisy_corpus(
        args.work / "noisy.jsonl", args.work / "clean.jsonl", args.docs, args.fraction, args.seed,
        args.corruption, args.bad_file,
    )  # fmt: skip
    # replaced whole when prepared (the same bytes from the same settings: a kept run's data check still passes)
    prepare_data([str(args.work / "noisy.jsonl")], str(SP), str(args.work / "data"), seq_len=args.seq_len, workers=2,
                 heldout_fraction=0.05, progress=False, overwrite=True)  # fmt: skip
    (args.work / "corpus.json").write_text(json.dumps(info))
    kinds = ", ".join(f"{n} {k}" for k, n in info["corrupted_by_kind"].items())
    print(f"noisy corpus: {info['corrupted']}/{info['documents']} documents corrupted ({kinds})", flush=True)
    return info


def auc_probe(args, log: Path) -> dict:
    """One uniform stage, one meta-update, then how well the DWM's weights separate clean from corrupted."""
    run = args.work / "probe"
    pretrain(run, args, ["meta.mode=none", f"stages.total_steps={args.steps}", "stages.num_stages=1"], log)
    tag = json.loads(RunDir(run).latest.read_text())["tag"]
    sh(meta_job_command(run, 2, tag, args.ranks), log, env=meta_job_env())
    scores, domains = score_heldout(run, args.work / "data", 2, args.score_passes, args.seed)
    aucs = auc_by_kind(scores, domains)
    clean = [s for s, d in zip(scores, domains) if not d.startswith("corrupted-")]
    bad = [s for s, d in zip(scores, domains) if d.startswith("corrupted-")]
    print(
        f"held-out samples: {len(clean)} clean, {len(bad)} corrupted; mean weight clean "
        f"{sum(clean) / len(clean):.3f}, corrupted {sum(bad) / len(bad):.3f}; "
        f"weights {min(scores):.3f}..{max(scores):.3f}"
    )
    print("ROC-AUC (clean vs corrupted): " + ", ".join(f"{k} {v:.3f}" for k, v in aucs.items()), flush=True)
    weights = {"clean_mean": sum(clean) / len(clean), "corrupted_mean": sum(bad) / len(bad)}
    weights.update(min=min(scores), max=max(scores))
    return {"auc": aucs["all"], "auc_by_kind": aucs, "clean": len(clean), "corrupted": len(bad), "weights": weights}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "log.txt"
    result = prepare_corpora(args)
    if not args.compare_only:
        result.update(auc_probe(args, log))
    if args.compare:
        result["compare"] = compare(args, log)
        print(result["compare"]["table"], flush=True)
        print(f"wrote {figure(result['compare'], args.work / 'arms.png')}", flush=True)
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    return 1 if min(result.get("auc_by_kind", {"-": 1.0}).values()) < args.min_auc else 0


if __name__ == "__main__":
    sys.exit(main())
