"""The loss math every room shares (pure functions): per-sample next-token losses, the weighted objective,
the fused weighted loss that never holds the full logits, and the per-example loss of labelled validation
batches. Below models, data, meta and train: all of them use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample. logits [B, T, V], labels [B, T] (-100 ignored) -> [B].

    The labels are shifted, not the logits: position t predicts label t+1 and the last position predicts nothing
    (-100), so the [B, T, V] logits are read in place (slicing them would copy all of them)."""
    lb = F.pad(labels[:, 1:], (0, 1), value=-100)
    lg = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # fp64 stays fp64
    tok = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    m = (lb != -100).to(tok.dtype)
    return (tok.view(lb.shape) * m).sum(1) / m.sum(1).clamp_min(1)


def weighted_loss(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The LM objective for one micro-batch: mean_i w_i * L_i (weights have mean 1, so uniform = plain mean)."""
    return (weights.to(losses.dtype) * losses).mean()


def resolve_weights(weights, losses: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The weights [B] to apply: ``weights`` itself, or, for a rule of the micro-batch's own forward (a callable:
    ``stages.weighting.LossRule``), its weights for ``losses`` (and, for a rule that ``needs_hidden``, the final
    hidden states [B, T, H]), computed without gradient."""
    if not callable(weights):
        return weights
    with torch.no_grad():
        if getattr(weights, "needs_hidden", False):
            return weights(losses.detach(), hidden.detach())
        return weights(losses.detach())


def weighted_objective(model, x: torch.Tensor, weights, chunked: bool) -> tuple[torch.Tensor, ...]:
    """One micro-batch's objective mean_i w_i L_i through ``model`` (a ``models.lm.WeightedLoss`` LM, or its engine),
    whatever the weights are (a tensor [B], or a rule of this forward's own losses): (loss, per-sample losses [B]
    without gradient, the weights applied [B]). ``chunked``: the LM head a chunk of tokens at a time, never the
    [B, T, V] logits (``model.loss_chunk_tokens``)."""
    if chunked:
        loss, losses = model(input_ids=x, sample_weights=weights)
    else:
        hidden_too = getattr(weights, "needs_hidden", False)
        out = model(input_ids=x, output_hidden_states=hidden_too)
        losses = per_sample_loss(out.logits, x)
        loss = weighted_loss(losses, resolve_weights(weights, losses, out.hidden_states[-1] if hidden_too else None))
    applied = weights.weights if callable(weights) else weights
    return loss, losses.detach(), applied


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


def chunked_token_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token next-token losses straight from the hidden states, ``chunk`` tokens of logits at a time, without
    gradients (hidden [N, H], labels [N] with -100 ignored -> [N], 0 where ignored)."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
    with torch.no_grad():
        for s in range(0, hidden.shape[0], chunk):
            logits, lab = (hidden[s : s + chunk] @ weight.t()).to(acc), labels[s : s + chunk]
            ce = F.cross_entropy(logits, lab.clamp_min(0), reduction="none")
            out[s : s + chunk] = torch.where(lab != -100, ce, 0.0)
    return out


def per_sample_loss_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
    """``per_sample_loss(hidden @ weight.T, labels)`` without gradients or the full logits. hidden [B, T, H]."""
    h, lb = hidden[:, :-1], labels[:, 1:]
    tok = chunked_token_losses(h.reshape(-1, h.shape[-1]), weight, lb.reshape(-1), chunk).view(lb.shape)
    m = (lb != -100).to(tok.dtype)
    return (tok * m).sum(1) / m.sum(1).clamp_min(1)


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss per example over labelled positions, and exact-match of all of them.

    logits [B, T, V], labels [B, T] (-100 = ignore) -> loss [B], correct [B] (bool).
    """
    lb = labels[:, 1:]
    hit = ((logits[:, :-1].argmax(-1) == lb) | (lb == -100)).all(1)
    return per_sample_loss(logits, labels), hit
