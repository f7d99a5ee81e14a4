"""DSIR (Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"), hashed n-grams.

Features follow the reference ``HashedNgramDSIR``: the lowercased text is split like nltk's
``WordPunctTokenizer`` (runs of word characters, and runs of other non-space characters, are tokens), and
each unigram and bigram (two words joined by a space) is hashed into ``num_buckets`` buckets with
``sha256 mod num_buckets``, a stable hash, so the same text always lands in the same buckets. Two
bag-of-n-grams categorical distributions are fit with additive (Laplace) smoothing: the target and the
raw pool. A document's log importance weight is ``sum_b count_b * (log p_target[b] - log p_raw[b])``, and
documents are resampled without replacement with probability ∝ the weight by Gumbel top-k.

The target is either records from ``--target-file`` or the pool's own documents of ``--target-domains``.
The latter is what DSIR did for the paper's baseline (Wikipedia and books, both part of the pool): target
documents stay in the pool and are candidates like any other.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from dwmtrain.data.readers import expand_inputs, iter_records, text_skip_reason
from dwmtrain.errors import DataError
from dwmtrain.select.base import Scorer, gumbel_topk

WORD_RE = re.compile(r"\w+|[^\w\s]+")  # nltk WordPunctTokenizer's pattern
_CACHE: dict[int, dict[str, int]] = {}
_CACHE_MAX = 1 << 21  # n-gram strings remembered per bucket count; Zipf makes most lookups hits


def words(text: str) -> list[str]:
    """Lowercased word and punctuation tokens, as DSIR's reference tokenizes."""
    return WORD_RE.findall(text.lower())


def hash_bucket(s: str, num_buckets: int) -> int:
    """Stable bucket of an n-gram string: ``sha256(s) mod num_buckets`` (the DSIR reference's hash)."""
    return int.from_bytes(hashlib.sha256(s.encode("utf-8")).digest(), "big") % num_buckets


def hashed_ngrams(text: str, num_buckets: int = 10000) -> list[int]:
    """Bucket of every unigram and bigram of ``text``, with repeats."""
    cache = _CACHE.setdefault(num_buckets, {})
    if len(cache) > _CACHE_MAX:
        cache.clear()
    w = words(text)
    grams = w + [f"{a} {b}" for a, b in zip(w, w[1:])]
    out = []
    for g in grams:
        b = cache.get(g)
        if b is None:
            b = cache[g] = hash_bucket(g, num_buckets)
        out.append(b)
    return out


