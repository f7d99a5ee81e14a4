"""The Data Weighting Model: per-sample weights for a micro-batch, from the micro-batch as a whole.

    tokens [B, T] --Llama backbone--> hidden [B, T, H] --pool--> e [B, H]
      --one self-attention block across the B samples (no position across samples)--> h [B, H]
      --Linear, GELU, Linear--> logits [B] --B*softmax(logits/temp), uniform mix--> w [B], mean(w)=1

With ``dwm.features=lm`` there is no backbone: the LM's own final hidden states of the training forward are pooled
instead (the features of the current LM, at no extra forward), and only the rest is the DWM.

Its file format (safetensors + a signed sidecar) is ``checkpoint.dwm_file``; the weight math is ``models.weights``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import MODEL_MAPPING

from dwmtrain.errors import ConfigError
from dwmtrain.models.lm import dtype_preserving_norms
from dwmtrain.models.spec import ModelSpec, attention_flops_per_token, flops_per_token
from dwmtrain.models.weights import normalize_weights

POOLINGS = ("mean", "last")  #: how token states become one embedding per sample (dwm.pooling)
FEATURES = ("backbone", "lm")  #: what the DWM embeds samples with (dwm.features): its own backbone | the LM's states


@dataclass(frozen=True)
class DWMArch:
    """Everything needed to rebuild a DWM; stored in its metadata and checked on load."""

    backbone: str
    vocab_size: int
    max_seq_len: int
    attn_heads: int = 4
    head_hidden: int = 0
    pooling: str = "mean"
    temperature: float = 1.0
    uniform_mix: float = 0.0
    attn_implementation: str = "sdpa"
    normalization: str = "softmax"
    #: the backbone's Hugging Face config fields (JSON) when it is not a preset: the LM's own (dwm.backbone=lm)
    backbone_config: str = ""
    loss_feature: bool = False  #: the LM's per-sample losses are an input (dwm.loss_feature)
    features: str = "backbone"  #: backbone | lm: the LM's own final hidden states, no backbone (dwm.features)

    @classmethod
    def from_config(cls, cfg, vocab_size: int):
        """The DWM of a run (``cfg`` is the whole config tree); the vocabulary is the LM's."""
        from dwmtrain.models.spec import lm_spec

        lm = lm_spec(cfg.model) if cfg.dwm.backbone == "lm" else None
        return cls.of(cfg.dwm, lm, vocab_size, cfg.model.max_seq_len or cfg.data.seq_len, cfg.model.attn_implementation)

    @classmethod
    def of(cls, d, lm: ModelSpec | None, vocab_size: int, max_seq_len: int, attn_implementation: str = "sdpa"):
        """The DWM of the settings ``d`` (a ``config.DWMConfig``) for an LM of shape ``lm`` (its backbone when
        ``d.backbone`` is lm; else a preset's)."""
        own = d.backbone == "lm"
        return cls(
            backbone=lm.name if own else d.backbone,
            backbone_config=lm.config_json if own else "",
            vocab_size=vocab_size,
            max_seq_len=max_seq_len,
            attn_heads=d.attn_heads,
            head_hidden=d.head_hidden,
            pooling=d.pooling,
            temperature=d.temperature,
            uniform_mix=d.uniform_mix,
            attn_implementation=attn_implementation,
            normalization=d.normalization,
            loss_feature=d.loss_feature,
            features=d.features,
        )

    def backbone_spec(self) -> ModelSpec:
        """The backbone's LM shape (the DWM's own vocabulary and context)."""
        if self.backbone_config:
            return ModelSpec.from_fields(self.backbone, json.loads(self.backbone_config)).resized(
                self.vocab_size, self.max_seq_len
            )
        return ModelSpec.from_preset(self.backbone, self.vocab_size, self.max_seq_len)

    def shape_fields(self) -> dict:
        """Fields that change the tensors (a mismatch means the file cannot be loaded).

        max_seq_len is not one: RoPE has no learned positions, so a DWM transfers across context lengths. A
        backbone of its own config (dwm.backbone=lm) is compared by its shape, not by its file's name."""
        d = asdict(self)
        for k in ("temperature", "uniform_mix", "attn_implementation", "max_seq_len", "normalization"):
            d.pop(k)
        d["backbone_config"] = json.dumps(self.backbone_spec().shape(), sort_keys=True)
        d.pop("backbone")  # a preset and an LM's own config of the same shape are the same backbone
        return d


