"""How much each sample of a micro-batch counts: the weighting the training loop applies, behind one interface.

    Uniform       every sample 1 (stage 1 of the method; meta.mode=none)
    DomainWeights a fixed factor per domain, mean 1 per micro-batch (meta.domain_weights; meta.oracle: 0 for the
                  domains it drops, a headroom baseline on labelled data)
    FrozenDWM     a stage's DWM, frozen, in inference mode (the method)
    LossReweighting  from each micro-batch's own losses (Sow et al. 2025; meta.mode=loss_reweight): a baseline

``StageBoundary.for_stage`` gives the one that weighs a stage (``stages.modes``); the loop calls
``weighting(x, indices, step)``: weights [B], or (LossReweighting) a ``LossRule`` applied to the losses of the same
forward (``models.loss.weighted_objective`` takes either).
"""

from __future__ import annotations

import abc

import torch

from dwmtrain.errors import ConfigError
from dwmtrain.models.weights import domain_factor_weights, loss_rule_weights


class Weighting(abc.ABC):
    """Per-sample weights [B] with mean 1 for one micro-batch."""

    info: dict  #: what a checkpoint records of it: ``version`` (and for a DWM its path, sha256, stage)
    #: its weights are learned and can collapse onto a few samples (the step's alarm watches them)
    watch_collapse: bool = True

    @property
    def version(self) -> str:
        return self.info["version"]

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, indices: list[int], step: int = 0) -> torch.Tensor:
        """Weights for the micro-batch ``x`` [B, T] (dataset ``indices``) at optimizer step ``step``, on x's
        device, without gradient."""


class Uniform(Weighting):
    """Every sample counts 1: the plain mean loss."""

    watch_collapse = False

    def __init__(self):
        self.info = {"version": "uniform"}

    def __call__(self, x, indices, step=0):
        return torch.ones(x.shape[0], device=x.device)


class DomainWeights(Weighting):
    """Weights from the samples' domain labels: a fixed factor per domain (1 for a domain not named), renormalized
    to mean 1 per micro-batch; ``meta.oracle`` is the case of factors 0 and 1."""

    watch_collapse = False  # uneven, or zeros, by design

    def __init__(self, data, factors: dict[str, float], field: str, version: str):
        unknown = sorted(set(factors) - set(data.domain_names))
        if unknown:
            raise ConfigError(f"{field}={factors}: {unknown} not among the data's domains {data.domain_names}")
        self.data, self.info = data, {"version": version}
        self.factor = torch.tensor([float(factors.get(name, 1.0)) for name in data.domain_names])

    @classmethod
    def oracle(cls, data, drop: list[str]) -> DomainWeights:
        return cls(data, dict.fromkeys(drop, 0.0), "meta.oracle.drop", "oracle")

    def weights(self, indices: list[int]) -> torch.Tensor:
        return domain_factor_weights(self.factor[torch.as_tensor(self.data.domains[indices].astype("int64"))])

    def __call__(self, x, indices, step=0):
        return self.weights(indices).to(x.device)


class FrozenDWM(Weighting):
    """A DWM's weights, computed without any autograd bookkeeping; those of a DWM that reads the LM's forward (its
    losses: dwm.loss_feature; its hidden states: dwm.features=lm) as a ``DWMOfForward``, resolved inside the
    forward it weighs."""

    def __init__(self, model, info: dict, timings: dict | None = None):
        self.model, self.info = model, info
        self.timings = timings or {}  #: where its meta job's time went (from its file), for the boundary's record

    def __call__(self, x, indices, step=0):
        if self.model.reads_lm:
            if self.model.backbone is None:
                return DWMOfForward(self.model, None)
            with torch.no_grad():
                return DWMOfForward(self.model, self.model.embed(x))
        with torch.inference_mode():  # no version counters, no views tracked
            w = self.model(x).float()
        return w.clone()  # a normal tensor again: the weighted loss saves it for its backward


class DWMOfForward:
    """The weights of one micro-batch by a DWM that reads the LM's forward of it: its backbone's embeddings first (or
    none: dwm.features=lm), then, inside that forward (as a ``LossRule``), the weights given the forward's
    per-sample losses and final hidden states [B, T, H]; ``weights`` keeps them."""

    def __init__(self, model, emb: torch.Tensor | None, scale: float = 1.0):
        self.model, self.emb, self.scale, self.weights = model, emb, scale, None
        self.needs_hidden = emb is None

    def __call__(self, losses: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            emb = self.emb if self.emb is not None else self.model.embed(None, hidden=hidden)
            self.weights = self.model.weigh(emb, losses if self.model.arch.loss_feature else None).float()
        self.weights = self.weights * self.scale
        return self.weights

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __mul__(self, factor: float) -> DWMOfForward:
        return DWMOfForward(self.model, self.emb, self.scale * factor)


class LossRule:
    """The weights of one micro-batch as a function of its per-sample losses (``models.weights.loss_rule_weights``),
    applied inside the forward that computes those losses; ``weights`` keeps what it gave, for the step's stats."""

    def __init__(self, rule: str, temperature: float, scale: float = 1.0):
        self.rule, self.temperature, self.scale, self.weights = rule, temperature, scale, None

    def __call__(self, losses: torch.Tensor) -> torch.Tensor:
        self.weights = loss_rule_weights(losses, self.rule, self.temperature) * self.scale
        return self.weights

    def __mul__(self, factor: float) -> LossRule:
        """The same rule with its weights scaled (the non-finite fault's NaN reaches the loss as with a tensor)."""
        return LossRule(self.rule, self.temperature, self.scale * factor)


class LossReweighting(Weighting):
    """Sow et al. (ICLR 2025): each sample weighed by its loss relative to the rest of its micro-batch, from step
    ``from_step`` on (uniform before, as their burn-in). No DWM, no meta job, no extra LM forward: the LM head
    computes the per-sample losses, then the weighted loss (``models.lm.LossHead``)."""

    def __init__(self, rule: str, temperature: float, from_step: int):
        self.rule, self.temperature, self.from_step = rule, temperature, from_step
        self.info = {"version": f"loss:{rule}:t{temperature:g}:from{from_step}"}

    def __call__(self, x, indices, step=0):
        if step < self.from_step:
            return torch.ones(x.shape[0], device=x.device)
        return LossRule(self.rule, self.temperature)
