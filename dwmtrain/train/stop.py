"""A planned stop before a time limit: SLURM's ``--signal=USR1@T`` warning (or any SIGUSR1) asks the run
to finish its step, write a complete checkpoint and exit with code 4, so the job can be requeued."""

from __future__ import annotations

import signal

import torch

from dwmtrain.distributed import all_reduce_

EXIT_CODE = 4


class StoppedForTimeLimit(Exception):
    """The run stopped on request with a complete checkpoint; rerunning the command resumes it."""


class StopRequest:
    """Remembers a SIGUSR1; ``agreed()`` tells every rank, at the same step, whether any rank got one."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.flag = torch.zeros(1)
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.flag.fill_(1.0)

    def agreed(self) -> bool:
        """Collective: True on every rank once any rank has been signalled (ranks get it at different times)."""
        return bool(all_reduce_(self.flag.clone(), "max").item())
