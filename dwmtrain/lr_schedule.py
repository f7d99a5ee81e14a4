"""The LM's learning-rate schedule (pure): linear warmup, then cosine decay to a floor.

The engine's LambdaLR and the meta job's lookahead alpha both read it, so they cannot drift apart."""

from __future__ import annotations

import math


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
