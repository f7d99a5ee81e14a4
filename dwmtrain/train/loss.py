"""Pure loss and schedule math: per-sample losses, the weighted objective, the LR schedule."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample. logits [B, T, V], labels [B, T] (-100 ignored) -> [B]."""
    lg, lb = logits[:, :-1], labels[:, 1:]
    if lg.dtype in (torch.float16, torch.bfloat16):
        lg = lg.float()  # the softmax in fp32; fp64 stays fp64 (the meta-gradient tests)
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    m = (lb != -100).to(tok.dtype)
    return (tok.view(lb.shape) * m).sum(1) / m.sum(1).clamp_min(1)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The LM objective for one micro-batch: mean_i w_i * L_i (weights have mean 1, so uniform = plain mean)."""
    return (weights.to(losses.dtype) * losses).mean()


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at the last step. ``step`` is 0-based."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def default_warmup(total_steps: int, warmup_steps: int) -> int:
    return warmup_steps if warmup_steps else max(1, total_steps // 100)


def scheduled_lr(cfg, step: int) -> float:
    """The LM learning rate after ``step`` optimizer steps: exactly what the engine's LambdaLR sets."""
    o, total = cfg.optimizer, cfg.stages.total_steps
    return o.lr * lr_multiplier(step, total, default_warmup(total, o.warmup_steps), o.min_lr_ratio)


class _WeightedLinearCE(torch.autograd.Function):
    """sum_t coef_t * CE(hidden_t @ weight.T, label_t), computed ``chunk`` tokens at a time.

    The upstream gradient of every token's loss is ``coef`` (known before the forward: the DWM's weights
    are), so the gradients for hidden and weight are computed in the forward pass, one chunk of logits at
    a time, and the backward only scales them: no [tokens, vocab] tensor is ever kept, and the weight is
    not needed in the backward (under ZeRO-3 it is gathered for the forward only). Exact for the scalar
    output; the per-token losses come back too, without gradient (statistics, logging)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, coef, chunk: int):
        n, acc = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)  # bf16 -> fp32; fp64 stays
        tok = torch.zeros(n, dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, n, chunk):
            h, lab, c = hidden[s : s + chunk], labels[s : s + chunk], coef[s : s + chunk]
            logits = (h @ weight.t()).to(acc)  # [C, V]: the only vocabulary-sized tensor, one chunk at a time
            lse = torch.logsumexp(logits, dim=-1)
            valid = lab != -100
            safe = lab.clamp_min(0)
            tok[s : s + chunk] = torch.where(valid, lse - logits.gather(1, safe[:, None]).squeeze(1), 0.0)
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(lab), device=g.device), safe] -= valid.to(g.dtype)
            g.mul_(torch.where(valid, c, 0.0)[:, None])  # d(sum coef * CE) / d(logits)
            grad_h[s : s + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_w.addmm_(g.t(), h.to(acc))
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(tok)
        return (coef * tok).sum(), tok

    @staticmethod
    def backward(ctx, grad_out, _grad_tok):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype), None, None, None


def fused_weighted_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM objective mean_i w_i * L_i straight from the last hidden states, without the full logits.

    hidden [B, T, H] (the states before the LM head), weight [V, H] (the LM head), labels [B, T] (-100
    ignored; position t predicts labels t+1), weights [B] (no gradient). Returns (loss, per-sample losses
    [B] without gradient): equal to ``weighted_loss(per_sample_loss(hidden @ weight.T, labels), weights)``
    and its gradients, with at most ``chunk`` x V logits alive at a time."""
    h, lb = hidden[:, :-1], labels[:, 1:]
    acc = torch.promote_types(hidden.dtype, torch.float32)
    valid = (lb != -100).to(acc)
    n = valid.sum(1).clamp_min(1)  # tokens scored per sample
    coef = (weights.detach().to(acc) / (lb.shape[0] * n))[:, None].expand_as(valid).reshape(-1)
    loss, tok = _WeightedLinearCE.apply(h.reshape(-1, h.shape[-1]), weight, lb.reshape(-1), coef, chunk)
    return loss, (tok.view(lb.shape) * valid).sum(1) / n
