"""What a selection did, as ``NAME.report.json`` and a few lines for the terminal: sizes, budget, skips, scores and
the domain mix before and after."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from dwmtrain.select.scan import Pool


def domain_tables(pool: Pool, chosen: np.ndarray, lengths) -> tuple[dict, dict]:
    """Documents (and tokens) per domain in the pool and in the selection."""
    names, n = pool.domain_names(), len(pool.fis)
    dom_arr = np.frombuffer(pool.dom_ids, dtype=np.int32)
    tables = []
    for idx in (np.arange(n), chosen):
        docs = np.bincount(dom_arr[idx], minlength=len(names))
        toks = np.bincount(dom_arr[idx], weights=lengths[idx], minlength=len(names)) if lengths is not None else None
        table = {}
        for j, name in enumerate(names):
            if docs[j]:
                table[name] = {"documents": int(docs[j])}
                if toks is not None:
                    table[name]["tokens"] = int(toks[j])
        tables.append(dict(sorted(table.items())))
    return tables[0], tables[1]


@dataclass(frozen=True)
class Cut:
    """A ranked pool cut at its budget: the scores, the chosen documents in rank order, their token counts (None
    without a tokenizer) and the budgets (tokens, documents: one of them set)."""

    scores: np.ndarray
    chosen: np.ndarray
    lengths: np.ndarray | None
    budgets: tuple[int | None, int | None]


def build_report(sel, pool: Pool, cut: Cut) -> dict:
    """Everything a selection (``driver.Selection``) did, for ``NAME.report.json`` and ``summary``."""
    budget_tokens, budget_docs = cut.budgets
    chosen, lengths, k = cut.chosen, cut.lengths, len(cut.chosen)
    tokens_selected = int(lengths[chosen].sum()) if lengths is not None else None
    dom_pool, dom_sel = domain_tables(pool, chosen, lengths)
    reached = (tokens_selected if budget_tokens is not None else k) >= (budget_tokens or budget_docs)
    report = {
        "method": sel.method,
        "parameters": sel.scorer.parameters(),
        "seed": sel.seed,
        "inputs": [os.path.abspath(f) for f in sel.files],
        "output": os.path.abspath(sel.out),
        "token_budget": budget_tokens,
        "document_budget": budget_docs,
        "budget_rule": "documents in rank order until the budget is reached; the document crossing it is included",
        "budget_reached": bool(reached),
        "tokenizer": os.path.abspath(sel.tokenizer) if sel.tokenizer else None,
        "token_count": "tokenizer pieces + the EOS (and BOS) of each document: what prepare-data counts"
        if sel.tokenizer
        else None,
        "pool_documents": len(pool.fis),
        "selected_documents": int(k),
        "pool_tokens": int(lengths.sum()) if lengths is not None else None,
        "tokens_selected": tokens_selected,
        "skipped": dict(sorted(pool.skipped.items())),
        "skipped_examples": pool.examples,
        "domains_pool": dom_pool,
        "domains_selected": dom_sel,
    }
    if sel.scorer.has_scores:
        report["score_mean"] = {"pool": float(np.mean(cut.scores)), "selected": float(np.mean(cut.scores[chosen]))}
    report.update(sel.scorer.extra_report())
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal: sizes, budget, skips, and the domain mix before and after."""
    r = report
    lines = [f"method: {r['method']}  seed: {r['seed']}  {json.dumps(r['parameters'])}"]
    if r["token_budget"] is not None:
        lines.append(
            f"selected {r['selected_documents']} of {r['pool_documents']} documents, "
            f"{r['tokens_selected']} of {r['pool_tokens']} tokens (budget {r['token_budget']}; "
            "the document crossing it is included)"
        )
    else:
        lines.append(
            f"selected {r['selected_documents']} of {r['pool_documents']} documents (budget {r['document_budget']})"
        )
    if not r["budget_reached"]:
        lines.append("warning: the pool is smaller than the budget; every usable document was selected")
    sk = r["skipped"]
    lines.append("skipped records: " + (", ".join(f"{k}: {v}" for k, v in sk.items()) if sk else "0"))
    lines += [f"  e.g. {e}" for e in r["skipped_examples"][:5]]
    if "score_mean" in r:
        lines.append(f"mean score: pool {r['score_mean']['pool']:.4g}, selected {r['score_mean']['selected']:.4g}")
    pool, sel = r["domains_pool"], r["domains_selected"]
    np_, ns = max(r["pool_documents"], 1), max(r["selected_documents"], 1)
    width = max([len("domain")] + [len(d) for d in pool])
    lines.append(f"{'domain':<{width}}  {'pool docs':>10}  {'selected docs':>14}")
    for d in sorted(pool, key=lambda d: -sel.get(d, {}).get("documents", 0)):
        a, b = pool[d]["documents"], sel.get(d, {}).get("documents", 0)
        lines.append(f"{d:<{width}}  {a:>5} {100 * a / np_:3.0f}%  {b:>8} {100 * b / ns:3.0f}%")
    return "\n".join(lines)
