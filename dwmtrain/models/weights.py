"""The weight math (pure functions on tensors): how a DWM's logits become per-sample weights with mean 1, the
oracle's and the loss rules' weights, and the statistics a step logs of any weights."""

from __future__ import annotations

import torch

NORMALIZATIONS = ("softmax", "sigmoid")  #: how logits become weights (dwm.normalization)

#: How far the weights the trainer applies (in its dtype) may sit from the fitted fp32 ones on the same micro-batches,
#: as max |w_applied - w_fitted| (weights have mean 1). bf16 keeps 8 bits of mantissa through every backbone layer:
#: on CPU a tiny DWM whose weights span 0.2-3.5 moved by up to 0.03; fp32 allows for TF32 matmuls on GPUs.
APPLIED_TOLERANCE = {torch.float32: 0.01, torch.bfloat16: 0.1}


def normalize_weights(
    logits: torch.Tensor, temperature: float = 1.0, uniform_mix: float = 0.0, normalization: str = "softmax"
) -> torch.Tensor:
    """Per-sample weights with mean 1 over the micro-batch (last dim), mixed with uniform by ``uniform_mix``.

    ``softmax``: B * softmax(z / T); one sample can take up to all of the micro-batch's weight.
    ``sigmoid``: keep-gates g = sigmoid(z / T), renormalized: B * g / sum(g). A sample is dropped by its own gate
    going to 0, but raised above the others only by as much as they are dropped (a kept sample's gate saturates
    at 1): the shape of the oracle filter (corrupted 0, the rest equal), not that of a sharpened softmax."""
    B = logits.shape[-1]
    if normalization == "sigmoid":
        g = torch.sigmoid(logits / temperature)
        w = B * g / g.sum(-1, keepdim=True).clamp_min(1e-30)
    else:
        w = B * torch.softmax(logits / temperature, dim=-1)
    return (1.0 - uniform_mix) * w + uniform_mix


def log_weight_spread(w: torch.Tensor) -> torch.Tensor:
    """Variance of log-weights over the micro-batch [B]: 0 when uniform, unbounded as weights collapse."""
    lw = w.clamp_min(1e-30).log()
    return (lw - lw.mean()).pow(2).mean()


def domain_factor_weights(factor: torch.Tensor) -> torch.Tensor:
    """Each sample's domain factor renormalized to mean 1 over the micro-batch (all zero if every factor is 0).
    Factors 0 and 1 are the oracle on labelled data: the best a per-sample weighting can do there."""
    factor = factor.float()
    total = factor.sum()
    return factor * factor.shape[-1] / torch.where(total > 0, total, torch.ones_like(total))


def weight_stats_tensor(w: torch.Tensor) -> torch.Tensor:
    """[entropy (nats; log B is uniform), effective sample size, min, max] of one micro-batch's weights, on
    w's device with no host synchronisation (all zeros when the oracle drops a whole micro-batch)."""
    w = w.detach().float()
    total = w.sum()
    p = w / total.clamp_min(1e-30)
    ent = -(p * p.clamp_min(1e-30).log()).sum()
    ess = total**2 / (w * w).sum().clamp_min(1e-30)
    out = torch.stack([ent, ess, w.min(), w.max()])
    return torch.where(total > 0, out, torch.zeros_like(out))


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """``weight_stats_tensor`` as numbers."""
    return dict(zip(("entropy", "ess", "min", "max"), weight_stats_tensor(w).tolist()))


LOSS_RULES = ("linupper", "quadratic", "extremes")


def loss_rule_weights(losses: torch.Tensor, rule: str = "linupper", temperature: float = 1.0) -> torch.Tensor:
    """Per-sample weights (mean 1, no gradient) from the micro-batch's own losses, as Sow et al. (ICLR 2025,
    "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining") define them: the losses
    mapped linearly onto [-1, 1] (the smallest to -1, the largest to 1) as h, a rule f(h), and w ∝ exp(f(h) / τ).

        linupper   f = min(h + 1, 1): the low-loss samples down-weighted, the upper half alike (their best rule)
        quadratic  f = 1 - h^2: the middle favoured, both extremes down-weighted
        extremes   f = |h|: both extremes up-weighted

    A large τ tends to uniform weights; a micro-batch of equal losses gets uniform weights."""
    loss = losses.detach().float()
    lo, hi = loss.min(), loss.max()
    h = 2 * (loss - lo) / (hi - lo).clamp_min(1e-6) - 1
    if rule == "linupper":
        f = torch.clamp(h + 1, max=1.0)
    elif rule == "quadratic":
        f = 1 - h**2
    elif rule == "extremes":
        f = h.abs()
    else:
        raise ValueError(f"loss rule {rule!r}: one of {', '.join(LOSS_RULES)}")
    g = torch.exp((f - f.max()) / temperature)
    return g * (g.numel() / g.sum())


def applied_vs_fitted(applied: list[torch.Tensor], fitted: list[list[float]], dtype: torch.dtype) -> dict:
    """How the weights a DWM gives in the trainer's ``dtype`` (``applied``, per micro-batch) compare with the weights
    it gave when fitted, in fp32, on the same micro-batches (``fitted``): the largest and mean absolute difference,
    the tolerance of ``dtype`` (APPLIED_TOLERANCE) and whether the largest is within it."""
    a = torch.cat([w.detach().float().cpu().reshape(-1) for w in applied])
    f = torch.tensor([x for ws in fitted for x in ws], dtype=torch.float32)
    if a.shape != f.shape:
        raise ValueError(f"{a.numel()} applied weights against {f.numel()} fitted ones")
    diff = (a - f).abs()
    tol = APPLIED_TOLERANCE.get(dtype, APPLIED_TOLERANCE[torch.bfloat16])
    return {"dtype": str(dtype).removeprefix("torch."), "micro_batches": len(fitted),
            "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "tolerance": tol,
            "ok": bool(diff.max().item() <= tol)}  # fmt: skip
