"""Named fault points for fault-injection tests: ``DWMTRAIN_FAULT=point[:rank=R][:step=S]`` SIGKILLs the
process that reaches ``point`` (on rank R, at step S). Unset, a fault point is one dictionary lookup.

The points (``tests/integration/test_faults.py`` injects each):
  checkpoint-shards-written  rank=, step=   a rank wrote its shards and RNG, before the ranks agree
  checkpoint-marker-written  step=          rank 0 wrote COMPLETE, before latest.json
  dwm-tensors-written        stage=         the meta job renamed the DWM tensors into place, before the sidecar
  tensor-broadcast           rank=, index=  a rank sent/received tensor ``index`` of a broadcast state dict
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("DWMTRAIN_FAULT", "")


def fault_point(name: str, **where) -> None:
    """Die here (SIGKILL, no cleanup) if DWMTRAIN_FAULT names this point and every condition holds."""
    if not _SPEC:
        return
    point, *conds = _SPEC.split(":")
    if point == name and all(str(where.get(k)) == v for k, v in (c.split("=", 1) for c in conds)):
        os.kill(os.getpid(), signal.SIGKILL)
