"""Offline data selection baselines of the paper: RANDOM, DSIR and QuRating, SlimPajama JSONL in and out.

``select(method, inputs, out, budget_tokens=... | budget_docs=..., ...)`` writes the selected records,
unchanged but for ``meta.selection``, to ``out`` (``.jsonl`` / ``.jsonl.zst``, readable by
``dwmtrain prepare-data``) and a report beside it; the CLI is ``dwmtrain select {random,dsir,qurating}``.
"""

from dwmtrain.select.common import (
    METHODS,
    gumbel_topk,
    iter_records,
    report_path,
    sample_order,
    select,
    summary,
    take_budget,
)
from dwmtrain.select.dsir import dsir_features, fit_ngram_dist, hash_bucket, hashed_ngrams, importance_logw, words
from dwmtrain.select.qurating import load_rater, rater_scores, score_of
from dwmtrain.select.random_select import random_order

__all__ = [
    "METHODS",
    "dsir_features",
    "fit_ngram_dist",
    "gumbel_topk",
    "hash_bucket",
    "hashed_ngrams",
    "importance_logw",
    "iter_records",
    "load_rater",
    "random_order",
    "rater_scores",
    "report_path",
    "sample_order",
    "score_of",
    "select",
    "summary",
    "take_budget",
    "words",
]
