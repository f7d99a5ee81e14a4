"""The trained LM: the Hugging Face causal-LM class of a ``ModelSpec``'s architecture (Llama, Mistral, Qwen2,
Qwen3), whose forward can also return the weighted training objective without the full logits; dtype-preserving
eager attention and RMSNorm.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from transformers import AttentionInterface

from dwmtrain.models.loss import fused_weighted_loss, per_sample_loss_chunked, resolve_weights, weighted_loss
from dwmtrain.models.spec import EXACT_EAGER, ModelSpec


def exact_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention that keeps the input dtype (HF's eager upcasts the softmax to fp32 even for fp64).

    Plain matmul/softmax ops: double backward and forward-mode AD work through it, which the exact
    meta-gradient reference modes (unrolled, jvp) need; float64 stays float64 end to end.
    """
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1)
    v = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling  # [B, heads, Tq, Tk]
    if attention_mask is None:
        Tq, Tk = scores.shape[-2:]
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=scores.device).tril(Tk - Tq)
        scores = scores.masked_fill(~causal, float("-inf"))
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask.to(scores.dtype)
    sdt = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype
    probs = torch.softmax(scores, dim=-1, dtype=sdt).to(query.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    return out, probs


AttentionInterface.register(EXACT_EAGER, exact_eager_attention)


def _rmsnorm_forward(self, x: torch.Tensor) -> torch.Tensor:
    # HF's LlamaRMSNorm always computes in fp32; this is the same in fp32/bf16 and exact in fp64.
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    h = x.to(dt)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * h.to(x.dtype)


def dtype_preserving_norms(module: torch.nn.Module) -> torch.nn.Module:
    """Patch every RMSNorm of ``module`` (Llama's, Mistral's, Qwen's: the same math) so float64 models stay
    float64 (for exact gradient tests)."""
    for m in module.modules():
        if type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon"):
            m.forward = _rmsnorm_forward.__get__(m)
    return module


class LossHead(nn.Linear):
    """The LM head (an ``nn.Linear``: same parameter, same state dict) that can also return the weighted loss
    directly (``models.loss.fused_weighted_loss``). Computing it inside the head's own forward is what makes
    ZeRO-3 work unchanged: the weight is gathered for this forward and again for its backward by the
    module's hooks, and its gradient is reduce-scattered like any other."""

    def forward(self, hidden, labels=None, sample_weights=None, chunk: int = 1024):
        if labels is None:
            return super().forward(hidden)
        if callable(sample_weights):  # a rule of this very forward (its losses, its states): its weights first
            losses = per_sample_loss_chunked(hidden, self.weight, labels, chunk)
            sample_weights = resolve_weights(sample_weights, losses, hidden)
        if not torch.is_grad_enabled():  # the losses only (the meta job's perturbed forwards, evaluation)
            losses = per_sample_loss_chunked(hidden, self.weight, labels, chunk)
            return weighted_loss(losses, sample_weights), losses
        return fused_weighted_loss(hidden, self.weight, labels, sample_weights, chunk)


class WeightedLoss:
    """Mixed into an HF causal LM (same modules, same state dict): its forward can also return the weighted
    training objective without materializing the logits: ``model(input_ids=x, sample_weights=w)`` ->
    (mean_i w_i * L_i, per-sample losses [B] without gradient), the LM head applied a chunk of tokens at a
    time. Without ``sample_weights`` it is the plain HF forward. A tied head stays tied: ``LossHead`` holds the
    embedding's own parameter."""

    loss_chunk_tokens = 1024

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.__class__ = LossHead  # an nn.Linear with one more way to be called

    def forward(self, input_ids=None, sample_weights=None, **kwargs):
        if sample_weights is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return self.lm_head(hidden, labels=input_ids, sample_weights=sample_weights, chunk=self.loss_chunk_tokens)


@functools.cache
def weighted_lm_class(config_class: type) -> type:
    """The HF causal-LM class of ``config_class`` with ``WeightedLoss`` mixed in."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    base = MODEL_FOR_CAUSAL_LM_MAPPING[config_class]
    return type(f"Weighted{base.__name__}", (WeightedLoss, base), {"__module__": __name__})


def build_lm(
    spec: ModelSpec,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> torch.nn.Module:
    """A freshly initialized LM of ``spec`` (seeded when ``seed`` is given; ``dtype=None``: as constructed)."""
    if seed is not None:
        torch.manual_seed(seed)
    cfg = spec.hf_config(attn_implementation)
    model = dtype_preserving_norms(weighted_lm_class(type(cfg))(cfg))
    return model if dtype is None else model.to(dtype)


def enable_activation_checkpointing(model: torch.nn.Module, every: int) -> int:
    """Recompute the activations of every ``every``-th decoder layer in the backward instead of keeping them (0:
    off). Hugging Face's own per-layer switch, with torch's non-reentrant checkpoint: the layer's forward is
    recomputed inside the layer, so ZeRO-3's module hooks gather its parameters again for the recompute (the
    reentrant path is DeepSpeed #7830's). Returns how many layers recompute."""
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = bool(every) and i % every == 0
        layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return sum(layer.gradient_checkpointing for layer in layers)


def load_lm_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load ``state`` (names as the model's own) into ``model``; returns what did not fit (missing or unexpected
    names), a tied head's weight not counted: it is the embedding's, held once."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if tied:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    return [*missing, *unexpected]
