"""The Data Weighting Model: per-sample weights for a micro-batch, from the micro-batch as a whole.

    tokens [B, T] --Llama backbone--> hidden [B, T, H] --pool--> e [B, H]
      --one self-attention block across the B samples (no position across samples)--> h [B, H]
      --Linear, GELU, Linear--> logits [B] --B*softmax(logits/temp), uniform mix--> w [B], mean(w)=1

Saved as safetensors + a JSON sidecar (architecture, stage, LM step, sha256 of the tensor file). The same
metadata sits in the safetensors header, under the checksum: loading verifies the checksum, that the sidecar
agrees with the header, every architecture field, and the tensors' shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import MODEL_MAPPING

from dwmtrain.errors import ConfigError, DWMTrainError
from dwmtrain.faults import fault_point
from dwmtrain.fileio import atomic_file, atomic_write_text, sha256_file
from dwmtrain.models.lm import dtype_preserving_norms
from dwmtrain.models.spec import ATTN_IMPLEMENTATIONS, PRESETS, ModelSpec, attention_flops_per_token, flops_per_token

NORMALIZATIONS = ("softmax", "sigmoid")  #: how logits become weights (dwm.normalization)


def normalize_weights(
    logits: torch.Tensor, temperature: float = 1.0, uniform_mix: float = 0.0, normalization: str = "softmax"
) -> torch.Tensor:
    """Per-sample weights with mean 1 over the micro-batch (last dim), mixed with uniform by ``uniform_mix``.

    ``softmax``: B * softmax(z / T); one sample can take up to all of the micro-batch's weight.
    ``sigmoid``: keep-gates g = sigmoid(z / T), renormalized: B * g / sum(g). A sample is dropped by its own gate
    going to 0, but raised above the others only by as much as they are dropped (a kept sample's gate saturates
    at 1): the shape of the oracle filter (corrupted 0, the rest equal), not that of a sharpened softmax."""
    B = logits.shape[-1]
    if normalization == "sigmoid":
        g = torch.sigmoid(logits / temperature)
        w = B * g / g.sum(-1, keepdim=True).clamp_min(1e-30)
    else:
        w = B * torch.softmax(logits / temperature, dim=-1)
    return (1.0 - uniform_mix) * w + uniform_mix


def log_weight_spread(w: torch.Tensor) -> torch.Tensor:
    """Variance of log-weights over the micro-batch [B]: 0 when uniform, unbounded as weights collapse."""
    lw = w.clamp_min(1e-30).log()
    return (lw - lw.mean()).pow(2).mean()


def oracle_weights(keep: torch.Tensor) -> torch.Tensor:
    """The best a per-sample weighting can do on labelled data: 0 for dropped samples, the kept ones
    renormalized to mean 1 over the micro-batch (all zero if every sample is dropped)."""
    keep = keep.float()
    return keep * keep.shape[-1] / keep.sum().clamp_min(1.0)


def weight_stats_tensor(w: torch.Tensor) -> torch.Tensor:
    """[entropy (nats; log B is uniform), effective sample size, min, max] of one micro-batch's weights, on
    w's device with no host synchronisation (all zeros when the oracle drops a whole micro-batch)."""
    w = w.detach().float()
    total = w.sum()
    p = w / total.clamp_min(1e-30)
    ent = -(p * p.clamp_min(1e-30).log()).sum()
    ess = total**2 / (w * w).sum().clamp_min(1e-30)
    out = torch.stack([ent, ess, w.min(), w.max()])
    return torch.where(total > 0, out, torch.zeros_like(out))


