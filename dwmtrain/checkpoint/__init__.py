"""How to save and resume everything a run needs; the loop decides *when*.

A checkpoint ``checkpoints/stepNNNNNNN/`` (paths: ``RunDir``) holds DeepSpeed's ZeRO-3 shards (model,
optimizer, LR scheduler), one RNG file per rank, and our ``COMPLETE`` marker with the ``RunState``
(step, stage, consumed samples, DWM path + sha256, config hash, compatibility fields). The marker is
written by rank 0 only after every rank has confirmed its files: it is the commit point, and a checkpoint
without it is never resumed from; ``checkpoints/latest.json`` is then replaced atomically, a pointer for people
and tools. DeepSpeed's own ``latest`` file is not written (it is written non-atomically and before all ranks
finish).

    state.py         RunState (the marker) and every rank's RNG
    compat.py        what a resume compares, and which changes break a run
    safe_load.py     DeepSpeed's readers under torch.load(weights_only=True)
    checkpointer.py  the commit / verify / resume / prune protocol (collective)
    universal.py     resuming at another world size through DeepSpeed's universal format
    weights.py       the LM's consolidated fp32 weights: the meta job's and the export's input
"""

from dwmtrain.checkpoint.checkpointer import Checkpointer
from dwmtrain.checkpoint.compat import BREAKING, check_compatible, compat_fields
from dwmtrain.checkpoint.safe_load import safe_torch_load
from dwmtrain.checkpoint.state import RunState
from dwmtrain.checkpoint.weights import consolidated_lm_state, gather_fp32_weights
from dwmtrain.errors import CheckpointError, ResumeError

__all__ = [
    "BREAKING",
    "CheckpointError",
    "Checkpointer",
    "ResumeError",
    "RunState",
    "check_compatible",
    "compat_fields",
    "consolidated_lm_state",
    "gather_fp32_weights",
    "safe_torch_load",
]
