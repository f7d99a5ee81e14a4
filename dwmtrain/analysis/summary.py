"""The few lines per stage a preference analysis prints and writes (``summary.txt``)."""

from __future__ import annotations

import numpy as np


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
