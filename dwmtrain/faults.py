"""Named fault points for fault-injection tests and the chaos soak: ``DWMTRAIN_FAULT=point[:key=value]...`` acts
at ``point`` when every condition holds (a value ``a-b`` is a range of integers, ``a,b`` a list); several faults
are separated by ``;``. Unset, a fault point is one dictionary lookup.

Points that act on the process that reaches them (``fault_point``; ``tests/integration/test_faults.py``,
``tools/chaos.py``):
  step                       rank=, step=   a rank starts optimizer step ``step`` (1-based)
  resume                     rank=, step=   a rank loaded the checkpoint of ``step``, before its first step
  checkpoint-shards-written  rank=, step=   a rank wrote its shards and RNG, before the ranks agree
  checkpoint-marker-written  step=          rank 0 wrote COMPLETE, before latest.json
  meta-step                  rank=, step=   a meta-update job's rank starts meta-step ``step``
  dwm-tensors-written        stage=         the meta job renamed the DWM tensors into place, before the sidecar
  tensor-broadcast           rank=, index=  a rank sent/received tensor ``index`` of a broadcast state dict
The action is ``action=kill`` (the default: SIGKILL, no cleanup); ``action=stop``: the process SIGSTOPs itself,
for a driver that watches the processes' states (``tools/chaos.py``) to kill, stall (SIGCONT later) or signal it at
that moment; ``action=usr1``: it sends itself SIGUSR1 (a planned stop); ``action=error``: it raises the project's
own error (``InjectedFault``); ``action=bug``: it raises a ``RuntimeError`` (an unexpected one). Each fault acts at
most once per process (``tools/exit_stress.py`` drives every outcome of a job this way).
Points that change a value (``fault_active``; ``tests/integration/test_pretrain.py``):
  nonfinite-loss             rank=, step=   a rank's micro-batch weights (so its loss and gradients) become NaN
"""

from __future__ import annotations

import os
import signal

from dwmtrain.errors import DWMTrainError

ACTIONS = ("kill", "stop", "usr1", "error", "bug")


class InjectedFault(DWMTrainError):
    """An error raised on purpose at a fault point (``action=error``)."""


def parse(spec: str) -> list[tuple[str, dict[str, str], str]]:
    """``(point, conditions, action)`` per fault of a ``DWMTRAIN_FAULT`` value."""
    faults = []
    for fault in filter(None, spec.split(";")):
        point, *conds = fault.split(":")
        kv = dict(c.split("=", 1) for c in conds)
        action = kv.pop("action", "kill")
        if action not in ACTIONS:
            raise ValueError(f"DWMTRAIN_FAULT={spec!r}: action={action} is not one of {', '.join(ACTIONS)}")
        faults.append((point, kv, action))
    return faults


_FAULTS = parse(os.environ.get("DWMTRAIN_FAULT", ""))  # parsed once: a fault point costs a lookup
_ACTED: set[int] = set()  # faults this process has acted on


def _matches(value, want: str) -> bool:
    for part in want.split(","):
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit():
            if isinstance(value, int) and int(lo) <= value <= int(hi):
                return True
        elif str(value) == part:
            return True
    return False


def _matching(name: str, where: dict) -> tuple[int, str] | None:
    """(index, action) of the first fault named ``name`` whose conditions all hold for ``where``."""
    for i, (point, kv, action) in enumerate(_FAULTS):
        if point == name and all(_matches(where.get(k), v) for k, v in kv.items()):
            return i, action
    return None


def fault_active(name: str, **where) -> bool:
    """True if DWMTRAIN_FAULT names this point and every condition holds for ``where``."""
    return bool(_FAULTS) and _matching(name, where) is not None


def fault_point(name: str, **where) -> None:
    """Act here if DWMTRAIN_FAULT names this point and every condition holds (see the module docstring)."""
    if not _FAULTS or (hit := _matching(name, where)) is None or hit[0] in _ACTED:
        return
    _ACTED.add(hit[0])
    action, at = hit[1], f"fault {name} at {where}"
    if action == "error":
        raise InjectedFault(f"{at} (DWMTRAIN_FAULT)")
    if action == "bug":
        raise RuntimeError(f"{at} (DWMTRAIN_FAULT): an unexpected error")
    signals = {"stop": signal.SIGSTOP, "usr1": signal.SIGUSR1, "kill": signal.SIGKILL}
    os.kill(os.getpid(), signals[action])
