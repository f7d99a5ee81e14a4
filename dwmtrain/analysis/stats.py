"""The statistics of a preference analysis (pure): who is preferred, domain shares, histograms, rank correlations.

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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dwmtrain.errors import AnalysisError

FORMAT = "dwmtrain-preferences-v1"
NEUTRAL_TOL = 1e-6  # |w - 1| below this is "no preference": exactly uniform weights come out as 1.0 in fp32
SMOOTH = 0.5  # pseudo-count per domain in the share ratio, so a domain absent from one side stays finite
HIST_BINS = 40
SHARE_KEYS = ("share_preferred", "share_unpreferred")


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


def roc_auc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U / n+ n-)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        raise ValueError("need both clean and corrupted samples")
    return float((rankdata(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_by_kind(scores, domains: list[str], bad_prefix: str = "corrupted-") -> dict[str, float]:
    """ROC-AUC of clean (positive) against all corrupted samples ("all": every domain named ``bad_prefix``...) and
    against each corruption kind (the domain without the prefix)."""
    scores = np.asarray(scores, dtype=np.float64)
    bad = np.array([d.startswith(bad_prefix) for d in domains], dtype=bool)
    out = {"all": roc_auc(scores, ~bad)}
    for kind in sorted({d for d in domains if d.startswith(bad_prefix)}):
        keep = np.array([d == kind for d in domains]) | ~bad
        out[kind.removeprefix(bad_prefix)] = roc_auc(scores[keep], ~bad[keep])
    return out


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
        "stages": [stage_report(s, edges, domains, domain_names, quality, split_by) for s in stages],
        "correlation": stage_correlations(stages, micro_batch),
    }


def stage_report(s: StageScores, edges, domains, domain_names, quality: dict, split_by: str) -> dict:
    """One stage: who is preferred, weight and logit statistics, the weight histogram, domains, quality means."""
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
    return st


def stage_correlations(stages: list[StageScores], micro_batch: int) -> dict:
    """Spearman correlations between every pair of stages: of the weights, within micro-batches, of the logits."""
    corr = {
        "stages": [s.stage for s in stages],
        "spearman_weight": correlation_matrix([s.weights for s in stages], spearman).tolist(),
        "within_micro_batch_spearman": correlation_matrix(
            [s.weights for s in stages], lambda a, b: within_batch_spearman(a, b, micro_batch)
        ).tolist(),
    }
    if all(not np.isnan(s.logits).any() for s in stages):
        corr["spearman_logit"] = correlation_matrix([s.logits for s in stages], spearman).tolist()
    return corr
