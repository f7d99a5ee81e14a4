"""The meta-signal's ground truth: each training sample's true effect on the reward loss, and how well each
estimator of it (and each fitted DWM) ranks samples by it.

True effect of sample i in its micro-batch (uniform weights w = 1): upweight it by +h and by -h, take the real
update (torch's AdamW from the checkpoint's moments, the engine's gradient clipping; optionally K-1 further real
steps on the micro-batches that follow, the same for both sides), and difference the reward loss:

    effect_i = -(R(theta_K(w + h e_i)) - R(theta_K(w - h e_i))) / (2 h)        (> 0: upweighting i helps)

h = 1 compares dropping the sample (w_i = 0) with doubling it. The estimators score "upweight" the same way
(higher: better): the SGD lookahead's <grad R, grad L_i>, the AdamW lookahead's <grad R * J, grad L_i>
(``meta.metagrad.AdamMoments``), minus the LM's own loss, and the DWM's logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from dwmtrain.analysis.stats import auc_by_kind, spearman, within_batch_spearman
from dwmtrain.meta.metagrad import AdamMoments, Params, _dot, train_losses
from dwmtrain.meta.rollout import RealStep, mean_grad, per_sample_grads, reward_loss, rollout


def true_effects(
    model, params: Params, x: torch.Tensor, step: RealStep, reward: Sequence[dict], h: float = 1.0,
    grads: Sequence[Params] | None = None, later: Sequence[torch.Tensor] = (),
) -> torch.Tensor:  # fmt: skip
    """effect_i of every sample of x (module docstring), uniform weights around the perturbation, the rollout
    continued on ``later`` micro-batches (uniform). [B] fp64"""
    grads = grads or per_sample_grads(model, params, x)
    B = x.shape[0]
    out = []
    for i in range(B):
        sides = []
        for s in (h, -h):
            w = torch.ones(B, dtype=torch.float64)
            w[i] += s
            after = rollout(model, params, step, later, first=mean_grad(grads, w))
            sides.append(reward_loss(model, after, reward))
        out.append(-(sides[0] - sides[1]) / (2 * h))
    return torch.tensor(out, dtype=torch.float64)


def estimator_scores(
    model, params: Params, x: torch.Tensor, v: Params, adam: AdamMoments | None, grads: Sequence[Params]
) -> dict[str, torch.Tensor]:
    """The "upweight" score of each sample of x by each estimator: sgd <v, grad L_i>, adam <v * J(g), grad L_i>
    (g the micro-batch's mean gradient; only with ``adam``) and neg_loss -L_i. ``v`` is grad R(theta)."""
    out = {"sgd": torch.stack([_dot(v, g) for g in grads]).double()}
    if adam is not None:
        gbar = mean_grad(grads, torch.ones(x.shape[0]))
        u = {k: v[k] * adam.update(k, gbar[k])[1] for k in v}
        out["adam"] = torch.stack([_dot(u, g) for g in grads]).double()
    with torch.no_grad():
        out["neg_loss"] = -train_losses(model, params, x).double()
    return out


def correlations(scores: dict[str, np.ndarray], truth: np.ndarray, domains: list[str], micro_batch: int) -> dict:
    """Per score (and the truth itself): Spearman with the true effect over every sample and within micro-batches
    (the ranking a weighting acts on), and clean-vs-corrupted ROC-AUC by kind (where the data has corrupted
    domains)."""
    out = {}
    labelled = any(d.startswith("corrupted-") for d in domains) and not all(d.startswith("corrupted-") for d in domains)
    for name, s in {"true_effect": truth, **scores}.items():
        rec = {"spearman": spearman(s, truth), "within_batch_spearman": within_batch_spearman(s, truth, micro_batch)}
        if labelled:
            rec["auc"] = auc_by_kind(s, domains)
        out[name] = rec
    return out


def diagnose(
    model, params: Params, micro_batches: Sequence[torch.Tensor], step: RealStep, reward: Sequence[dict],
    v: Params, h: float = 1.0, k_steps: int = 1, extra: Callable[[torch.Tensor], dict[str, torch.Tensor]] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """True effects and estimator scores of every sample of ``micro_batches`` (fp64 arrays in sample order):
    the K-step rollout of micro-batch j continues on the micro-batches j+1..j+K-1 (wrapping around). ``extra``:
    more scores of a micro-batch (the DWMs')."""
    cols: dict[str, list] = {"true_effect": []}
    n = len(micro_batches)
    for j, x in enumerate(micro_batches):
        later = [micro_batches[(j + d) % n] for d in range(1, k_steps)]
        grads = per_sample_grads(model, params, x)
        cols["true_effect"].append(true_effects(model, params, x, step, reward, h, grads, later))
        scores = estimator_scores(model, params, x, v, step.adam, grads)
        if extra is not None:
            scores.update(extra(x))
        for name, s in scores.items():
            cols.setdefault(name, []).append(s.detach().double().cpu())
        if progress is not None:
            progress(j + 1)
    return {k: torch.cat(c).numpy() for k, c in cols.items()}
