"""Which data does each stage's DWM prefer? (the paper's Section 5.3, Figures 3 and 5)

The same N samples, cut into the same micro-batches, are scored by every stage's DWM exactly as training
scores them (eval mode, no grad, weights B*softmax(z/T) normalized within each micro-batch of B, mean 1).

Split rule (figures, counts, shares, summary): a sample is *preferred* when its weight is above 1 (its loss
counts more than under uniform weighting), *unpreferred* when below 1; weights within 1e-6 of 1 are neutral
(a uniform DWM prefers nothing). The weight is what training applies, but it is relative: it only compares a
sample with the 7 others of its micro-batch. ``split_by="logit"`` instead splits at the median raw logit z of all
N samples, a global ranking; the rank correlations between stages use the logits (and, in the JSON, the weights
and the mean within-micro-batch rank correlation, the agreement that matters to training).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dwmtrain.analysis.plots import (
    PREFERRED,
    STAGE_COLORS,
    UNPREFERRED,
    new_figure,
    panels,
    save_png,
    styled,
)
from dwmtrain.errors import DataError, DWMTrainError
from dwmtrain.fileio import atomic_write_text

FORMAT = "dwmtrain-preferences-v1"
NEUTRAL_TOL = 1e-6  # |w - 1| below this is "no preference": exactly uniform weights come out as 1.0 in fp32
SMOOTH = 0.5  # pseudo-count per domain in the share ratio, so a domain absent from one side stays finite
HIST_BINS = 40
SHARE_KEYS = ("share_preferred", "share_unpreferred")


class AnalysisError(DWMTrainError, ValueError):
    """A run directory, output path or request the analysis cannot use."""


# ----------------------------------------------------------------------------- scoring


def resolve_device(device: str = "auto", precision: str = "auto") -> tuple[str, torch.dtype]:
    """(device, DWM dtype) as training picks them: bf16 on GPU unless the run trains in fp32, fp32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnalysisError(f"--device {device}: no CUDA device available")
    if device == "cpu" or precision == "fp32":
        return device, torch.float32
    return device, torch.bfloat16


