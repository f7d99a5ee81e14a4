"""Named fault points for fault-injection tests: ``DWMTRAIN_FAULT=point[:key=value]...`` acts at ``point`` when
every condition holds (a value ``a-b`` is a range of integers, ``a,b`` a list). Unset, a fault point is one
dictionary lookup.

Points that SIGKILL the process that reaches them (``fault_point``; ``tests/integration/test_faults.py``):
  checkpoint-shards-written  rank=, step=   a rank wrote its shards and RNG, before the ranks agree
  checkpoint-marker-written  step=          rank 0 wrote COMPLETE, before latest.json
  dwm-tensors-written        stage=         the meta job renamed the DWM tensors into place, before the sidecar
  tensor-broadcast           rank=, index=  a rank sent/received tensor ``index`` of a broadcast state dict
Points that change a value (``fault_active``; ``tests/integration/test_pretrain.py``):
  nonfinite-loss             rank=, step=   a rank's micro-batch weights (so its loss and gradients) become NaN
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("DWMTRAIN_FAULT", "")


def _matches(value, want: str) -> bool:
    for part in want.split(","):
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            if isinstance(value, int) and int(lo) <= value <= int(hi):
                return True
        elif str(value) == part:
            return True
    return False


def fault_active(name: str, **where) -> bool:
    """True if DWMTRAIN_FAULT names this point and every condition holds for ``where``."""
    if not _SPEC:
        return False
    point, *conds = _SPEC.split(":")
    return point == name and all(_matches(where.get(k), v) for k, v in (c.split("=", 1) for c in conds))


def fault_point(name: str, **where) -> None:
    """Die here (SIGKILL, no cleanup) if DWMTRAIN_FAULT names this point and every condition holds."""
    if fault_active(name, **where):
        os.kill(os.getpid(), signal.SIGKILL)
