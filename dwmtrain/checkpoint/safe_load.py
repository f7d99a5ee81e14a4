"""DeepSpeed's checkpoint readers, made to load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import contextlib

import torch


def _deepspeed_checkpoint_globals() -> list:
    """The few DeepSpeed classes its checkpoint files pickle (allowed for weights_only loading)."""
    out = []
    for mod, name in (
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            out.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return out


@contextlib.contextmanager
def safe_torch_load():
    """Make DeepSpeed's own checkpoint readers load with ``weights_only=True`` (no arbitrary unpickling).

    DeepSpeed calls ``torch.load(..., weights_only=False)``; inside this context every torch.load is
    forced to weights_only=True with only DeepSpeed's checkpoint classes allowed.
    """
    # Why swap torch.load itself: DeepSpeed's readers (engine.load_checkpoint, zero_to_fp32) call it
    # directly with no hook; the swap lasts exactly one read, in the one thread that reads.
    orig = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return orig(*args, **kwargs)

    torch.load = load
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        torch.load = orig
