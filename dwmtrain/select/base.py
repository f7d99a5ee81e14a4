"""What a selection method is: a ``Scorer`` (per-record checks, batched scores, the ranking), and the ranking
and budget math every method shares (pure functions)."""

from __future__ import annotations

import math

import numpy as np

from dwmtrain.data.readers import SLIMPAJAMA
from dwmtrain.errors import DataError


class Scorer:
    """What a method plugs into ``select``: per-record checks, batched scores, and the ranking."""

    has_scores = True  #: whether ``meta.selection.score`` means anything (not for random)
    fields = SLIMPAJAMA  #: where records keep their text and domain (``select`` sets it)

    def prepare(self) -> None:
        """Load what scoring needs (target distribution, rater) before the pool is read."""

    def check(self, rec: dict, where: str) -> str | None:
        """A skip reason for a record that cannot be scored (or raise a DataError naming ``where``)."""
        return None

    def score_batch(self, recs: list[dict], texts: list[str], domains: list[str]) -> np.ndarray:
        """Scores of a batch of pool records (placeholders if ``finalize`` computes them)."""
        return np.zeros(len(texts))

    def finalize(self, scores: np.ndarray, domain_names: list[str]) -> np.ndarray:
        """Final scores of the whole pool, once it has been read (``domain_names``: the pool's domains)."""
        return scores

    def order(self, scores: np.ndarray, seed: int) -> np.ndarray:
        """Pool indices in selection order."""
        raise NotImplementedError

    def parameters(self) -> dict:
        """The method's settings, for the report."""
        return {}

    def extra_report(self) -> dict:
        """Method-specific report fields."""
        return {}

    # A pool scanned in parts (select.parts): what a part's scan depends on, and pool-wide statistics.
    two_pass = False  #: scores need statistics of the whole pool: a part's second pass computes them

    def scan_parameters(self) -> dict:
        """The settings a part's scan depends on (parts made with others are refused by the merge)."""
        return {}

    def pool_stats(self) -> dict[str, np.ndarray]:
        """Two-pass methods: this reading's share of the pool statistics."""
        return {}

    def use_pool_stats(self, parts: list[dict[str, np.ndarray]]) -> None:
        """Two-pass methods: take the whole pool's statistics from every part's ``pool_stats``."""

    def prepare_merge(self) -> None:
        """What the merge needs before ranking (not the scoring model)."""


def gumbel_topk(logits: np.ndarray, seed: int) -> np.ndarray:
    """Indices in the order of sampling without replacement with probability ∝ exp(logits) (Gumbel top-k)."""
    logits = np.asarray(logits, dtype=np.float64)
    keys = logits + np.random.default_rng(seed).gumbel(size=len(logits))
    return np.argsort(-keys, kind="stable")


def sample_order(scores: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """Sampling order for probability ∝ exp(score / temperature); temperature 0 is deterministic top-k."""
    scores = np.asarray(scores, dtype=np.float64)
    if temperature < 0 or not math.isfinite(temperature):
        raise DataError(f"temperature={temperature}: must be a finite number >= 0")
    if temperature == 0:
        return np.argsort(-scores, kind="stable")  # ties keep pool order
    return gumbel_topk(scores / temperature, seed)


def take_budget(lengths_in_order: np.ndarray, budget: int) -> int:
    """How many leading documents reach ``budget`` tokens, the crossing one included (all if the pool is short)."""
    cum = np.cumsum(np.asarray(lengths_in_order, dtype=np.int64))
    return int(min(np.searchsorted(cum, budget, side="left") + 1, len(cum)))
