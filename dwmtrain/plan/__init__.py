"""Whether a run fits, before it is launched (``dwmtrain plan``, and the last line of ``--dry-run``)."""

from dwmtrain.plan.hardware import Device, parse_device
from dwmtrain.plan.planner import Fix, Plan, first_fix, make_plan
from dwmtrain.plan.report import print_plan, verdict

__all__ = ["Device", "Fix", "Plan", "first_fix", "make_plan", "parse_device", "print_plan", "verdict"]
