"""The selection driver: read the pool (``select.scan``), rank it, cut at the budget, write the subset
(``select.output``) and its report (``select.report``); the table of methods.

A selection runs in two passes over the input files so that only per-document numbers (location, checksum,
domain, token count, score) are held for the whole pool:

1. scan: every record is read, validated and scored by the method's scorer; records without text (or, for
   ``qurating --missing skip``, without a score) are counted skips, reported by reason;
2. write: the ranked documents are cut at the budget and the selected records, read again and checked
   against the first pass's checksum, are written unchanged (plus ``meta.selection``) in rank order, through
   temporary bucket files by rank: the memory never holds the selected text (``write_selected``).

Budget crossing: documents are taken in rank order until the budget is *reached*; the document that reaches
or crosses a token budget is included (as QuRating's ``select_subset.py`` does), so the selection holds at
least the budget (unless the pool is smaller) and exceeds it by less than its last document. A token is one
tokenizer piece, plus one EOS per document: the count ``dwmtrain prepare-data`` reports for the output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from dwmtrain.data.readers import SLIMPAJAMA, Fields, expand_inputs
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_write_text
from dwmtrain.select.base import take_budget
from dwmtrain.select.dsir import DSIRScorer
from dwmtrain.select.output import check_output, report_path, write_selected
from dwmtrain.select.qurating import QuRatingScorer
from dwmtrain.select.random_select import RandomScorer
from dwmtrain.select.report import Cut, build_report
from dwmtrain.select.scan import Pool, scan_pool

METHODS = {"random": RandomScorer, "dsir": DSIRScorer, "qurating": QuRatingScorer}


def check_budget(budget_tokens: int | None, budget_docs: int | None, tokenizer: str | None) -> None:
    if (budget_tokens is None) == (budget_docs is None):
        raise DataError("give exactly one of --budget-tokens and --budget-docs")
    budget = budget_tokens if budget_tokens is not None else budget_docs
    if budget is None or budget <= 0:
        raise DataError(f"budget {budget}: must be a positive number")
    if budget_tokens is not None and not tokenizer:
        raise DataError("--budget-tokens needs --tokenizer (the tokenizer to count tokens with)")


def scorer_for(method: str, options: dict):
    """The method's scorer from the table, or a DataError naming the methods."""
    if method not in METHODS:
        raise DataError(f"unknown selection method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method](**options)


def select(
    method: str,
    inputs: list[str] | str,
    out: str | os.PathLike,
    *,
    budget_tokens: int | None = None,
    budget_docs: int | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    fields: Fields = SLIMPAJAMA,
    shard_docs: int = 0,
    **method_options,
) -> dict:
    """Select a subset of ``inputs`` with ``method`` up to the budget, write it to ``out``; returns the report.
    ``fields``: where each record's text and domain are (any input format ``data.readers`` reads)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(x) for x in inputs]
    out = str(out)
    check_budget(budget_tokens, budget_docs, tokenizer)
    files = expand_inputs(inputs)
    check_output(out, files, overwrite)
    tok = None
    if tokenizer:
        from dwmtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    scorer = scorer_for(method, method_options)
    scorer.fields = fields
    scorer.prepare()
    pool = scan_pool(files, scorer, tok, method, progress, fields)
    if not pool.fis:
        raise DataError(f"{inputs}: no usable records (skipped: {dict(pool.skipped) or 'none'})")
    scores = scorer.finalize(np.concatenate(pool.parts), pool.domain_names())
    lengths = np.asarray(pool.ntok, dtype=np.int64) if tok is not None else None
    return cut_and_write(Selection(method, scorer, seed, files, out, fields, tokenizer, shard_docs),
                         pool, scores, lengths, (budget_tokens, budget_docs))  # fmt: skip


@dataclass
class Selection:
    """What a selection writes and how: its method and scorer, seed, inputs, output, fields, tokenizer."""

    method: str
    scorer: object
    seed: int
    files: list[str]
    out: str
    fields: Fields
    tokenizer: str | None
    shard_docs: int = 0


def cut_and_write(sel: Selection, pool: Pool, scores: np.ndarray, lengths, budgets: tuple,
                  extra: dict | None = None) -> dict:  # fmt: skip
    """Rank the scored pool, cut at the budget, write the selected records and the report (plus ``extra``);
    returns the report."""
    budget_tokens, budget_docs = budgets
    order = sel.scorer.order(scores, sel.seed)
    k = take_budget(lengths[order], budget_tokens) if budget_tokens is not None else min(budget_docs, len(pool.fis))
    chosen = order[:k]
    picked = {(pool.fis[i], pool.lns[i]): (rank, pool.crcs[i]) for rank, i in enumerate(chosen.tolist())}
    report = build_report(sel, pool, Cut(scores, chosen, lengths, budgets))
    report.update(extra or {})
    sel_scores = [scores[i] if sel.scorer.has_scores else None for i in chosen]
    report["outputs"] = write_selected(sel.out, sel.files, picked, sel.method, sel_scores, sel.fields,
                                       shard_docs=sel.shard_docs)  # fmt: skip
    atomic_write_text(report_path(sel.out), json.dumps(report, indent=1) + "\n")
    return report
