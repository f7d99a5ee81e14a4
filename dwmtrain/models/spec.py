"""What LM to build: a model specification, the one entry point for the LM and the DWM backbone alike.

A spec is a named preset (``ModelSpec.from_preset``) or a Hugging Face causal-LM config (``from_hf_config``: a
``config.json`` or a model directory). Supported architectures are those one model class serves with the same
code (``SUPPORTED``); any other is refused with a one-line error naming it. The trained LM (``models.lm``) and
the DWM's backbone (``models.dwm``) are built from a spec, and the parameter count comes from its shape, not
from building a model.

Parameter count of these models: V*H (embeddings) + V*H (head, unless tied) + H (final norm) + per layer
H*(q + 2*kv) + q*H (attention, q = heads * head_dim, kv = kv_heads * head_dim: grouped-query attention shrinks
the key and value projections) + 3*H*F (SwiGLU) + 2*H (norms), plus the biases and norms an architecture adds
(Qwen2: biases on q, k, v; Qwen3: an RMSNorm of head_dim on q and k; ``attention_bias``/``mlp_bias`` where set).

Table 7 of the paper lists FFN 2812 for the 370M model, but with V=32000, H=1024, L=24 that gives
373,572,608, not the 373,867,520 the same table states. Solving the formula for F with the stated
count: (373,867,520 - 2*32000*1024 - 1024) / 24 = 12,847,104 per layer; minus 4*H^2 + 2*H leaves
8,650,752 = 3*H*F, so F = 2816 exactly (11*256, the rounding Llama FFN sizes use); 2812 is a typo.
The 1.3B row (F=5504) reproduces its stated 1,345,423,360 as is.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.errors import ConfigError

EXACT_EAGER = "dwmtrain_eager"  #: our dtype-preserving eager attention (models.lm registers it)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  #: model.attn_implementation (eager: EXACT_EAGER)

#: model_type: what it covers. One HF class each, the same LM head and decoder layout, so the fused loss, the
#: DWM backbone, the meta job and the export serve them all.
SUPPORTED = {
    "llama": "Llama 2, 3, 3.1, 3.2 (GQA, tied embeddings, rope scaling)",
    "mistral": "Mistral (a sliding window as Hugging Face's own code applies it)",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3 (dense)",
}
#: HF config fields that are bookkeeping, not the model: left out of a spec so that it compares equal across
#: the files and library versions that describe the same model
_BOOKKEEPING = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "use_cache", "_name_or_path", "return_dict",
    "output_attentions", "output_hidden_states", "id2label", "label2id", "problem_type", "chunk_size_feed_forward",
    "is_encoder_decoder", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss", "torchscript",
}  # fmt: skip

#: the fields the parameter count reads that a config may leave to its architecture's defaults
_SHAPE_DEFAULTS = ("head_dim", "num_key_value_heads", "tie_word_embeddings", "attention_bias", "mlp_bias")

_LLAMA2 = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "hidden_act": "silu", "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip
_LLAMA3 = {"model_type": "llama", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
           "initializer_range": 0.02, "vocab_size": 128256, "max_position_embeddings": 131072,
           "bos_token_id": 128000, "eos_token_id": 128001}  # fmt: skip


def _rope3(factor: float) -> dict:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}  # fmt: skip


def _shape(h, f, layers, heads, kv, vocab, ctx, **more) -> dict:
    return {"hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": ctx, **more}  # fmt: skip


#: name: the Hugging Face config fields of the preset
PRESET_CONFIGS: dict[str, dict] = {
    # tests: a forward+backward in milliseconds on one CPU core
    "tiny": {**_LLAMA2, **_shape(64, 176, 2, 4, 4, 512, 256)},
    # the CPU demo: a few minutes for a 5-stage run on 2 cores
    "small": {**_LLAMA2, **_shape(192, 512, 4, 4, 4, 4096, 256)},
    # the paper, Table 7
    "370m": {**_LLAMA2, **_shape(1024, 2816, 24, 8, 8, 32000, 1024)},
    "1.3b": {**_LLAMA2, **_shape(2048, 5504, 24, 16, 16, 32000, 1024)},
    # the shapes people use (Meta's published configs), randomly initialized unless model.init_from is given
    "llama3.2-1b": {**_LLAMA3, **_shape(2048, 8192, 16, 32, 8, 128256, 131072, head_dim=64),
                    "tie_word_embeddings": True, "rope_scaling": _rope3(32.0)},
    "llama3.2-3b": {**_LLAMA3, **_shape(3072, 8192, 28, 24, 8, 128256, 131072, head_dim=128),
                    "tie_word_embeddings": True, "rope_scaling": _rope3(32.0)},
    "llama3.1-8b": {**_LLAMA3, **_shape(4096, 14336, 32, 32, 8, 128256, 131072, head_dim=128),
                    "tie_word_embeddings": False, "rope_scaling": _rope3(8.0)},
}  # fmt: skip
PRESETS = tuple(PRESET_CONFIGS)


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a causal LM of a supported architecture: its Hugging Face config fields."""

    name: str  #: the preset's name, or the config it was read from
    config_json: str  #: the Hugging Face config's fields (sorted JSON; ``config`` reads it)

    @classmethod
    def from_fields(cls, name: str, fields: dict) -> ModelSpec:
        """A spec of these HF config fields; the fields the shape depends on that they leave to the
        architecture's defaults are written out (Qwen3's head_dim is not hidden / heads, for one)."""
        fields = {k: v for k, v in fields.items() if k not in _BOOKKEEPING and not k.startswith("_")}
        cls(name, json.dumps(fields, sort_keys=True)).check()
        if missing := [k for k in _SHAPE_DEFAULTS if k not in fields]:
            from transformers import AutoConfig

            full = AutoConfig.for_model(fields["model_type"], **{k: v for k, v in fields.items() if k != "model_type"})
            for k in missing:
                if getattr(full, k, None) is not None:
                    fields[k] = getattr(full, k)
        return cls(name, json.dumps(fields, sort_keys=True))

    @classmethod
    def from_preset(cls, name: str, vocab_size: int = 0, max_seq_len: int = 0) -> ModelSpec:
        """A named preset; ``vocab_size``/``max_seq_len`` of 0 keep the preset's."""
        if name not in PRESET_CONFIGS:
            raise ConfigError(f"model.preset={name!r}: not a preset ({', '.join(PRESETS)})")
        return cls.from_fields(name, PRESET_CONFIGS[name]).resized(vocab_size, max_seq_len)

    @classmethod
    def from_hf_config(
        cls, path: str | os.PathLike, vocab_size: int = 0, max_seq_len: int = 0, field: str = "model.hf_config"
    ) -> ModelSpec:
        """The model a Hugging Face ``config.json`` (or a model directory holding one) describes; errors name
        ``field``."""
        p = Path(path)
        file = p / "config.json" if p.is_dir() else p
        try:
            fields = json.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{field}={path}: {file} not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{field}={path}: {file} is not a JSON config ({e})") from None
        if not isinstance(fields, dict) or "model_type" not in fields:
            raise ConfigError(f"{field}={path}: {file} has no model_type (not a Hugging Face model config)")
        fields = _from_text_config(fields)
        return cls.from_fields(str(file.resolve()), fields).resized(vocab_size, max_seq_len)

    @functools.cached_property
    def config(self) -> dict:
        """The Hugging Face config fields (a fresh copy is ``json.loads(spec.config_json)``)."""
        return json.loads(self.config_json)

    model_type = property(lambda self: self.config["model_type"])
    hidden_size = property(lambda self: self.config["hidden_size"])
    intermediate_size = property(lambda self: self.config["intermediate_size"])
    num_hidden_layers = property(lambda self: self.config["num_hidden_layers"])
    num_attention_heads = property(lambda self: self.config["num_attention_heads"])
    num_key_value_heads = property(lambda self: self.config.get("num_key_value_heads") or self.num_attention_heads)
    head_dim = property(lambda self: self.config.get("head_dim") or self.hidden_size // self.num_attention_heads)
    vocab_size = property(lambda self: self.config["vocab_size"])
    max_position_embeddings = property(lambda self: self.config["max_position_embeddings"])
    tie_word_embeddings = property(lambda self: bool(self.config.get("tie_word_embeddings", False)))

    def shape(self) -> dict:
        """What decides the tensors' shapes (and so whether weights fit): the architecture and its sizes."""
        keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size")  # fmt: skip
        c = self.config
        return {**{k: c[k] for k in keys}, "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": bool(c.get("attention_bias")),
                "mlp_bias": bool(c.get("mlp_bias"))}  # fmt: skip

    def resized(self, vocab_size: int = 0, max_seq_len: int = 0) -> ModelSpec:
        """The same model with another vocabulary or context (0: keep)."""
        cfg = json.loads(self.config_json)
        cfg["vocab_size"] = vocab_size or cfg["vocab_size"]
        ctx = max_seq_len or cfg["max_position_embeddings"]
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("original_max_position_embeddings"):  # Llama 3's scaled rope: its frequencies ignore the
            ctx = max(ctx, cfg["max_position_embeddings"])  # context, and a shorter one draws HF's warning per model
        cfg["max_position_embeddings"] = ctx
        return ModelSpec(self.name, json.dumps(cfg, sort_keys=True))

    def check(self) -> None:
        """Refuse an architecture or a setting the code does not serve, naming it."""
        cfg, where = self.config, f"model {self.name}"
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            known = "; ".join(f"{k}: {v}" for k, v in SUPPORTED.items())
            raise ConfigError(f"{where}: architecture {mt!r} is not supported (supported: {known})")
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if not isinstance(cfg.get(k), int) or cfg[k] <= 0:
                raise ConfigError(f"{where}: field {k}={cfg.get(k)!r}: must be a positive integer")

    def hf_config(self, attn_implementation: str = "sdpa"):
        """The Hugging Face config of this model (``attn_implementation`` eager: the dtype-preserving kernel)."""
        from transformers import AutoConfig

        fields = json.loads(self.config_json)
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        cfg.use_cache = False
        cfg._attn_implementation = EXACT_EAGER if attn_implementation == "eager" else attn_implementation
        return cfg

    def num_parameters(self) -> int:
        """Exact parameter count from the formula in the module docstring (no model is built)."""
        c, hd = self.config, self.head_dim
        v, h, f, n = c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        q, kv = c["num_attention_heads"] * hd, self.num_key_value_heads * hd
        attn = h * (q + 2 * kv) + q * h
        if c["model_type"] == "qwen2":  # biases on q, k, v (not o)
            attn += q + 2 * kv
        elif c.get("attention_bias"):
            attn += q + 2 * kv + h
        if c["model_type"] == "qwen3":  # RMSNorm of q and k over head_dim
            attn += 2 * hd
        mlp = 3 * h * f + (2 * f + h if c.get("mlp_bias") else 0)
        return v * h * (1 if self.tie_word_embeddings else 2) + n * (attn + mlp + 2 * h) + h

    def describe(self) -> str:
        """Human-readable architecture summary ending in ``parameters: N``."""
        c = self.config
        tied = "tied" if self.tie_word_embeddings else "untied"
        return "\n".join(
            [
                f"preset: {self.name}",
                f"architecture: {c['model_type']} ({SUPPORTED[c['model_type']]}; RMSNorm, SwiGLU, RoPE, {tied} "
                "embeddings)",
                f"vocab_size: {c['vocab_size']}",
                f"hidden_size: {c['hidden_size']}",
                f"ffn_hidden_size: {c['intermediate_size']}",
                f"num_layers: {c['num_hidden_layers']}",
                f"num_attention_heads: {c['num_attention_heads']}",
                f"num_kv_heads: {self.num_key_value_heads}",
                f"head_dim: {self.head_dim}",
                f"context_length: {c['max_position_embeddings']}",
                f"parameters: {self.num_parameters()}",
            ]
        )


def _from_text_config(fields: dict) -> dict:
    """A multimodal wrapper's text model config, else the config itself."""
    if fields.get("model_type") not in SUPPORTED and isinstance(fields.get("text_config"), dict):
        return fields["text_config"]
    return fields


def lm_spec(model_cfg) -> ModelSpec:
    """The LM a run's ``model`` section describes: ``hf_config`` (or ``init_from``'s config) if given, else the
    preset; ``vocab_size``/``max_seq_len`` resize it."""
    hf, init = getattr(model_cfg, "hf_config", ""), getattr(model_cfg, "init_from", "")
    if hf or init:
        field = "model.hf_config" if hf else "model.init_from"
        return ModelSpec.from_hf_config(hf or init, model_cfg.vocab_size, model_cfg.max_seq_len, field)
    return ModelSpec.from_preset(model_cfg.preset, model_cfg.vocab_size, model_cfg.max_seq_len)


def flops_per_token(n_params: int, with_backward: bool) -> float:
    """Chinchilla's C*N FLOPs per token: 6N for forward+backward, 2N forward only (paper Eq. 9)."""
    return (6.0 if with_backward else 2.0) * n_params


def attention_flops_per_token(spec: ModelSpec, seq: int, with_backward: bool) -> float:
    """The attention's own FLOPs per token at ``seq`` tokens (PaLM, appendix B): QK^T and the weighted sum of the
    values, 2 x 2 x T x heads x head_dim per layer forward, 3x that with the backward (12 L H T; causal masking not
    discounted, as PaLM counts it)."""
    width = spec.num_attention_heads * spec.head_dim
    return (12.0 if with_backward else 4.0) * spec.num_hidden_layers * width * seq


def model_flops_per_token(spec: ModelSpec, seq: int, with_backward: bool = True) -> float:
    """Model FLOPs per token (what MFU divides by the peak): the parameters' matmuls (6N, or 2N forward only) and
    the attention's; recomputation is not model FLOPs."""
    return flops_per_token(spec.num_parameters(), with_backward) + attention_flops_per_token(spec, seq, with_backward)
