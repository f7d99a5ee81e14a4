"""The diagnostic's statistics and its true effect (``analysis.diagnostic``), without processes."""

import itertools

import numpy as np
import pytest
import torch

from dwmtrain.analysis.diagnostic import correlations, diagnose
from dwmtrain.analysis.stats import auc_by_kind, roc_auc
from dwmtrain.meta.metagrad import AdamMoments, lm_params
from dwmtrain.meta.rollout import RealStep
from dwmtrain.models.lm import build_lm
from dwmtrain.models.spec import ModelSpec


def test_roc_auc_is_the_share_of_ordered_pairs_ties_half():
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 40).astype(float), rng.integers(0, 2, 40).astype(bool)
    pairs = [(a, b) for a, b in itertools.product(s[y], s[~y])]
    want = sum((a > b) + 0.5 * (a == b) for a, b in pairs) / len(pairs)
    assert roc_auc(s, y) == pytest.approx(want)
    with pytest.raises(ValueError, match="both"):
        roc_auc([1.0, 2.0], [1, 1])
    doms = ["a", "corrupted-x", "b", "corrupted-y", "corrupted-x"]
    got = auc_by_kind([5.0, 1.0, 4.0, 4.5, 6.0], doms)
    assert got == {"all": 0.5, "x": 0.5, "y": 0.5}  # clean 5, 4 against 1, 6 (x) and 4.5 (y)


def test_the_diagnostic_scores_every_estimator_against_the_true_effect():
    torch.manual_seed(0)
    lm = build_lm(ModelSpec.from_preset("tiny", 256, 16), "eager", seed=0).double().eval().requires_grad_(False)
    params = lm_params(lm)
    g = torch.Generator().manual_seed(1)
    adam = AdamMoments({k: 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()},
                       {k: 1e-6 * torch.rand(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()},
                       step=20, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # fmt: skip
    mbs = [torch.randint(0, 256, (4, 16)) for _ in range(2)]
    ids = torch.randint(0, 256, (6, 16))
    reward = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    v = {k: torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}
    step = RealStep(adam, 1e-3, clip=1.0)
    one = diagnose(lm, params, mbs, step, reward, v, h=1.0, k_steps=1)
    two = diagnose(lm, params, mbs, step, reward, v, h=1.0, k_steps=2)
    assert set(one) == {"true_effect", "sgd", "adam", "neg_loss"} and all(len(c) == 8 for c in one.values())
    assert np.array_equal(one["sgd"], two["sgd"]) and not np.allclose(one["true_effect"], two["true_effect"])
    corr = correlations({k: c for k, c in one.items() if k != "true_effect"}, one["true_effect"],
                        ["a", "corrupted-x"] * 4, micro_batch=4)  # fmt: skip
    assert corr["true_effect"]["spearman"] == pytest.approx(1.0) and set(corr["sgd"]["auc"]) == {"all", "x"}