def weight_stats(w: torch.Tensor) -> dict[str, float]:
    """``weight_stats_tensor`` as numbers."""
    return dict(zip(("entropy", "ess", "min", "max"), weight_stats_tensor(w).tolist()))


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

    @classmethod
    def from_config(cls, cfg, vocab_size: int):
        """The DWM of a run (``cfg`` is the whole config tree); the vocabulary is the LM's."""
        from dwmtrain.models.spec import lm_spec

        d = cfg.dwm
        lm = lm_spec(cfg.model) if d.backbone == "lm" else None
        return cls(
            backbone=lm.name if lm else d.backbone,
            backbone_config=lm.config_json if lm else "",
            vocab_size=vocab_size,
            max_seq_len=cfg.model.max_seq_len or cfg.data.seq_len,
            attn_heads=d.attn_heads,
            head_hidden=d.head_hidden,
            pooling=d.pooling,
            temperature=d.temperature,
            uniform_mix=d.uniform_mix,
            attn_implementation=cfg.model.attn_implementation,
            normalization=d.normalization,
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
        d["backbone"] = self.backbone if not self.backbone_config else "(its own config)"
        return d


class DataWeightingModel(nn.Module):
    """Backbone embeds each sample; attention across the micro-batch; two linears -> weights."""

    def __init__(self, arch: DWMArch):
        super().__init__()
        self.arch = arch
        cfg = arch.backbone_spec().hf_config(arch.attn_implementation)
        self.backbone = dtype_preserving_norms(MODEL_MAPPING[type(cfg)](cfg))
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
        # A fresh head scores every sample 0 -> exactly uniform weights (stage 1 is uniform).
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> [B, H] pooled final hidden states."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.arch.pooling == "last":
            if attention_mask is None:
                return h[:, -1]
            last = attention_mask.sum(1) - 1
            return h[torch.arange(h.shape[0], device=h.device), last]
        if attention_mask is None:
            return h.mean(1)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def score(self, emb: torch.Tensor) -> torch.Tensor:
        """[B, H] -> logits [B]; permutation-equivariant in the B samples."""
        mu = emb.mean(0, keepdim=True)
        sd = emb.var(0, unbiased=False, keepdim=True).add(1e-5).sqrt()
        x = ((emb - mu) / sd * self.in_scale + self.in_bias).unsqueeze(0)  # [1, B, H]: samples as a "sequence"
        a, _ = self.attn(x, x, x, need_weights=False)
        h = self.norm(x + a)
        return self.fc2(F.gelu(self.fc1(h))).squeeze(-1).squeeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] -> weights [B] with mean 1."""
        logits = self.score(self.embed(input_ids, attention_mask))
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return normalize_weights(logits, self.arch.temperature, self.arch.uniform_mix, self.arch.normalization)

    def init_backbone_from(self, lm_state: dict[str, torch.Tensor]) -> None:
        """Copy an LM's transformer (``model.*`` of a LlamaForCausalLM state dict) into the backbone."""
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


# ----------------------------------------------------------------------------- files


class DWMFileError(DWMTrainError, ValueError):
    """A DWM file is missing, corrupted or of another architecture."""


def meta_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


FORMAT = "dwmtrain-dwm-v2"
_SIGNED_KEY = "dwmtrain"  # the safetensors header entry holding the metadata (covered by the file's sha256)
POOLINGS = ("mean", "last")  #: how token states become one embedding per sample (dwm.pooling)