def dsir_features(text: str, num_buckets: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Sparse hashed unigram+bigram counts of ``text``: (sorted bucket ids, counts)."""
    idx, counts = np.unique(np.asarray(hashed_ngrams(text, num_buckets), dtype=np.int64), return_counts=True)
    return idx.astype(np.int32), counts.astype(np.int32)


def dense_counts(features: list[tuple[np.ndarray, np.ndarray]], num_buckets: int) -> np.ndarray:
    """Total count per bucket over sparse feature vectors."""
    total = np.zeros(num_buckets, dtype=np.float64)
    for idx, counts in features:
        np.add.at(total, idx, counts)
    return total


def fit_ngram_dist(counts: np.ndarray, smoothing: float = 1.0) -> np.ndarray:
    """Log probabilities of a smoothed categorical over buckets: ``log((c + a) / (sum c + a * B))``."""
    counts = np.asarray(counts, dtype=np.float64)
    if smoothing <= 0:
        raise DataError(f"smoothing={smoothing}: must be > 0 (an unseen bucket would get probability 0)")
    return np.log(counts + smoothing) - np.log(counts.sum() + smoothing * len(counts))


def importance_logw(idx: np.ndarray, counts: np.ndarray, log_p_target: np.ndarray, log_p_raw: np.ndarray) -> float:
    """A document's log importance weight: ``sum counts * (log p_target - log p_raw)`` over its buckets."""
    return float(np.dot(np.asarray(counts, np.float64), (log_p_target - log_p_raw)[np.asarray(idx)]))


class DSIRScorer(Scorer):
    """Fits target and raw n-gram distributions while the pool is read; scores are log importance weights."""

    def __init__(
        self,
        target_domains: list[str] | None = None,
        target_files: list[str] | None = None,
        num_buckets: int = 10000,
        smoothing: float = 1.0,
    ):
        if bool(target_domains) == bool(target_files):
            raise DataError("dsir needs exactly one of --target-domains and --target-file")
        if num_buckets < 1:
            raise DataError(f"--num-buckets {num_buckets}: must be >= 1")
        if smoothing <= 0:
            raise DataError(f"--smoothing {smoothing}: must be > 0")
        self.target_domains = set(target_domains or [])
        # expanded (and absolute) now: what a part's scan records, before and after prepare(), is the same
        self.target_files = [os.path.abspath(f) for f in expand_inputs(target_files)] if target_files else []
        self.num_buckets, self.smoothing = num_buckets, smoothing
        self.file_target_counts = np.zeros(num_buckets, dtype=np.float64)  # --target-file's n-grams
        self.file_target_docs = 0
        self.target_skipped: dict[str, int] = {}
        self.keep_features = True  # a part's first pass only counts: its weights come in a second pass
        self._reset_pool()

    def _reset_pool(self) -> None:
        """What reading the pool accumulates: its n-gram counts (and its target domains'), and the features."""
        self.raw_counts = np.zeros(self.num_buckets, dtype=np.float64)
        self.pool_target_counts = np.zeros(self.num_buckets, dtype=np.float64)  # --target-domains' n-grams
        self.pool_target_docs = 0
        self._idx: list[np.ndarray] = []
        self._cnt: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []

    @property
    def target_docs(self) -> int:
        return self.file_target_docs + self.pool_target_docs

    def prepare(self) -> None:
        if not self.target_files:
            return
        files = self.target_files
        for r in iter_records(files, self.fields):
            t = self.fields.text_of(r.rec)
            if reason := text_skip_reason(t):
                self.target_skipped[reason] = self.target_skipped.get(reason, 0) + 1
                continue
            idx, cnt = dsir_features(t, self.num_buckets)
            np.add.at(self.file_target_counts, idx, cnt)
            self.file_target_docs += 1
        if self.file_target_docs == 0:
            raise DataError(f"--target-file {' '.join(files)}: no record with text")

    def score_batch(self, recs, texts, domains) -> np.ndarray:
        feats = [dsir_features(t, self.num_buckets) for t in texts]
        for (idx, cnt), d in zip(feats, domains):
            if d in self.target_domains:
                np.add.at(self.pool_target_counts, idx, cnt)
                self.pool_target_docs += 1
        # one array per batch, not per document: the weights need every document's features after the pool
        idx = np.concatenate([f[0] for f in feats])
        cnt = np.concatenate([f[1] for f in feats])
        np.add.at(self.raw_counts, idx, cnt)
        if not self.keep_features:
            return np.zeros(len(texts))
        self._idx.append(idx)
        self._cnt.append(cnt)
        self._sizes.append(np.array([len(f[0]) for f in feats], dtype=np.int64))
        return np.zeros(len(texts))

    def finalize(self, scores, domain_names) -> np.ndarray:
        if self.target_domains and self.target_docs == 0:
            have = ", ".join(sorted(domain_names))
            raise DataError(
                f"--target-domains {','.join(sorted(self.target_domains))}: no such documents in the pool "
                f"(domains: {have})"
            )
        lt = fit_ngram_dist(self.file_target_counts + self.pool_target_counts, self.smoothing)
        lr = fit_ngram_dist(self.raw_counts, self.smoothing)
        diff = lt - lr
        if not self._sizes:  # no usable document here (a part of the pool can have none)
            return np.zeros(0)
        sizes = np.concatenate(self._sizes)
        doc = np.repeat(np.arange(len(sizes)), sizes)
        idx, cnt = np.concatenate(self._idx), np.concatenate(self._cnt).astype(np.float64)
        self._idx, self._cnt, self._sizes = [], [], []  # the weights are all that is needed from here on
        return np.bincount(doc, weights=cnt * diff[idx], minlength=len(sizes))

    def order(self, scores, seed) -> np.ndarray:
        return gumbel_topk(scores, seed)

    # a pool scanned in parts: the weights need every part's counts (select.parts)
    two_pass = True

    def pool_stats(self) -> dict[str, np.ndarray]:
        """This reading's share of the pool statistics the weights need (summed over the parts)."""
        return {"raw_counts": self.raw_counts, "pool_target_counts": self.pool_target_counts,
                "pool_target_docs": np.array([self.pool_target_docs], dtype=np.int64)}  # fmt: skip

    def use_pool_stats(self, parts: list[dict[str, np.ndarray]]) -> None:
        """The whole pool's statistics, from every part's ``pool_stats`` (integer counts: sums are exact)."""
        self.raw_counts = np.sum([p["raw_counts"] for p in parts], axis=0)
        self.pool_target_counts = np.sum([p["pool_target_counts"] for p in parts], axis=0)
        self.pool_target_docs = int(sum(int(p["pool_target_docs"][0]) for p in parts))

    def scan_parameters(self) -> dict:
        return self.parameters()

    def prepare_merge(self) -> None:
        self.prepare()

    def parameters(self) -> dict:
        p = {"num_buckets": self.num_buckets, "smoothing": self.smoothing, "ngrams": [1, 2]}
        if self.target_domains:
            p["target_domains"] = sorted(self.target_domains)
        else:
            p["target_files"] = self.target_files
        return p

    def extra_report(self) -> dict:
        return {
            "target_documents": self.target_docs,
            "target_from_pool": bool(self.target_domains),
            "target_skipped": self.target_skipped,
        }
