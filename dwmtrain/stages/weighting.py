"""How much each sample of a micro-batch counts: the weighting the training loop applies, behind one interface.

    Uniform       every sample 1 (stage 1 of the method; meta.mode=none)
    DomainOracle  0 for the domains in meta.oracle_drop, the rest mean 1 (a headroom baseline on labelled data)
    FrozenDWM     a stage's DWM, frozen, in inference mode (the method)

``StageHandoff.for_stage`` says which one weighs a stage; the loop calls ``weighting(x, indices)``.
"""

from __future__ import annotations

import abc

import torch

from dwmtrain.errors import ConfigError
from dwmtrain.models.dwm import oracle_weights


class Weighting(abc.ABC):
    """Per-sample weights [B] with mean 1 for one micro-batch."""

    info: dict  #: what a checkpoint records of it: ``version`` (and for a DWM its path, sha256, stage)

    @property
    def version(self) -> str:
        return self.info["version"]

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        """Weights for the micro-batch ``x`` [B, T] (dataset ``indices``), on x's device, without gradient."""


class Uniform(Weighting):
    """Every sample counts 1: the plain mean loss."""

    def __init__(self):
        self.info = {"version": "uniform"}

    def __call__(self, x, indices):
        return torch.ones(x.shape[0], device=x.device)


class DomainOracle(Weighting):
    """Weights from the samples' domain labels: those in ``drop`` get 0, the rest mean 1 per micro-batch."""

    def __init__(self, data, drop: list[str]):
        unknown = sorted(set(drop) - set(data.domain_names))
        if unknown:
            raise ConfigError(f"meta.oracle_drop={drop}: {unknown} not among the data's domains {data.domain_names}")
        self.data, self.info = data, {"version": "oracle"}
        self.keep = torch.tensor([name not in drop for name in data.domain_names])

    def weights(self, indices: list[int]) -> torch.Tensor:
        return oracle_weights(self.keep[torch.as_tensor(self.data.domains[indices].astype("int64"))])

    def __call__(self, x, indices):
        return self.weights(indices).to(x.device)


class FrozenDWM(Weighting):
    """A DWM's weights, computed without any autograd bookkeeping."""

    def __init__(self, model, info: dict):
        self.model, self.info = model, info

    def __call__(self, x, indices):
        with torch.inference_mode():  # no version counters, no views tracked
            w = self.model(x).float()
        return w.clone()  # a normal tensor again: the weighted loss saves it for its backward
