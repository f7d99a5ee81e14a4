"""Real training steps from a boundary checkpoint, for what the lookahead only estimates: torch's AdamW from the
checkpoint's moments (``meta.metagrad.AdamMoments``), the engine's gradient clipping, on the LM's parameters by
name. Two users: the weight strength chosen by short weighted rollouts scored on the reward part
(``meta.strength``), and the diagnostic's true effect of each sample (``analysis.diagnostic``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dwmtrain.meta.metagrad import AdamMoments, Params, _differentiable, train_losses, val_loss


@dataclass(frozen=True)
class RealStep:
    """The update the engine takes: AdamW from ``adam`` at learning rate ``lr``, the gradient's global norm
    clipped to ``clip`` first (0: not clipped)."""

    adam: AdamMoments
    lr: float
    clip: float = 0.0


def per_sample_grads(model, params: Params, x: torch.Tensor) -> list[Params]:
    """grad L_i(params) of every sample of x (one backward each)."""
    out = []
    with _differentiable(model, params) as p:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(train_losses(model, p, x[i : i + 1])[0], list(p.values()))
            out.append({k: t.detach() for k, t in zip(p, g)})
    return out


def mean_grad(grads: Sequence[Params], w: torch.Tensor) -> Params:
    """sum_i w_i g_i / B: the gradient of the micro-batch's weighted mean loss."""
    return {k: sum(float(wi) * g[k] for wi, g in zip(w, grads)) / len(grads) for k in grads[0]}


def rollout(
    model, params: Params, step: RealStep, batches: Sequence[torch.Tensor] = (),
    weights: Sequence[torch.Tensor] | None = None, first: Params | None = None,
) -> Params:  # fmt: skip
    """The parameters after real steps from (params, the checkpoint's moments): one on the gradient ``first`` if
    given, then one on each micro-batch of ``batches`` weighed by its ``weights`` (uniform: None), each at the
    parameters reached. Neither ``params`` nor the moments are changed."""
    names = list(params)
    ps = [params[k].detach().clone().requires_grad_(True) for k in names]
    a = step.adam
    opt = torch.optim.AdamW(ps, lr=step.lr, betas=a.betas, eps=a.eps, weight_decay=a.weight_decay)
    for p, k in zip(ps, names):
        opt.state[p] = {"step": torch.tensor(float(a.step), dtype=torch.float32),
                        "exp_avg": a.exp_avg[k].to(p.dtype).clone(),
                        "exp_avg_sq": a.exp_avg_sq[k].to(p.dtype).clone()}  # fmt: skip

    def apply(grad: list[torch.Tensor]) -> None:
        for p, g in zip(ps, grad):
            p.grad = g.clone()
        if step.clip:
            torch.nn.utils.clip_grad_norm_(ps, step.clip)
        opt.step()

    if first is not None:
        apply([first[k] for k in names])
    for j, x in enumerate(batches):
        with torch.enable_grad():
            losses = train_losses(model, dict(zip(names, ps)), x)
            w = torch.ones_like(losses) if weights is None else weights[j].detach().to(losses.dtype)
            apply(list(torch.autograd.grad((w * losses).mean(), ps)))
    return {k: p.detach() for k, p in zip(names, ps)}


def reward_loss(model, params: Params, batches: Sequence[dict]) -> float:
    """R at ``params``: the mean per-example reward loss over every batch (weighted by examples)."""
    tot, n = 0.0, 0
    with torch.no_grad():
        for vb in batches:
            b = vb["input_ids"].shape[0]
            tot += val_loss(model, params, vb).item() * b
            n += b
    return tot / n


def _scores(dwm, x: torch.Tensor, reads: dict) -> torch.Tensor:
    return dwm.score(dwm.embed(x, hidden=reads.get("hidden")), reads.get("losses")).float()


def choose_strength(
    model, params: Params, step: RealStep, dwm, scales: Sequence[float], batches: Sequence[torch.Tensor],
    reward: Sequence[dict], reads: Callable[[torch.Tensor], dict] = lambda x: {},
) -> dict:  # fmt: skip
    """The DWM's logit scale (its strength; 0: uniform weights) among ``scales`` whose weighted rollout over
    ``batches`` from the checkpoint ends with the lowest reward loss, every candidate on the same micro-batches
    from the same state. ``reads``: what a DWM that reads the LM's forward weighs by (``meta.update.lm_reads``).
    {"scales", "reward", "chosen"}; the DWM is left as it was."""
    from dwmtrain.models.weights import normalize_weights

    arch = dwm.arch
    with torch.no_grad():  # the DWM's logits once per micro-batch: a candidate only scales them
        zs = [_scores(dwm, x, reads(x)) for x in batches]

    def at(s: float) -> list[torch.Tensor]:
        return [normalize_weights(s * z, arch.temperature, arch.uniform_mix, arch.normalization) for z in zs]

    scores = [reward_loss(model, rollout(model, params, step, batches, at(s)), reward) for s in scales]
    best = min(range(len(scales)), key=lambda i: scores[i])
    return {"scales": list(scales), "reward": scores, "chosen": scales[best]}
