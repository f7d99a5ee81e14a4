"""The figures of a preference analysis (the paper's Figures 3 and 5 in manner): domain shares of preferred and
unpreferred samples, weight histograms, inter-stage rank correlations, quality of preferred samples. Every one
is written through ``plots.save_png``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dwmtrain.analysis.plots import PREFERRED, STAGE_COLORS, UNPREFERRED, new_figure, panels, save_png, styled
from dwmtrain.analysis.stats import SHARE_KEYS


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


@styled
def plot_domain_weights(table: dict[int, dict[str, float]], path: str | os.PathLike) -> Path:
    """Each domain's mean training weight per stage (``table``: {stage: {domain: mean weight}}), uniform = 1."""
    stages = sorted(table)
    names = sorted({d for row in table.values() for d in row})
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for i, d in enumerate(names):
        ax.plot(stages, [table[s].get(d, np.nan) for s in stages], marker="o", color=STAGE_COLORS[i % 8], label=d)
    ax.axhline(1.0, color="#7f7f7f", linestyle="--", linewidth=1)
    ax.set_xticks(stages)
    ax.set_xlabel("stage")
    ax.set_ylabel("mean weight of the domain's samples")
    ax.set_title("What the DWM weighs up, by domain")
    ax.legend(loc="best")
    return save_png(fig, path)
