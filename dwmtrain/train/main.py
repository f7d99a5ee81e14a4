"""The training job's body on every rank (``dwmtrain.launch.pretrain`` runs it through ``launch.entry``, which
turns its outcome into the exit code)."""

from __future__ import annotations

from dwmtrain.config import Config


def run_training(cfg: Config) -> None:
    """Set up, then train to the last step; a planned stop or an error leaves as an exception."""
    from dwmtrain.train.loop import train
    from dwmtrain.train.setup import setup

    train(setup(cfg))
