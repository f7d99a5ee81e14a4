"""The stage schedule as config data (pure): which optimizer steps start which stage; checked when the config
loads (``StagesConfig``), asked by the loop."""

from __future__ import annotations


def stage_starts(total_steps: int, num_stages: int, boundaries: list[int] | None = None) -> list[int]:
    """Start step (0-based) of every stage; stage 1 starts at 0.

    ``boundaries`` gives the starts of stages 2..T explicitly; otherwise the steps are
    split as evenly as possible (earlier stages get the remainder).
    """
    if total_steps <= 0 or num_stages <= 0:
        raise ValueError("total_steps and num_stages must be > 0")
    if boundaries:
        if len(boundaries) != num_stages - 1:
            raise ValueError(f"needs {num_stages - 1} start steps for stages 2..{num_stages}")
        starts = [0, *boundaries]
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError("must be strictly increasing and > 0")
        if starts[-1] >= total_steps:
            raise ValueError(f"last boundary {starts[-1]} must be < total_steps={total_steps}")
        return starts
    if num_stages > total_steps:
        raise ValueError(f"{num_stages} stages do not fit in total_steps={total_steps}")
    base, extra = divmod(total_steps, num_stages)
    starts, s = [], 0
    for i in range(num_stages):
        starts.append(s)
        s += base + (1 if i < extra else 0)
    return starts


def stage_of(step: int, starts: list[int]) -> int:
    """1-based stage that optimizer step ``step`` (0-based) belongs to."""
    stage = 1
    for i, s in enumerate(starts):
        if step >= s:
            stage = i + 1
    return stage


def is_boundary(step: int, starts: list[int]) -> bool:
    """True when ``step`` steps have been taken and the next step opens a new stage (2..T)."""
    return step in starts[1:]
