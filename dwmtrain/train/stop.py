"""The per-step agreement of all ranks: a planned stop before a time limit (SLURM's ``--signal=USR1@T`` warning,
or any SIGUSR1, asks the run to finish its step, write a complete checkpoint and exit with code 4, so the job
can be requeued). The step's one exchange between the ranks (``train.loop.StepStats.agree``) decides it on every
rank at the same step."""

from __future__ import annotations

import signal

from dwmtrain.errors import EXIT_STOPPED, PlannedStop

_EARLY: list[int] = []  # stop signals that arrived before the run's StopRequest existed


def catch_stop_signal(signum: int = signal.SIGUSR1) -> None:
    """From a rank's first line (before torch and DeepSpeed load): remember a stop signal instead of dying of it
    (SIGUSR1's default action), so a time-limit warning that comes during the start still ends in a checkpoint."""
    signal.signal(signum, lambda s, _frame: _EARLY.append(s))


class StoppedForTimeLimit(PlannedStop):
    """The run stopped on request with a complete checkpoint; rerunning the command resumes it."""

    exit_code = EXIT_STOPPED


class StopRequest:
    """Remembers a SIGUSR1 (``requested``); the step's one exchange between the ranks (``train.loop.StepStats.agree``)
    tells every rank, at the same step, whether any rank got one."""

    def __init__(self, device="cpu", signum: int = signal.SIGUSR1):
        self.requested, self.device = signum in _EARLY, device  # a signal during the start counts
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
