"""Offline data selection baselines of the paper: RANDOM, DSIR and QuRating, documents in, SlimPajama JSONL out.

``select(method, inputs, out, budget_tokens=... | budget_docs=..., ...)`` writes the selected records,
unchanged but for ``meta.selection``, to ``out`` (``.jsonl`` / ``.jsonl.zst``, readable by
``dwmtrain prepare-data``) and a report beside it; the CLI is ``dwmtrain select {random,dsir,qurating}``.

    base.py     the Scorer interface, ranking and budget math      driver.py   the scan, cut and write; METHODS
    random_select.py, dsir.py, qurating.py                          the methods
    parts.py    a pool scanned in parts (a job array) and one merge: the same selection
"""

from dwmtrain.data.readers import iter_records
from dwmtrain.select.base import gumbel_topk, sample_order, take_budget
from dwmtrain.select.driver import METHODS, select
from dwmtrain.select.dsir import dsir_features, fit_ngram_dist, hash_bucket, hashed_ngrams, importance_logw, words
from dwmtrain.select.output import report_path
from dwmtrain.select.qurating import load_rater, rater_scores, score_of
from dwmtrain.select.random_select import random_order
from dwmtrain.select.report import summary

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