def save_dwm(model: DataWeightingModel, path: str | os.PathLike, stage: int, lm_step: int, **extra) -> dict:
    """Write ``path`` (safetensors) and ``path.json`` atomically; returns the metadata.

    The fields that decide the weights (architecture, stage, LM step) are written twice: readable in the JSON
    sidecar, and inside the safetensors header, which the sidecar's sha256 covers, so an edit to the
    sidecar (a temperature, a pooling) is caught on load.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    signed = {"format": FORMAT, "arch": asdict(model.arch), "stage": stage, "lm_step": lm_step}
    meta = {**signed, "num_parameters": sum(v.numel() for v in state.values()), **extra}
    # what changes the weights is signed; the rest (timings, paths) is information, so the same fit gives the
    # same sha256 in any run directory
    # one header entry: safetensors writes several in no fixed order, and the sha256 must be reproducible
    with atomic_file(path) as tmp:  # tensors first, metadata last: the sidecar marks the file complete
        save_file(state, str(tmp), metadata={_SIGNED_KEY: json.dumps(signed, sort_keys=True)})
        meta["sha256"] = sha256_file(tmp)
    fault_point("dwm-tensors-written", stage=stage)
    atomic_write_text(meta_path(path), json.dumps(meta, indent=1))
    return meta


def read_dwm_meta(path: str | os.PathLike) -> dict:
    mp = meta_path(path)
    if not Path(path).is_file():
        raise DWMFileError(f"DWM file {path}: not found")
    try:
        meta = json.loads(mp.read_text())
    except FileNotFoundError:
        raise DWMFileError(f"DWM file {path}: metadata {mp} missing (incomplete write?)") from None
    except json.JSONDecodeError as e:
        raise DWMFileError(f"DWM metadata {mp}:{e.lineno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DWMFileError(f"DWM metadata {mp}: cannot be read ({e})") from None
    if not isinstance(meta, dict):
        raise DWMFileError(f"DWM metadata {mp}: expected a JSON object, got {type(meta).__name__}")
    return meta


def arch_from_meta(arch: object, where: str) -> DWMArch:
    """A DWMArch from a metadata ``arch`` object, every field checked; DWMFileError names the field."""
    if not isinstance(arch, dict):
        raise DWMFileError(f"{where}: field 'arch' {'missing' if arch is None else 'must be an object'}")
    unknown = sorted(set(arch) - {f.name for f in fields(DWMArch)})
    if unknown:
        raise DWMFileError(f"{where}: field arch.{unknown[0]} is not a DWM setting (written by a newer dwmtrain?)")
    missing = [k for k in ("backbone", "vocab_size", "max_seq_len") if k not in arch]
    if missing:
        raise DWMFileError(f"{where}: field arch.{missing[0]} missing")

    def bad(k, why):
        return DWMFileError(f"{where}: field arch.{k}={arch[k]!r}: {why}")

    for k in ("vocab_size", "max_seq_len", "attn_heads", "head_hidden"):
        if k in arch and (type(arch[k]) is not int or arch[k] < (0 if k == "head_hidden" else 1)):
            raise bad(k, "must be a " + ("non-negative" if k == "head_hidden" else "positive") + " integer")
    for k in ("temperature", "uniform_mix"):
        if k in arch and (type(arch[k]) not in (int, float) or arch[k] != arch[k]):
            raise bad(k, "must be a number")
    if arch.get("backbone_config"):
        try:
            ModelSpec.from_fields(arch["backbone"], json.loads(arch["backbone_config"]))
        except (ConfigError, json.JSONDecodeError, TypeError, KeyError) as e:
            raise bad("backbone_config", f"not a supported model config ({e})") from None
    elif arch["backbone"] not in PRESETS:
        raise bad("backbone", f"not one of the presets {sorted(PRESETS)}")
    if arch.get("pooling", "mean") not in POOLINGS:
        raise bad("pooling", f"must be one of {POOLINGS}")
    if arch.get("normalization", "softmax") not in NORMALIZATIONS:
        raise bad("normalization", f"must be one of {NORMALIZATIONS}")
    if arch.get("attn_implementation", "sdpa") not in ATTN_IMPLEMENTATIONS:
        raise bad("attn_implementation", f"must be one of {ATTN_IMPLEMENTATIONS}")
    if arch.get("temperature", 1.0) <= 0:
        raise bad("temperature", "must be > 0")
    if not 0 <= arch.get("uniform_mix", 0.0) <= 1:  # as dwm.uniform_mix allows (1: exactly uniform)
        raise bad("uniform_mix", "must be in [0, 1]")
    a = DWMArch(**arch)
    if a.backbone_spec().hidden_size % a.attn_heads:
        raise bad("attn_heads", f"must divide the {a.backbone} backbone's hidden size")
    return a


def arch_mismatch(file: DWMArch, run: DWMArch) -> list[str]:
    """Where a DWM file's architecture differs from the run's in a way its tensors cannot absorb."""
    a, b = file.shape_fields(), run.shape_fields()
    out = [f"{k}: file has {a[k]!r}, run expects {b[k]!r}" for k in a if a[k] != b[k] and k != "backbone_config"]
    fa, fb = json.loads(a["backbone_config"]), json.loads(b["backbone_config"])
    out += [f"backbone {k}: file has {fa.get(k)!r}, run expects {fb.get(k)!r}"
            for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]  # fmt: skip
    return out


def _signed_meta(path: Path) -> dict | None:
    """The metadata held in the safetensors header (None for a v1 file, which has only the sidecar)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if _SIGNED_KEY not in header:
        return None
    return json.loads(header[_SIGNED_KEY])


