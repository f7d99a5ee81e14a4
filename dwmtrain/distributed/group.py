"""The process group's timing, which init sets and the collectives and the roll call read: the collective
timeout (``run.dist_timeout_s``) and the keep-alive interval of work done on rank 0."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GroupTiming:
    timeout_s: float = 1800.0  #: the process group's collective timeout (``init_distributed`` sets it)
    poll_s: float = 5.0  #: ``run_on_rank0``'s keep-alive interval: well inside the collective timeout


TIMING = GroupTiming()
