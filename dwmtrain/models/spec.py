"""What LM to build: a model specification, the one entry point for the LM and the DWM backbone alike.

A spec is a named preset today (``ModelSpec.from_preset``); a Hugging Face config is the next source. Both the
trained LM (``models.lm.build_lm``) and the DWM's backbone (``models.dwm``) are built from it, and the parameter
count comes from its shape, not from building a model.

Parameter count of a Llama: V*H (embeddings) + V*H (head, unless tied) + L*(2*H*H + 2*H*Hkv + 3*H*F + 2*H) + H,
with Hkv = H * kv_heads / heads (grouped-query attention shrinks the key and value projections).

Table 7 of the paper lists FFN 2812 for the 370M model, but with V=32000, H=1024, L=24 that gives
373,572,608, not the 373,867,520 the same table states. Solving the formula for F with the stated
count: (373,867,520 - 2*32000*1024 - 1024) / 24 = 12,847,104 per layer; minus 4*H^2 + 2*H leaves
8,650,752 = 3*H*F, so F = 2816 exactly (11*256, the rounding Llama FFN sizes use); 2812 is a typo.
The 1.3B row (F=5504) reproduces its stated 1,345,423,360 as is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import LlamaConfig

EXACT_EAGER = "dwmtrain_eager"  #: our dtype-preserving eager attention (models.lm registers it)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  #: model.attn_implementation (eager: EXACT_EAGER)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a Llama-family causal LM."""

    name: str  #: the preset's name (what a checkpoint and a DWM file record)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    @classmethod
    def from_preset(cls, name: str, vocab_size: int = 0, max_seq_len: int = 0) -> ModelSpec:
        """A named preset; ``vocab_size``/``max_seq_len`` of 0 keep the preset's."""
        p = PRESETS[name]
        return dataclasses.replace(
            p, vocab_size=vocab_size or p.vocab_size, max_position_embeddings=max_seq_len or p.max_position_embeddings
        )

    def hf_config(self, attn_implementation: str = "sdpa") -> LlamaConfig:
        """The Hugging Face config of this shape (``attn_implementation`` eager: the dtype-preserving kernel)."""
        cfg = LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
            rope_theta=self.rope_theta,
            hidden_act="silu",
            initializer_range=0.02,
            use_cache=False,
        )
        cfg._attn_implementation = EXACT_EAGER if attn_implementation == "eager" else attn_implementation
        return cfg

    def num_parameters(self) -> int:
        """Exact parameter count from the formula in the module docstring (no model is built)."""
        v, h, f, n = self.vocab_size, self.hidden_size, self.intermediate_size, self.num_hidden_layers
        kv = h * self.num_key_value_heads // self.num_attention_heads
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + n * per_layer + h

    def describe(self) -> str:
        """Human-readable architecture summary ending in ``parameters: N``."""
        tied = "tied" if self.tie_word_embeddings else "untied"
        return "\n".join(
            [
                f"preset: {self.name}",
                f"architecture: LlamaForCausalLM (Llama-2 style, RMSNorm, SwiGLU, RoPE, {tied} embeddings)",
                f"vocab_size: {self.vocab_size}",
                f"hidden_size: {self.hidden_size}",
                f"ffn_hidden_size: {self.intermediate_size}",
                f"num_layers: {self.num_hidden_layers}",
                f"num_attention_heads: {self.num_attention_heads}",
                f"num_kv_heads: {self.num_key_value_heads}",
                f"context_length: {self.max_position_embeddings}",
                f"parameters: {self.num_parameters()}",
            ]
        )


PRESETS: dict[str, ModelSpec] = {
    # tests: a forward+backward in milliseconds on one CPU core
    "tiny": ModelSpec("tiny", 64, 176, 2, 4, 4, 512, 256),
    # the CPU demo: a few minutes for a 5-stage run on 2 cores
    "small": ModelSpec("small", 192, 512, 4, 4, 4, 4096, 256),
    # the paper, Table 7
    "370m": ModelSpec("370m", 1024, 2816, 24, 8, 8, 32000, 1024),
    "1.3b": ModelSpec("1.3b", 2048, 5504, 24, 16, 16, 32000, 1024),
}


def lm_spec(model_cfg) -> ModelSpec:
    """The LM a run's ``model`` section describes."""
    return ModelSpec.from_preset(model_cfg.preset, model_cfg.vocab_size, model_cfg.max_seq_len)


def flops_per_token(n_params: int, with_backward: bool) -> float:
    """Chinchilla's C*N FLOPs per token: 6N for forward+backward, 2N forward only (paper Eq. 9)."""
    return (6.0 if with_backward else 2.0) * n_params