def load_dwm_state(
    path: str | os.PathLike, expect: DWMArch | None = None
) -> tuple[DWMArch, dict[str, torch.Tensor], dict]:
    """Verify sha256, the metadata and the architecture, then read the tensors (safetensors: no pickle).

    Every way a DWM file can be wrong is a ``DWMFileError`` naming the file (and the field)."""
    try:
        return _load_dwm_state(Path(path), expect)
    except DWMFileError:
        raise
    except Exception as e:  # noqa: BLE001 - a file we cannot read is the file's fault, said as such
        raise DWMFileError(f"DWM file {path}: cannot be read ({type(e).__name__}: {e})") from None


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, object, object] | None:
    """(dotted field, a's value, b's value) of the first field where two metadata dicts differ, or None."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            if found := _first_difference(x, y, f"{prefix}{k}."):
                return found
        elif x != y:
            return f"{prefix}{k}", x, y
    return None


def _load_dwm_state(path: Path, expect: DWMArch | None):
    from safetensors.torch import load_file

    meta = read_dwm_meta(path)
    mp = meta_path(path)
    digest = sha256_file(path)
    if digest != meta.get("sha256"):
        raise DWMFileError(
            f"DWM file {path}: sha256 {digest[:12]}... does not match its metadata "
            f"({str(meta.get('sha256'))[:12]}...): corrupted or replaced"
        )
    signed = _signed_meta(path)
    if signed is not None:  # v2: the sidecar must say what the checksummed header says
        diff = _first_difference(signed, {k: meta.get(k) for k in signed})
        if diff:
            field, saved, now = diff
            raise DWMFileError(
                f"DWM metadata {mp}: field {field} is {now!r} but the DWM file was saved with {saved!r} "
                "(the sidecar was edited); restore it"
            )
    arch = arch_from_meta(meta.get("arch"), f"DWM metadata {mp}")
    if expect is not None and (diff := arch_mismatch(arch, expect)):
        raise DWMFileError(f"DWM file {path} has another architecture: " + "; ".join(diff))
    state = load_file(str(path))
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in DataWeightingModel(arch).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        k = next(k for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k))
        raise DWMFileError(
            f"DWM file {path}: tensor {k} is {got.get(k, 'missing')}, its metadata's architecture needs "
            f"{want.get(k, 'no such tensor')}"
        )
    return arch, state, meta


def check_dwm_tokenizer(meta: dict, path, tokenizer: str, tokenizer_sha: str) -> None:
    """Refuse a DWM fitted on data of another tokenizer than the run's (its ids would mean other text)."""
    want = meta.get("tokenizer_sha256")
    if want and tokenizer_sha and want != tokenizer_sha:
        raise DWMFileError(
            f"DWM file {path} was fitted with tokenizer {meta.get('tokenizer', '?')} (sha256 {want[:12]}...), this "
            f"run's is data.tokenizer={tokenizer} (sha256 {tokenizer_sha[:12]}...): the DWM and the LM must share one"
        )


def dwm_from_state(arch: DWMArch, state: dict[str, torch.Tensor]) -> DataWeightingModel:
    """A DWM of ``arch`` holding ``state`` (the one place a DWM is rebuilt from tensors)."""
    model = DataWeightingModel(arch)
    model.load_state_dict(state)
    return model


def load_dwm(path: str | os.PathLike, expect: DWMArch | None = None, **arch_overrides) -> DataWeightingModel:
    arch, state, _ = load_dwm_state(path, expect)
    if arch_overrides:
        arch = DWMArch(**{**asdict(arch), **arch_overrides})
    return dwm_from_state(arch, state)


def dwm_parameter_count(arch: DWMArch) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DataWeightingModel(arch).parameters())


def dwm_forward_flops_per_token(arch: DWMArch, seq: int, n_params: int = 0) -> float:
    """The DWM's forward FLOPs per scored token: its parameters' 2N and its backbone's attention at ``seq``
    tokens (``n_params``: its parameter count, when already known)."""
    n = n_params or dwm_parameter_count(arch)
    return flops_per_token(n, False) + attention_flops_per_token(arch.backbone_spec(), seq, False)
