"""Llama-2-style LM presets, built as Hugging Face ``LlamaForCausalLM``.

Parameter count of an untied Llama: 2*V*H (embeddings + head) + L*(4*H^2 + 3*H*F + 2*H) + H.

Table 7 of the paper lists FFN 2812 for the 370M model, but with V=32000, H=1024, L=24 that gives
373,572,608, not the 373,867,520 the same table states. Solving the formula for F with the stated
count: (373,867,520 - 2*32000*1024 - 1024) / 24 = 12,847,104 per layer; minus 4*H^2 + 2*H leaves
8,650,752 = 3*H*F, so F = 2816 exactly (11*256, the rounding Llama FFN sizes use); 2812 is a typo.
The 1.3B row (F=5504) reproduces its stated 1,345,423,360 as is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

EXACT_EAGER = "dwmtrain_eager"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  #: model.attn_implementation (eager: EXACT_EAGER)


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
    """Patch every Llama RMSNorm in ``module`` so float64 models stay float64 (for exact gradient tests)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for m in module.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = _rmsnorm_forward.__get__(m)
    return module


@dataclass(frozen=True)
class LMPreset:
    """Shape of a Llama-2-style model."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int


PRESETS: dict[str, LMPreset] = {
    # tests: a forward+backward in milliseconds on one CPU core
    "tiny": LMPreset(64, 176, 2, 4, 4, 512, 256),
    # the CPU demo: a few minutes for a 5-stage run on 2 cores
    "small": LMPreset(192, 512, 4, 4, 4, 4096, 256),
    # the paper, Table 7
    "370m": LMPreset(1024, 2816, 24, 8, 8, 32000, 1024),
    "1.3b": LMPreset(2048, 5504, 24, 16, 16, 32000, 1024),
}


def llama_config(
    preset: str, vocab_size: int = 0, max_seq_len: int = 0, attn_implementation: str = "sdpa"
) -> LlamaConfig:
    """HF config for a preset; ``vocab_size``/``max_seq_len`` of 0 keep the preset's."""
    p = PRESETS[preset]
    d = asdict(p)
    if vocab_size:
        d["vocab_size"] = vocab_size
    if max_seq_len:
        d["max_position_embeddings"] = max_seq_len
    cfg = LlamaConfig(
        **d,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        rope_theta=10000.0,
        hidden_act="silu",
        initializer_range=0.02,
        use_cache=False,
    )
    # "eager" means our dtype-preserving eager kernel (see exact_eager_attention)
    cfg._attn_implementation = EXACT_EAGER if attn_implementation == "eager" else attn_implementation
    return cfg


class LossHead(nn.Linear):
    """The LM head (an ``nn.Linear``: same parameter, same state dict) that can also return the weighted loss
    directly (``train.loss.fused_weighted_loss``). Computing it inside the head's own forward is what makes
    ZeRO-3 work unchanged: the weight is gathered for this forward and again for its backward by the
    module's hooks, and its gradient is reduce-scattered like any other."""

    def forward(self, hidden, labels=None, sample_weights=None, chunk: int = 1024):
        if labels is None:
            return super().forward(hidden)
        from dwmtrain.train.loss import fused_weighted_loss

        return fused_weighted_loss(hidden, self.weight, labels, sample_weights, chunk)


class WeightedLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` (same modules, same state dict) whose forward can also return the weighted
    training objective without materializing the logits: ``model(input_ids=x, sample_weights=w)`` ->
    (mean_i w_i * L_i, per-sample losses [B] without gradient), the LM head applied a chunk of tokens at a
    time. Without ``sample_weights`` it is the plain HF forward."""

    loss_chunk_tokens = 1024

    def __init__(self, config):
        super().__init__(config)
        self.lm_head.__class__ = LossHead  # an nn.Linear with one more way to be called

    def forward(self, input_ids=None, sample_weights=None, **kwargs):
        if sample_weights is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        return self.lm_head(hidden, labels=input_ids, sample_weights=sample_weights, chunk=self.loss_chunk_tokens)


def build_lm(
    preset: str,
    vocab_size: int = 0,
    max_seq_len: int = 0,
    attn_implementation: str = "sdpa",
    seed: int | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> WeightedLlamaForCausalLM:
    """A freshly initialized LM for a preset (seeded when ``seed`` is given; ``dtype=None``: as constructed)."""
    cfg = llama_config(preset, vocab_size, max_seq_len, attn_implementation)
    if seed is not None:
        torch.manual_seed(seed)
    model = dtype_preserving_norms(WeightedLlamaForCausalLM(cfg))
    return model if dtype is None else model.to(dtype)


def count_parameters(preset: str, vocab_size: int = 0) -> int:
    """Exact parameter count from the formula in the module docstring (no model is built)."""
    p = PRESETS[preset]
    v = vocab_size or p.vocab_size
    h, f, n = p.hidden_size, p.intermediate_size, p.num_hidden_layers
    return 2 * v * h + n * (4 * h * h + 3 * h * f + 2 * h) + h


def describe(preset: str, vocab_size: int = 0) -> str:
    """Human-readable architecture summary ending in ``parameters: N``."""
    p = PRESETS[preset]
    v = vocab_size or p.vocab_size
    lines = [
        f"preset: {preset}",
        "architecture: LlamaForCausalLM (Llama-2 style, RMSNorm, SwiGLU, RoPE, untied embeddings)",
        f"vocab_size: {v}",
        f"hidden_size: {p.hidden_size}",
        f"ffn_hidden_size: {p.intermediate_size}",
        f"num_layers: {p.num_hidden_layers}",
        f"num_attention_heads: {p.num_attention_heads}",
        f"num_kv_heads: {p.num_key_value_heads}",
        f"context_length: {p.max_position_embeddings}",
        f"parameters: {count_parameters(preset, vocab_size)}",
    ]
    return "\n".join(lines)


def flops_per_token(n_params: int, with_backward: bool) -> float:
    """Chinchilla's C*N FLOPs per token: 6N for forward+backward, 2N forward only (paper Eq. 9)."""
    return (6.0 if with_backward else 2.0) * n_params