class DataWeightingModel(nn.Module):
    """Backbone embeds each sample; attention across the micro-batch; two linears -> weights."""

    def __init__(self, arch: DWMArch):
        super().__init__()
        self.arch = arch
        cfg = arch.backbone_spec().hf_config(arch.attn_implementation)
        lm_features = arch.features == "lm"  # the LM's states are the features: the backbone's config gives their width
        self.backbone = None if lm_features else dtype_preserving_norms(MODEL_MAPPING[type(cfg)](cfg))
        H = cfg.hidden_size
        if H % arch.attn_heads:
            raise ConfigError(f"dwm.attn_heads={arch.attn_heads}: must divide the backbone hidden size {H}")
        hid = arch.head_hidden or H
        # standardize each feature over the micro-batch (affine like LayerNorm's): the weights are a softmax
        # over the micro-batch, so only differences between samples matter; the component the samples
        # share (large for mean-pooled LM states) would otherwise drown them.
        self.in_scale = nn.Parameter(torch.ones(H))
        self.in_bias = nn.Parameter(torch.zeros(H))
        self.attn = nn.MultiheadAttention(H, arch.attn_heads, batch_first=True)
        self.norm = nn.LayerNorm(H)
        self.fc1 = nn.Linear(H, hid)
        self.fc2 = nn.Linear(hid, 1)
        # the standardized loss enters beside the standardized embedding, before the attention across samples
        self.loss_in = nn.Linear(1, H) if arch.loss_feature else None
        # A fresh head scores every sample 0 -> exactly uniform weights (stage 1 is uniform).
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @property
    def reads_lm(self) -> bool:
        """Whether its weights need what the LM's forward of the same micro-batch computes (its per-sample losses,
        its final hidden states): the trainer then resolves them inside that forward."""
        return self.arch.loss_feature or self.arch.features == "lm"

    def embed(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T] -> [B, H] pooled final hidden states: the backbone's, or (dwm.features=lm) the LM's ``hidden``
        [B, T, H] of these tokens."""
        if self.backbone is not None:
            h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        elif hidden is None:
            raise ValueError("this DWM weighs by the LM's own hidden states (dwm.features=lm): pass them")
        else:  # the LM's dtype may not be the DWM's (meta.lm_dtype, a bf16 trainer with dwm.dtype=fp32)
            h = hidden.detach().to(self.in_scale.dtype)
        if self.arch.pooling == "last":
            if attention_mask is None:
                return h[:, -1]
            last = attention_mask.sum(1) - 1
            return h[torch.arange(h.shape[0], device=h.device), last]
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def score(self, emb: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H] (and the LM's per-sample losses [B], for a loss-aware DWM) -> logits [B]; permutation-equivariant
        in the B samples."""
        x = _standardized(emb) * self.in_scale + self.in_bias
        if self.loss_in is not None:
            if losses is None:
                raise ValueError("this DWM weighs by the LM's per-sample losses (dwm.loss_feature): pass them")
            x = x + self.loss_in(_standardized(losses.detach().to(emb.dtype).reshape(-1, 1)))
        x = x.unsqueeze(0)  # [1, B, H]: samples as a "sequence"
        a, _ = self.attn(x, x, x, need_weights=False)
        h = self.norm(x + a)
        return self.fc2(F.gelu(self.fc1(h))).squeeze(-1).squeeze(0)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T] (and what it reads of the LM's forward of them: per-sample losses [B] for a loss-aware DWM, the
        final hidden states [B, T, H] for dwm.features=lm) -> weights [B] with mean 1."""
        return self.weigh(self.embed(input_ids, attention_mask, hidden), losses)

    def weigh(self, emb: torch.Tensor, losses: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled embeddings [B, H] (``embed``) -> weights [B] with mean 1."""
        logits = self.score(emb, losses)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return normalize_weights(logits, self.arch.temperature, self.arch.uniform_mix, self.arch.normalization)

    def init_backbone_from(self, lm_state: dict[str, torch.Tensor]) -> None:
        """Copy an LM's transformer (``model.*`` of a LlamaForCausalLM state dict) into the backbone (none to copy
        into with dwm.features=lm)."""
        if self.backbone is None:
            return
        sd = {k[len("model.") :]: v for k, v in lm_state.items() if k.startswith("model.")}
        own = self.backbone.state_dict()
        bad = [k for k in own if k not in sd or sd[k].shape != own[k].shape]
        if bad:
            raise ConfigError(
                f"cannot initialize the DWM backbone ({self.arch.backbone}) from this LM: "
                f"{len(bad)} tensors missing or of another shape (e.g. {bad[0]}); "
                "use the LM's preset as dwm.backbone or set dwm.init_backbone_from_lm=false"
            )
        self.backbone.load_state_dict({k: sd[k] for k in own})


def _standardized(t: torch.Tensor) -> torch.Tensor:
    """Each column over the micro-batch (dim 0) to mean 0, variance 1: the weights are a softmax over the
    micro-batch, so only differences between samples matter."""
    return (t - t.mean(0, keepdim=True)) / t.var(0, unbiased=False, keepdim=True).add(1e-5).sqrt()


def dwm_from_state(arch: DWMArch, state: dict[str, torch.Tensor]) -> DataWeightingModel:
    """A DWM of ``arch`` holding ``state`` (the one place a DWM is rebuilt from tensors)."""
    model = DataWeightingModel(arch)
    model.load_state_dict(state)
    return model


def fresh_dwm(arch: DWMArch, seed: int, lm_state: dict[str, torch.Tensor] | None) -> tuple[DataWeightingModel, str]:
    """A new DWM of ``arch`` (its head scores every sample 0: uniform weights), seeded; its backbone copied from the
    LM's ``lm_state`` when given (the paper's start), else random. Returns it and how it was made."""
    torch.manual_seed(seed + 7919)
    m = DataWeightingModel(arch)
    if m.backbone is None:
        return m, "fresh head on the LM's own hidden states (dwm.features=lm)"
    if lm_state is not None:
        m.init_backbone_from(lm_state)
        return m, "fresh head, backbone initialized from the LM"
    return m, "fresh (random backbone)"


def dwm_parameter_count(arch: DWMArch) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DataWeightingModel(arch).parameters())


def dwm_forward_flops_per_token(arch: DWMArch, seq: int, n_params: int = 0) -> float:
    """The DWM's forward FLOPs per scored token: its parameters' 2N and its backbone's attention at ``seq``
    tokens (``n_params``: its parameter count, when already known)."""
    n = n_params or dwm_parameter_count(arch)
    if arch.features == "lm":  # the head only, once per sample: the LM's forward computed the features
        return flops_per_token(n, False) / seq
    return flops_per_token(n, False) + attention_flops_per_token(arch.backbone_spec(), seq, False)
