"""Pure loss and schedule math: per-sample losses, the weighted objective, the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample. logits [B, T, V], labels [B, T] (-100 ignored) -> [B]."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    if lg.dtype in (torch.float16, torch.bfloat16):
        lg = lg.float()  # the softmax in fp32; fp64 stays fp64 (the meta-gradient tests)
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    m = (lb != -100).to(tok.dtype)
    return (tok.view(lb.shape) * m).sum(1) / m.sum(1).clamp_min(1)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The LM objective for one micro-batch: mean_i w_i * L_i (weights have mean 1, so uniform = plain mean)."""
    return (weights.to(losses.dtype) * losses).mean()


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at the last step. ``step`` is 0-based."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(total_steps: int, warmup_steps: int) -> int:
    return warmup_steps if warmup_steps else max(1, total_steps // 100)


def scheduled_lr(cfg, step: int) -> float:
    """The LM learning rate after ``step`` optimizer steps: exactly what the engine's LambdaLR sets."""
    o, total = cfg.optimizer, cfg.stages.total_steps
    return o.lr * lr_multiplier(step, total, default_warmup(total, o.warmup_steps), o.min_lr_ratio)
