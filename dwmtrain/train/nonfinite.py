"""The policy for non-finite steps (pure): a step whose loss or gradient norm is not finite is skipped and
counted; too many in a row end the run with a one-line error, before anything of that step is saved.

The skip itself is DeepSpeed's: its ZeRO-3 optimizer checks the global gradient norm at every step and, when it
is not finite, applies no update and does not advance the LR scheduler (``engine.skipped_steps`` counts it, and
the meta job's lookahead alpha follows the scheduler, not the step count). A non-finite loss gives a non-finite
gradient. The loop learns of both without a host sync per micro-batch: the loss flag rides on the one
exchange per step that already decides a planned stop (``train.loop.StepStats.agree``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dwmtrain.errors import DWMTrainError


class NonFiniteError(DWMTrainError):
    """Too many consecutive steps had a non-finite loss or gradient norm; nothing of them was saved."""


@dataclass
class NonFiniteCount:
    """Non-finite steps of a run: in all, and in a row up to the current step (both saved in checkpoints)."""

    stop_after: int  #: run.stop_after_nonfinite
    total: int = 0
    streak: int = 0

    def record(self, nonfinite: bool) -> None:
        """Count one optimizer step."""
        self.total += int(nonfinite)
        self.streak = self.streak + 1 if nonfinite else 0

    def check(self, step: int, stage: int, dwm: str, newest: str | None) -> None:
        """Raise NonFiniteError once ``stop_after`` steps in a row were non-finite (``newest``: the newest complete
        checkpoint, which a rerun resumes from)."""
        if self.streak < self.stop_after:
            return
        first = step - self.streak + 1
        where = f"step {step}" if first == step else f"steps {first}-{step}"
        resume = f"a rerun resumes from checkpoint {newest}" if newest else "there is no checkpoint to resume from"
        raise NonFiniteError(
            f"{self.streak} consecutive steps with a non-finite loss or gradient norm ({where}, stage {stage}, "
            f"DWM {dwm}), each skipped; stopped before saving ({resume}; run.stop_after_nonfinite="
            f"{self.stop_after}): lower optimizer.lr, or look at the data of those steps"
        )
