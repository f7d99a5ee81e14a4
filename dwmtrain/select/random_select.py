"""RANDOM: a uniformly random subset of the pool, in shuffled order, up to the budget (the paper's baseline)."""

from __future__ import annotations

import numpy as np

from dwmtrain.select.base import Scorer


def random_order(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)``: the selection takes its prefix up to the budget."""
    return np.random.default_rng(seed).permutation(n)


class RandomScorer(Scorer):
    """No score; the order is a seeded shuffle."""

    has_scores = False

    def order(self, scores: np.ndarray, seed: int) -> np.ndarray:
        return random_order(len(scores), seed)