def choose_samples(
    available: int, samples: int = 0, seed: int = 0, micro_batch: int = 8, shuffle: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Sample indices to score, a multiple of ``micro_batch`` long, and notes for the user.

    ``samples`` > 0: a seeded random choice of that many (all of them if fewer exist); 0: all, in order
    (shuffled with ``shuffle``).
    """
    notes = []
    if samples < 0:
        raise AnalysisError(f"--samples {samples}: must be >= 0")
    n = available if samples == 0 else min(samples, available)
    if samples > available:
        notes.append(f"asked for {samples} samples, the split has {available}: using all of them")
    rng = np.random.default_rng(seed)
    if samples > 0:
        idx = rng.choice(available, size=n, replace=False)
    else:
        idx = rng.permutation(available) if shuffle else np.arange(available)
    keep = n // micro_batch * micro_batch
    if keep == 0:
        raise DataError(f"{n} samples: need at least one micro-batch of {micro_batch}")
    if keep < n:
        notes.append(f"{n} samples rounded down to {keep} ({keep // micro_batch} micro-batches of {micro_batch})")
    if samples == 0 and not shuffle:
        notes.append(
            "samples in file order: a micro-batch holds neighbouring sequences (often one document), "
            "unlike training's shuffled micro-batches (use --samples or --shuffle for a random choice)"
        )
    return idx[:keep].astype(np.int64), notes


@torch.no_grad()
def score_dataset(
    dwm,
    dataset,
    indices: Sequence[int],
    micro_batch: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_logits: bool = False,
    progress: bool = False,
):
    """Weights [n] of ``dataset[indices]`` in consecutive micro-batches, as training computes them.

    ``n`` is len(indices) rounded down to a multiple of ``micro_batch``. The DWM is moved to ``device``/``dtype``
    and put in eval mode. With ``with_logits``, returns (weights, logits): z before the softmax, read from the
    output layer during the same forward, so the weights are exactly ``dwm(x).float()``.
    """
    from tqdm import tqdm

    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx) // micro_batch * micro_batch
    dwm = dwm.to(device=device, dtype=dtype).eval()
    weights = np.empty(n, dtype=np.float64)
    logits = np.full(n, np.nan, dtype=np.float64)
    seen: list[torch.Tensor] = []
    out_layer = getattr(dwm, "fc2", None)
    hook = out_layer.register_forward_hook(lambda m, i, o: seen.append(o)) if out_layer is not None else None
    try:
        for s in tqdm(range(0, n, micro_batch), disable=not progress, unit="mb", leave=False, mininterval=2):
            x = dataset.batch(idx[s : s + micro_batch].tolist()).to(device)
            w = dwm(x).float()  # the training code's weigh(): dwm(x).float()
            if w.shape != (micro_batch,):
                raise DWMTrainError(
                    f"DWM returned weights of shape {tuple(w.shape)} for a micro-batch of {micro_batch}"
                )
            weights[s : s + micro_batch] = w.cpu().double().numpy()
            if seen:
                logits[s : s + micro_batch] = seen.pop().reshape(-1).float().cpu().double().numpy()
                seen.clear()
    finally:
        if hook is not None:
            hook.remove()
    return (weights, logits) if with_logits else weights


def sample_texts(ds, indices: np.ndarray, tokenizer: str | os.PathLike | None = None) -> list[str]:
    """The text of each sample, decoded with ``tokenizer`` (default: the one the data was prepared with,
    recorded in its index.json; its sha256 is checked when recorded)."""
    from dwmtrain.data.tokenizer import load_tokenizer
    from dwmtrain.fileio import sha256_file

    path = tokenizer or ds.index.get("tokenizer")
    if not path or not Path(path).is_file():
        raise DataError(f"{ds.path}: tokenizer {path!r} to decode its samples not found (pass --tokenizer FILE)")
    want = ds.index.get("tokenizer_sha256")
    if want and sha256_file(path) != want:
        raise DataError(f"tokenizer {path}: not the one {ds.path} was prepared with (sha256 differs)")
    tok = load_tokenizer(path)
    return [tok.decode(ds[int(i)].tolist()) for i in indices]


def quality_scores(
    texts: list[str], rater: str, device: str = "cpu", names: list[str] | None = None, max_length: int = 512
) -> dict[str, np.ndarray]:
    """Per-sample quality scores of ``texts`` (Figure 3's dimensions: QuRater-1.3B's writing style, required
    expertise, facts and trivia, educational value), one field per label of a local rater model."""
    from dwmtrain.select.qurating import load_rater, rater_label_names, rater_logits

    tok, model = load_rater(rater, device)
    labels = rater_label_names(model, names)
    logits = rater_logits(texts, tok, model, max_length)
    return {name: logits[:, k] for k, name in enumerate(labels)}


def score_records(
    indices: np.ndarray,
    weights: np.ndarray,
    logits: np.ndarray,
    dataset,
    micro_batch: int = 8,
    quality: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """One record per scored sample: index, micro_batch, weight, logit, domain (+ quality fields)."""
    quality = quality or {}
    recs = []
    for j in range(len(weights)):
        r = {
            "index": int(indices[j]),
            "micro_batch": j // micro_batch,
            "weight": float(weights[j]),
            "logit": None if math.isnan(logits[j]) else float(logits[j]),
            "domain": dataset.domain(int(indices[j])),
        }
        r.update({k: float(v[j]) for k, v in quality.items()})
        recs.append(r)
    return recs


def check_out_suffix(path: str | os.PathLike) -> str:
    """'jsonl' or 'parquet' from the file name, else an error naming it."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise AnalysisError(f"--out {path}: name it .jsonl or .parquet (the suffix picks the format)")
    return suffix[1:]


def write_records(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as JSONL or Parquet (by suffix), atomically."""
    path = Path(path)
    kind = check_out_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pylist(records), str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def score_summary(records: list[dict]) -> str:
    """Samples, mean/min/max weight, and the mean weight per domain (highest first)."""
    w = np.array([r["weight"] for r in records])
    lines = [f"samples: {len(w)}   weight mean {w.mean():.4f}  min {w.min():.4f}  max {w.max():.4f}"]
    by: dict[str, list[float]] = {}
    for r in records:
        by.setdefault(r["domain"], []).append(r["weight"])
    width = max(len(d) for d in by)
    lines.append("mean weight per domain:")
    for d, ws in sorted(by.items(), key=lambda kv: -np.mean(kv[1])):
        lines.append(f"  {d:<{width}}  {np.mean(ws):.4f}  ({len(ws)} samples)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their average rank (as scipy.stats.rankdata's default)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks); nan if either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def within_batch_spearman(a: np.ndarray, b: np.ndarray, micro_batch: int) -> float:
    """Mean Spearman rho over micro-batches (the ranking training acts on); batches constant in either skipped."""
    rs = [spearman(a[s : s + micro_batch], b[s : s + micro_batch]) for s in range(0, len(a), micro_batch)]
    rs = [r for r in rs if not math.isnan(r)]
    return float(np.mean(rs)) if rs else float("nan")


def correlation_matrix(series: list[np.ndarray], fn: Callable[[np.ndarray, np.ndarray], float]) -> np.ndarray:
    """Symmetric matrix of ``fn`` over every pair; the diagonal is 1."""
    k = len(series)
    m = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            m[i, j] = m[j, i] = fn(series[i], series[j])
    return m


def preference_labels(weights: np.ndarray, logits: np.ndarray | None = None, by: str = "weight") -> np.ndarray:
    """+1 preferred, -1 unpreferred, 0 neutral (see the module docstring for the rule)."""
    if by == "weight":
        v, pivot = np.asarray(weights), 1.0
    elif by == "logit":
        if logits is None or np.isnan(logits).any():
            raise AnalysisError("split by logit: this DWM does not expose its logits")
        v, pivot = np.asarray(logits), float(np.median(logits))
    else:
        raise AnalysisError(f"split rule {by!r}: must be weight or logit")
    return np.where(v > pivot + NEUTRAL_TOL, 1, np.where(v < pivot - NEUTRAL_TOL, -1, 0)).astype(np.int8)


def _stats(x: np.ndarray) -> dict:
    if np.isnan(x).all():
        return {}
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "quantiles": dict(zip(("p05", "p25", "p50", "p75", "p95"), map(float, q))),
    }


def domain_table(labels: np.ndarray, domains: np.ndarray, names: list[str], weights, logits) -> dict:
    """Per domain present in the sample: counts, shares of preferred / unpreferred samples, their ratio, means."""
    n_pref, n_unpref = int((labels == 1).sum()), int((labels == -1).sum())
    present = [d for d in range(len(names)) if (domains == d).any()]
    k = len(present)
    out = {}
    for d in present:
        m = domains == d
        p, u = int((m & (labels == 1)).sum()), int((m & (labels == -1)).sum())
        both = n_pref > 0 and n_unpref > 0
        ratio = ((p + SMOOTH) / (n_pref + SMOOTH * k)) / ((u + SMOOTH) / (n_unpref + SMOOTH * k)) if both else None
        out[names[d]] = {
            "count": int(m.sum()),
            "share_all": float(m.mean()),
            "preferred": p,
            "unpreferred": u,
            "share_preferred": p / n_pref if n_pref else None,
            "share_unpreferred": u / n_unpref if n_unpref else None,
            "share_ratio": ratio,
            "mean_weight": float(weights[m].mean()),
            "mean_logit": None if np.isnan(logits[m]).all() else float(np.nanmean(logits[m])),
        }
    return out


@dataclass
class StageScores:
    """One stage's DWM scores of the shared samples."""

    stage: int
    path: str
    weights: np.ndarray
    logits: np.ndarray
    meta: dict = field(default_factory=dict)


def compute_preferences(
    stages: list[StageScores],
    domains: np.ndarray,
    domain_names: list[str],
    micro_batch: int = 8,
    quality: dict[str, np.ndarray] | None = None,
    split_by: str = "weight",
) -> dict:
    """Everything numeric: per-stage counts, domain shares, weight histogram, quality means, correlations."""
    quality = quality or {}
    top = max(float(s.weights.max()) for s in stages)
    edges = np.linspace(0.0, max(2.0, math.ceil(top * 10) / 10), HIST_BINS + 1).round(6)
    rep_stages = []
    for s in stages:
        labels = preference_labels(s.weights, s.logits, split_by)
        hist, _ = np.histogram(s.weights, bins=edges)
        st = {
            "stage": s.stage,
            "path": s.path,
            "lm_step": s.meta.get("lm_step"),
            "sha256": s.meta.get("sha256"),
            "counts": {
                "preferred": int((labels == 1).sum()),
                "unpreferred": int((labels == -1).sum()),
                "neutral": int((labels == 0).sum()),
            },
            "weight": _stats(s.weights),
            "logit": _stats(s.logits),
            "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
            "domains": domain_table(labels, domains, domain_names, s.weights, s.logits),
        }
        if quality:
            st["quality"] = {
                k: {
                    "mean_preferred": float(v[labels == 1].mean()) if (labels == 1).any() else None,
                    "mean_unpreferred": float(v[labels == -1].mean()) if (labels == -1).any() else None,
                    "mean_all": float(v.mean()),
                }
                for k, v in quality.items()
            }
        rep_stages.append(st)
    has_logits = all(not np.isnan(s.logits).any() for s in stages)
    corr = {
        "stages": [s.stage for s in stages],
        "spearman_weight": correlation_matrix([s.weights for s in stages], spearman).tolist(),
        "within_micro_batch_spearman": correlation_matrix(
            [s.weights for s in stages], lambda a, b: within_batch_spearman(a, b, micro_batch)
        ).tolist(),
    }
    if has_logits:
        corr["spearman_logit"] = correlation_matrix([s.logits for s in stages], spearman).tolist()
    return {
        "format": FORMAT,
        "split_rule": split_by,
        "micro_batch": micro_batch,
        "samples": int(len(domains)),
        "domain_names": list(domain_names),
        "sample_domain_counts": {
            domain_names[d]: int((domains == d).sum()) for d in range(len(domain_names)) if (domains == d).any()
        },
        "quality_fields": sorted(quality),
        "stages": rep_stages,
        "correlation": corr,
    }


# ----------------------------------------------------------------------------- summary


def _ranked_domains(st: dict) -> list[tuple[str, dict]]:
    rows = [(d, v) for d, v in st["domains"].items() if v["share_ratio"] is not None]
    return sorted(rows, key=lambda kv: -kv[1]["share_ratio"])


def _share(v: dict) -> str:
    return f"{100 * v['share_preferred']:.1f}% of preferred vs {100 * v['share_unpreferred']:.1f}% of unpreferred"


def split_rule_text(split_by: str) -> str:
    if split_by == "logit":
        return "preferred = raw logit above the median of all samples, unpreferred = below"
    return "preferred = weight > 1 (above its micro-batch's mean), unpreferred = weight < 1"


def lowest_correlation(report: dict) -> tuple[int, int, float, str] | None:
    """(stage a, stage b, rho, which) of the least similar pair of stages, or None with fewer than 2."""
    c = report["correlation"]
    key = "spearman_logit" if "spearman_logit" in c else "spearman_weight"
    m, st = np.array(c[key], dtype=float), c["stages"]
    pairs = [(st[i], st[j], m[i, j]) for i in range(len(st)) for j in range(i + 1, len(st)) if not np.isnan(m[i, j])]
    if not pairs:
        return None
    a, b, r = min(pairs, key=lambda p: p[2])
    return a, b, float(r), key.split("_")[1] + "s"


def summary_text(report: dict) -> str:
    """A few lines per stage: counts, the most over- and under-preferred domains; the least similar stages."""
    r = report
    head = f"DWM data preferences: {r.get('run_dir', '')}".rstrip(": ")
    lines = [
        head,
        f"samples: {r['samples']} from {r.get('data', '?')} ({r.get('split', '?')} split, seed {r.get('seed', '?')}), "
        f"{r['samples'] // r['micro_batch']} micro-batches of {r['micro_batch']}, the same for every stage",
        f"split: {split_rule_text(r['split_rule'])}",
        "stage 1: uniform weights (no DWM)",
    ]
    missing = {m["stage"]: m["path"] for m in r.get("stages_missing", [])}
    for st in r["stages"]:
        for k in sorted(k for k in missing if k < st["stage"]):
            lines.append(f"stage {k}: no DWM file ({missing.pop(k)}): skipped")
        c, w = st["counts"], st["weight"]
        step = f", LM step {st['lm_step']}" if st.get("lm_step") is not None else ""
        lines.append(
            f"stage {st['stage']} ({st['path']}{step}): {c['preferred']} preferred / {c['unpreferred']} unpreferred"
            + (f" / {c['neutral']} neutral" if c["neutral"] else "")
            + f"; weight {w['min']:.3f}..{w['max']:.3f}"
        )
        ranked = _ranked_domains(st)
        if not ranked:
            lines.append("  no preference: every weight is 1")
            continue
        width = max(len(d) for d, _ in ranked)
        over, under = ranked[0], ranked[-1]
        if over[1]["share_ratio"] > 1:
            lines.append(
                f"  most over-preferred:  {over[0]:<{width}}  x{over[1]['share_ratio']:.2f} ({_share(over[1])})"
            )
        if under[1]["share_ratio"] < 1:
            lines.append(
                f"  most under-preferred: {under[0]:<{width}}  x{under[1]['share_ratio']:.2f} ({_share(under[1])})"
            )
        for name, q in st.get("quality", {}).items():
            if q["mean_preferred"] is not None and q["mean_unpreferred"] is not None:
                lines.append(
                    f"  quality {name}: preferred {q['mean_preferred']:.3f} vs unpreferred {q['mean_unpreferred']:.3f}"
                )
    lines += [f"stage {k}: no DWM file ({p}): skipped" for k, p in sorted(missing.items())]
    low = lowest_correlation(r)
    if low:
        a, b, rho, what = low
        lines.append(f"lowest inter-stage rank correlation ({what}): stage {a} vs stage {b}: rho = {rho:.3f}")
    else:
        lines.append("inter-stage rank correlation: needs DWMs of at least two stages")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def _domain_order(report: dict) -> list[str]:
    counts = report["sample_domain_counts"]
    return sorted(counts, key=lambda d: -counts[d])


@styled
def plot_domains(report: dict, path: str | os.PathLike) -> Path:
    """Per stage: share of each domain among preferred (red) and unpreferred (blue) samples (Figure 5's manner)."""
    names = _domain_order(report)
    k, n = len(names), len(report["stages"])
    fig = new_figure(min(4.6 * min(n, 3), 15), 1.2 + 0.42 * k * ((n + 2) // 3) + 0.6)
    axes = panels(fig, n, max_cols=3, sharex=True, sharey=True)  # one scale: stages compare at a glance
    y = np.arange(k)
    h = 0.38
    shares = [v[key] or 0.0 for st in report["stages"] for v in st["domains"].values() for key in SHARE_KEYS]
    top = max(100 * max(shares), 1.0)
    for ax, st in zip(axes, report["stages"]):
        doms = st["domains"]
        pref = np.array([100 * (doms[d]["share_preferred"] or 0.0) for d in names])
        unpref = np.array([100 * (doms[d]["share_unpreferred"] or 0.0) for d in names])
        ax.barh(y - h / 2, pref, h, color=PREFERRED, label="preferred")
        ax.barh(y + h / 2, unpref, h, color=UNPREFERRED, label="unpreferred")
        for i, d in enumerate(names):
            ratio = doms[d]["share_ratio"]
            if ratio is not None:
                ax.text(
                    max(pref[i], unpref[i]) + 0.02 * top,
                    y[i],
                    f"×{ratio:.2f}",
                    va="center",
                    fontsize=8,
                    color=PREFERRED if ratio > 1 else UNPREFERRED,
                )
        c = st["counts"]
        ax.set_title(f"Stage {st['stage']}\n{c['preferred']} preferred / {c['unpreferred']} unpreferred", fontsize=10)
        ax.set_xlabel("share of samples (%)")
        ax.grid(axis="y", visible=False)
    axes[0].set_xlim(0, top * 1.2)
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()  # the largest domain on top
    for i, ax in enumerate(axes):
        if i % 3 == 0:
            ax.set_ylabel("domain")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2)
    rule = "w > 1 vs w < 1 in its micro-batch" if report["split_rule"] == "weight" else "logit above vs below median"
    fig.suptitle(
        f"Domain share of preferred vs unpreferred samples ({rule})\n"
        "×r at the bars: share among preferred / share among unpreferred"
    )
    return save_png(fig, path)


@styled
def plot_weights_hist(report: dict, path: str | os.PathLike) -> Path:
    """Per stage: histogram of the per-sample weights on shared bins, with the uniform weight 1 marked."""
    n = len(report["stages"])
    fig = new_figure(min(4.2 * min(n, 3), 14), 3.2 * ((n + 2) // 3) + 0.5)
    axes = panels(fig, n, max_cols=3, sharex=True)
    for i, (ax, st) in enumerate(zip(axes, report["stages"])):
        edges = np.array(st["histogram"]["edges"])
        counts = np.array(st["histogram"]["counts"])
        # a log axis when one bin dwarfs the rest (a confident DWM: most weights near 0), else the tail vanishes
        log = counts.max() > 0.4 * counts.sum()
        color = STAGE_COLORS[i % len(STAGE_COLORS)]
        ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color=color, alpha=0.8, log=log)
        ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="uniform (w = 1)")
        w, c = st["weight"], st["counts"]
        pct = 100 * c["preferred"] / max(sum(c.values()), 1)
        ax.set_title(f"Stage {st['stage']}: {pct:.0f}% preferred, std {w['std']:.2f}, max {w['max']:.2f}", fontsize=10)
        ax.set_xlabel("weight (micro-batch mean = 1)")
        ax.set_ylabel("samples (log scale)" if log else "samples")
        ax.legend(loc="upper right")
    fig.suptitle(f"Per-sample DWM weights ({report['samples']} samples, micro-batches of {report['micro_batch']})")
    return save_png(fig, path)


@styled
def plot_rank_correlation(report: dict, path: str | os.PathLike) -> Path:
    """Heatmap of the Spearman correlation between stages (logits if available), values annotated."""
    c = report["correlation"]
    key = "spearman_logit" if "spearman_logit" in c else "spearman_weight"
    m = np.array(c[key], dtype=float)
    labels = [f"stage {s}" for s in c["stages"]]
    k = len(labels)
    side = 2.2 + 0.9 * k
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xticks(range(k), labels, rotation=30 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels)
    for i in range(k):
        for j in range(k):
            v = m[i, j]
            ax.text(
                j,
                i,
                "n/a" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=10,
                color="white" if abs(v) > 0.6 else "black",
            )
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman ρ")
    what = key.split("_")[1]
    ax.set_title(f"Spearman rank correlation of per-sample\nDWM {what}s between stages ({report['samples']} samples)")
    return save_png(fig, path)


@styled
def plot_quality(report: dict, path: str | os.PathLike) -> Path:
    """Per stage: mean quality score of preferred vs unpreferred samples per quality field (Figure 3's manner)."""
    fields = report["quality_fields"]
    n = len(report["stages"])
    fig = new_figure(min(4.2 * min(n, 3), 14), 3.4 * ((n + 2) // 3) + 0.6)
    axes = panels(fig, n, max_cols=3, sharey=True)
    x = np.arange(len(fields))
    for i, (ax, st) in enumerate(zip(axes, report["stages"])):
        q = st["quality"]
        pref = [q[f]["mean_preferred"] or 0.0 for f in fields]
        unpref = [q[f]["mean_unpreferred"] or 0.0 for f in fields]
        ax.bar(x - 0.2, pref, 0.4, color=PREFERRED, label="preferred")
        ax.bar(x + 0.2, unpref, 0.4, color=UNPREFERRED, label="unpreferred")
        ax.axhline(0, color="black", linewidth=0.6)
        long = max(len(f) for f in fields) * len(fields) > 40  # rotate only when the names would collide
        ax.set_xticks(x, fields, rotation=25 if long else 0, ha="right" if long else "center")
        ax.grid(axis="x", visible=False)
        ax.set_title(f"Stage {st['stage']}", fontsize=10)
        if i % 3 == 0:
            ax.set_ylabel("mean quality score")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2)
    fig.suptitle("Quality of preferred vs unpreferred samples")
    return save_png(fig, path)


def write_outputs(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Figures, preferences.json and summary.txt into ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "domains.png": plot_domains(report, out / "domains.png"),
        "weights_hist.png": plot_weights_hist(report, out / "weights_hist.png"),
        "rank_correlation.png": plot_rank_correlation(report, out / "rank_correlation.png"),
    }
    if report["quality_fields"]:
        files["quality.png"] = plot_quality(report, out / "quality.png")
    atomic_write_text(out / "preferences.json", json.dumps(_finite(report), indent=1) + "\n")
    atomic_write_text(out / "summary.txt", summary_text(report) + "\n")
    files["preferences.json"], files["summary.txt"] = out / "preferences.json", out / "summary.txt"
    return files


def _finite(x):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------- a run's stages


def load_run(run_dir: str | os.PathLike):
    """(RunDir, Config) of a run directory, with errors naming the path."""
    from dwmtrain.config import load_config
    from dwmtrain.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise AnalysisError(f"run directory {rd.root}: not found")
    if not rd.config.is_file():
        raise AnalysisError(f"{rd.config}: not found (not a dwmtrain run directory?)")
    return rd, load_config(rd.config)


def stage_dwm_files(rd, num_stages: int) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """([(stage, path)] present, [(stage, path)] missing) for stages 2..num_stages (stage 1 is uniform)."""
    present, missing = [], []
    for k in range(2, num_stages + 1):
        (present if rd.dwm(k).is_file() else missing).append((k, rd.dwm(k)))
    return present, missing


def open_split(data: str | os.PathLike, split: str, origin: str = ""):
    """TokenDataset of ``data``/``split``; a missing directory is named with where the path came from."""
    from dwmtrain.data.dataset import TokenDataset

    if not Path(data).is_dir():
        raise DataError(f"data directory {data}{origin}: not found")
    return TokenDataset(data, split)


def analyze_preferences(
    run_dir: str | os.PathLike,
    samples: int = 4096,
    split: str = "heldout",
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    seed: int = 0,
    device: str = "auto",
    split_by: str = "weight",
    progress: bool = True,
    log: Callable[[str], None] = print,
    rater: str | None = None,
    rater_labels: list[str] | None = None,
    rater_max_length: int = 512,
) -> dict:
    """Score the same samples with every stage's DWM of a run; write figures, JSON and summary; return the report.

    With ``rater`` (a local Hugging Face sequence-classification model, e.g. a QuRater), each sample's text,
    decoded with the run's tokenizer, is also rated on every label: the quality panels of Figure 3."""
    from dwmtrain.models.dwm import DWMArch, DWMFileError, dwm_from_state, load_dwm_state
    from dwmtrain.models.spec import lm_spec

    rd, cfg = load_run(run_dir)
    present, missing = stage_dwm_files(rd, cfg.stages.num_stages)
    for k, p in missing:
        log(f"stage {k}: no DWM file {p}: skipped")
    if not present:
        raise DWMFileError(
            f"{rd.dwm_dir}: no stage DWM files (looked for stage2..stage{cfg.stages.num_stages}.safetensors; "
            "stage 1 is uniform)"
        )
    if split_by not in ("weight", "logit"):
        raise AnalysisError(f"split rule {split_by!r}: must be weight or logit")
    data = Path(data) if data else Path(cfg.data.train_data)
    ds = open_split(data, split, "" if data != Path(cfg.data.train_data) else f" (data.train_data of {rd.config})")
    micro = cfg.deepspeed.micro_batch_size
    vocab = lm_spec(cfg.model).vocab_size
    if ds.vocab_size != vocab:
        raise DataError(f"{data}: prepared with a {ds.vocab_size}-piece vocabulary, the run's model has {vocab}")
    # The run's architecture, as training rebuilds it (temperature, uniform_mix from the config, not the file).
    arch = DWMArch.from_config(cfg, vocab)
    dev, dtype = resolve_device(device, cfg.deepspeed.precision)
    idx, notes = choose_samples(len(ds), samples, seed, micro)
    for note in notes:
        log(note)
    log(f"scoring {len(idx)} {split} samples with {len(present)} stage DWM(s) on {dev} ({str(dtype).split('.')[-1]})")
    scored = []
    for k, p in present:
        _, state, meta = load_dwm_state(p, arch)
        model = dwm_from_state(arch, state).requires_grad_(False)
        w, z = score_dataset(model, ds, idx, micro, dev, dtype, with_logits=True, progress=progress)
        scored.append(StageScores(k, os.path.relpath(p, rd.root), w, z, meta))
        del model
    quality = {}
    if rater:
        log(f"rating {len(idx)} samples with {rater}")
        quality = quality_scores(sample_texts(ds, idx, cfg.data.tokenizer), rater, dev, rater_labels, rater_max_length)
    report = compute_preferences(scored, ds.domains[idx], ds.domain_names, micro, quality, split_by)
    report.update(
        run_dir=str(rd.root),
        data=str(data),
        split=split,
        seed=seed,
        device=dev,
        dtype=str(dtype).split(".")[-1],
        stages_missing=[{"stage": k, "path": os.path.relpath(p, rd.root)} for k, p in missing],
    )
    out = Path(out) if out else rd.analysis_dir
    report["files"] = {name: str(p) for name, p in write_outputs(report, out).items()}
    return report
