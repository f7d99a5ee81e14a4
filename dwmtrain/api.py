"""The public API: a Data Weighting Model in any training loop (importable from ``dwmtrain``).

    dwm = DWM.load("stage2.safetensors", tokenizer="tokenizer/")   # verified: checksum, architecture, tokenizer
    w = dwm(input_ids)                                              # [B] weights, mean 1, no gradient
    loss, losses = weighted_lm_loss(model, input_ids, w)            # mean_i w_i L_i (chunk=N: no full logits)
    dwm = meta_update(model, micro_batches, reward, dwm=dwm, optimizer=opt, out="stage3.safetensors")

The pure loss math (``per_sample_loss``, ``weighted_loss``, ``fused_weighted_loss``) is ``models.loss``'s. The
meta-update is the run's own (``meta.update.fit``, ``calibrate``, ``boundary_v``) on the caller's inputs
(``meta.inputs``); files are the run's format (``checkpoint.dwm_file``), so a DWM moves between a dwmtrain run and
any other loop both ways. Every failure a caller can cause is a ``DWMTrainError`` naming the input (``DWMFileError``,
``DWMInputError``, ``ConfigError``); the CLI turns it into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import torch

from dwmtrain.checkpoint.dwm_file import check_dwm_micro_batch, check_dwm_tokenizer, load_dwm_state, save_dwm
from dwmtrain.config.schema import DWMConfig, MetaConfig
from dwmtrain.distributed import barrier, broadcast_tensors, run_on_rank0
from dwmtrain.errors import DWMInputError
from dwmtrain.meta import inputs as mi
from dwmtrain.models.dwm import DataWeightingModel, DWMArch, dwm_from_state, fresh_dwm
from dwmtrain.models.loss import fused_weighted_loss, per_sample_loss, per_sample_loss_chunked, weighted_loss

__all__ = ["DWM", "meta_update", "weighted_lm_loss", "per_sample_loss", "weighted_loss", "fused_weighted_loss",
           "tokenizer_identity", "TokenizerId"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TokenizerId:
    """Which tokenizer token ids are of: where it was loaded from, the sha256 of its files (what a DWM file records
    and is checked against), its vocabulary size (0: not known)."""

    path: str
    sha256: str
    vocab_size: int = 0


def tokenizer_identity(tokenizer) -> TokenizerId:
    """The identity of a tokenizer, its files read and hashed once: a path (a sentencepiece ``.model``, a
    ``tokenizer.json`` or its directory), a dwmtrain tokenizer, a Hugging Face tokenizer loaded from a local directory
    (its files identify it), or a ``TokenizerId`` as it is."""
    from dwmtrain.data.tokenizer import load_tokenizer

    if isinstance(tokenizer, TokenizerId):
        return tokenizer
    if hasattr(tokenizer, "sha256") and hasattr(tokenizer, "path"):
        return TokenizerId(str(tokenizer.path), tokenizer.sha256, getattr(tokenizer, "vocab_size", 0))
    path = tokenizer if isinstance(tokenizer, (str, os.PathLike)) else getattr(tokenizer, "name_or_path", None)
    if not path or not Path(path).exists():
        raise DWMInputError(
            f"tokenizer {path or type(tokenizer).__name__!r}: not a local file or directory; pass the directory the "
            "tokenizer was loaded from (its files identify it), e.g. AutoTokenizer.from_pretrained(DIR) or DIR"
        )
    tok = load_tokenizer(path)
    return TokenizerId(os.path.abspath(path), tok.sha256, tok.vocab_size)


class DWM:
    """A fitted Data Weighting Model, frozen: ``dwm(input_ids)`` -> per-sample weights [B] (mean 1) for one
    micro-batch, each sample weighed against the rest of its micro-batch. ``meta`` is its file's metadata (stage,
    LM step, tokenizer, the micro-batch it was fitted on)."""

    def __init__(self, model: DataWeightingModel, meta: dict | None = None, path: str | None = None):
        self.model = model.eval().requires_grad_(False)
        self.meta, self.path = dict(meta or {}), path

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer=None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> DWM:  # fmt: skip
        """A DWM file (``RUN_DIR/dwm/stageK.safetensors``, or one ``meta_update`` wrote), verified: its checksum,
        metadata and tensors; with ``tokenizer``, that it was fitted on ids of that tokenizer (``check_tokenizer``)."""
        arch, state, meta = load_dwm_state(path)
        dwm = cls(dwm_from_state(arch, state).to(device, dtype), meta, str(path))
        if tokenizer is not None:
            dwm.check_tokenizer(tokenizer)
        return dwm

    arch = property(lambda self: self.model.arch, doc="its architecture (``models.dwm.DWMArch``)")
    stage = property(lambda self: self.meta.get("stage"), doc="the stage it weighs (2: fitted at the first boundary)")
    micro_batch_size = property(
        lambda self: self.meta.get("micro_batch_size") or 0,
        doc="the micro-batch it was fitted on (0: not recorded); smaller ones are refused",
    )
    reads_lm = property(lambda self: self.model.reads_lm,
                        doc="whether it also needs the LM's forward of the batch: losses= and/or hidden=")  # fmt: skip

    @property
    def where(self) -> str:
        return f"DWM {self.path}" if self.path else f"DWM (stage {self.stage}, in memory)"

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse (``DWMFileError``) a tokenizer other than the one the DWM was fitted with, and one whose vocabulary
        does not fit the DWM's."""
        tok = tokenizer_identity(tokenizer)
        check_dwm_tokenizer(self.meta, self.path or self.where, tok.path, tok.sha256)
        if tok.vocab_size > self.arch.vocab_size:
            raise DWMInputError(f"tokenizer {tok.path}: {tok.vocab_size} tokens, {self.where} embeds "
                                f"{self.arch.vocab_size}")  # fmt: skip

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 losses: torch.Tensor | None = None, hidden: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Weights [B] (fp32, mean 1, no gradient, on ``input_ids``' device) for the micro-batch ``input_ids``
        [B, T]. A DWM that reads the LM's forward (``reads_lm``) also takes that forward's per-sample ``losses``
        [B] (dwm.loss_feature) and final hidden states ``hidden`` [B, T, H] (dwm.features=lm)."""
        x = self._checked(input_ids)
        dev = next(self.model.parameters()).device
        extra = {k: v.to(dev) for k, v in (("losses", losses), ("hidden", hidden)) if v is not None}
        with torch.inference_mode():
            try:
                w = self.model(x.to(dev), None if attention_mask is None else attention_mask.to(dev), **extra)
            except ValueError as e:  # what the DWM reads and was not given
                raise DWMInputError(f"{self.where}: {e}") from None
        return w.float().to(input_ids.device).clone()  # a normal tensor: a loss may save it for its backward

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        x = mi.checked_ids(x, self.arch.vocab_size, "input_ids", 2, self.where)
        check_dwm_micro_batch(self.meta, self.path or self.where, x.shape[0], "micro-batch size")
        return x

    def save(self, path: str | os.PathLike) -> dict:
        """Write it as a DWM file (safetensors + its signed sidecar, atomically) that ``DWM.load`` and a dwmtrain
        run (``meta.mode=fixed``, ``meta.init_dwm``) read; returns the metadata."""
        keep = {k: v for k, v in self.meta.items() if k not in ("format", "arch", "stage", "lm_step", "num_parameters",
                                                                   "sha256")}  # fmt: skip
        self.meta = save_dwm(self.model, path, stage=self.stage or 2, lm_step=self.meta.get("lm_step", 0), **keep)
        self.path = str(path)
        return self.meta


def weighted_lm_loss(
    model,
    input_ids: torch.Tensor,
    weights,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    chunk: int = 0,
    **model_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted objective mean_i w_i L_i of a Hugging Face causal LM (or its DDP wrapper) on one micro-batch,
    and the per-sample losses [B] (no gradient). ``weights``: a tensor [B], or a ``DWM`` (its weights of this
    batch; one that reads the LM's forward gets that forward's losses and states). ``labels`` default to the
    input ids (-100 where ``attention_mask`` is 0); position t predicts labels[t + 1]. ``chunk`` > 0: the LM head
    applied ``chunk`` tokens at a time (``fused_weighted_loss``), never the [B, T, V] logits. ``model_kwargs`` go to
    the model's forward (position_ids, ...)."""
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    rule = weights if isinstance(weights, DWM) else None
    if rule is None and not (isinstance(weights, torch.Tensor) and tuple(weights.shape) == (input_ids.shape[0],)):
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise DWMInputError(f"weights: expected a tensor [{input_ids.shape[0]}] (one per sample) or a DWM, got {got}")
    needs = rule is not None and rule.reads_lm
    kw = {**model_kwargs, **({"attention_mask": attention_mask} if attention_mask is not None else {})}
    if chunk:  # the final states through the wrapper (DDP's hooks see the forward), the head by ourselves
        out = model(input_ids=input_ids, output_hidden_states=True, logits_to_keep=1, **kw)
        hidden, head = out.hidden_states[-1], mi.unwrapped(model).get_output_embeddings().weight
        if rule is not None:
            losses = functools.partial(per_sample_loss_chunked, hidden.detach(), head.detach(), labels, chunk)
            weights = _weights_of(rule, input_ids, attention_mask, losses, hidden)
        return fused_weighted_loss(hidden, head, labels, weights.to(hidden.device), chunk)
    out = model(input_ids=input_ids, output_hidden_states=needs, **kw)
    losses = per_sample_loss(out.logits, labels)
    if rule is not None:
        weights = _weights_of(rule, input_ids, attention_mask, losses.detach, out.hidden_states[-1] if needs else None)
    return weighted_loss(losses, weights.to(losses.device)), losses.detach()


def _weights_of(dwm: DWM, x, mask, losses, hidden) -> torch.Tensor:
    """``dwm``'s weights of x, given what it reads of the LM's forward (``losses`` computed only when it does)."""
    extra = {}
    if dwm.arch.loss_feature:
        extra["losses"] = losses()
    if dwm.arch.features == "lm":
        extra["hidden"] = hidden.detach()
    return dwm(x, mask, **extra)


def _keeps_rng(fn):
    """``fn`` with the caller's global RNG (CPU and every GPU) as it was before: a DWM built (a fresh one seeded, any
    one initialized before its tensors are loaded) draws from it."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
            return fn(*args, **kwargs)

    return wrapped


@_keeps_rng
def meta_update(
    model,
    train_batches,
    reward,
    *,
    dwm: DWM | str | os.PathLike | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    meta: MetaConfig | None = None,
    settings: DWMConfig | None = None,
    lookahead_lr: float = 0.0,
    tokenizer=None,
    out: str | os.PathLike | None = None,
    stage: int | None = None,
    lm_step: int = 0,
    seed: int = 0,
) -> DWM:
    """Fit a DWM by the bi-level objective on a frozen LM, from the caller's own loop; the run's meta job's math.

    ``model``: a causal LM of a supported architecture (a ``PreTrainedModel``, or its DDP wrapper), or a Hugging Face
    checkpoint directory (safetensors). ``train_batches``: training micro-batches ([B, T] token ids or batch dicts
    of packed sequences), one per meta-step (a re-iterable is read again when it runs out). ``reward``: the reward
    set R is measured on (ids [N, T], or examples with labels): the target the DWM learns to serve; never the data a
    result is reported on. ``dwm``: the previous stage's DWM to continue (None: a fresh one of ``settings``, its
    backbone copied from the LM). ``optimizer``: the LM's AdamW, for meta.lookahead=adam and, unless
    ``meta.lookahead_lr`` or ``lookahead_lr`` is given, the lookahead's step size (its current learning rate).
    ``meta``: the meta-update's settings (``config.MetaConfig``: steps, lr, grad_mode, val_batch_size, ...).
    ``tokenizer``: recorded in the DWM (and a continued DWM is checked against it). ``out``: written there (by rank 0
    of a process group). Collective in a torch.distributed process group: every process passes its own share of
    micro-batches and gets the same DWM."""
    mc = meta or MetaConfig()
    if mc.strength:
        raise DWMInputError("meta.strength: its rollouts take a run's real optimizer steps; not in meta_update")
    lm, spec = mi.lm_of(model)
    params_dev = next(lm.parameters()).device
    d = mi.process_dist(params_dev)

    def inputs():  # every micro-batch the meta-steps take, read and checked before any collective
        tok = tokenizer_identity(tokenizer) if tokenizer is not None else None
        prev = DWM.load(dwm) if isinstance(dwm, (str, os.PathLike)) else dwm
        xs = mi.TrainStream(train_batches, spec.vocab_size).take(mc.steps + mc.calibrate_batches)
        batches = mi.CallerBatches(iter(xs), mi.RewardSet(reward, spec.vocab_size), mc.val_batch_size, d)
        start, how = _start(prev, lm, spec, settings or DWMConfig(), xs[0].shape[1], seed, tok)
        return tok, prev, batches, start.to(params_dev), how, _alpha(mc, lookahead_lr, optimizer), xs[0]

    tok, dwm, batches, start, how, alpha, first = mi.on_every_rank(inputs, d)
    with mi.frozen(lm):
        fitted, info = _fit(start, lm, batches, mc, alpha, optimizer)
    state = broadcast_tensors(fitted.state_dict() if d.is_main else None, params_dev)  # one DWM on every process
    result = DWM(dwm_from_state(fitted.arch, state).to(params_dev), dict(
        stage=stage or ((dwm.stage or 1) + 1 if dwm is not None else 2), lm_step=lm_step, arch=dataclasses.asdict(
            fitted.arch), micro_batch_size=first.shape[0], started_from=how, world_size=d.world,
        **({"tokenizer": tok.path, "tokenizer_sha256": tok.sha256} if tok else {}), **info))  # fmt: skip
    if out is not None:
        run_on_rank0(lambda: _save(result, out))  # a failure is every process's error at once
        result.path = str(out)
    barrier()
    return result


def _save(dwm: DWM, out) -> None:
    try:
        dwm.save(out)
    except OSError as e:
        raise DWMInputError(f"out={out}: cannot be written ({e})") from None


def _alpha(mc: MetaConfig, lookahead_lr: float, optimizer) -> float:
    """The lookahead's step size: meta.lookahead_lr, else the caller's, else the optimizer's learning rate now."""
    lr = float(getattr(optimizer, "optimizer", optimizer).param_groups[0]["lr"]) if optimizer is not None else 0.0
    if not (alpha := mc.lookahead_lr or lookahead_lr or lr):
        raise DWMInputError("lookahead_lr: give it (the LM's learning rate now), meta.lookahead_lr or the optimizer")
    return alpha


def _start(prev: DWM | None, lm, spec, settings: DWMConfig, seq_len: int, seed: int, tok) -> tuple:
    """The DWM the meta-steps start from: a copy of ``prev``, checked against the LM's vocabulary
    (and tokenizer), or a fresh one of ``settings`` for this LM."""
    if prev is None:
        if settings.backbone not in ("lm", "auto") and settings.features != "lm":
            raise DWMInputError(f"settings.backbone={settings.backbone!r}: meta_update builds the DWM's backbone from "
                                "the LM (backbone lm), or none (features lm)")  # fmt: skip
        arch = DWMArch.of(dataclasses.replace(settings, backbone="lm"), spec, spec.vocab_size, seq_len)
        state = lm.state_dict() if settings.init_backbone_from_lm else None
        return fresh_dwm(arch, seed, state)
    if tok is not None and prev.meta.get("tokenizer_sha256"):
        check_dwm_tokenizer(prev.meta, prev.path or prev.where, tok.path, tok.sha256)
    if prev.arch.vocab_size != spec.vocab_size:
        raise DWMInputError(f"dwm: {prev.where} embeds {prev.arch.vocab_size} token ids, the LM's vocabulary is "
                            f"{spec.vocab_size}")  # fmt: skip
    if prev.arch.features == "lm" and prev.arch.backbone_spec().hidden_size != spec.hidden_size:
        raise DWMInputError(f"dwm: {prev.where} reads hidden states of width {prev.arch.backbone_spec().hidden_size}, "
                            f"the LM's are {spec.hidden_size}")  # fmt: skip
    copy = dwm_from_state(prev.arch, {k: v.detach().clone() for k, v in prev.model.state_dict().items()})
    return copy, f"continued from {prev.where}"


def _fit(dwm: DataWeightingModel, lm, batches, mc: MetaConfig, alpha: float, optimizer) -> tuple:
    """The run's meta-steps and calibration (``meta.update.fit_dwm``): the fitted DWM and what to record."""
    from dwmtrain.meta.metagrad import lm_params
    from dwmtrain.meta.update import Lookahead, boundary_v, fit_dwm, resolved_fd_eps

    params = lm_params(lm)  # what the optimizer moves: frozen parameters stay theta
    mc = resolved_fd_eps(mc, params)
    look = Lookahead(alpha)
    if mc.lookahead == "adam":
        if optimizer is None:
            raise DWMInputError("optimizer: meta.lookahead=adam needs the LM's AdamW (its moments)")
        look = dataclasses.replace(look, adam=mi.adam_moments(optimizer, lm))
    if mc.v == "boundary":
        look = dataclasses.replace(look, v=boundary_v(lm, params, batches)[0])
    info = dict(meta_steps=mc.steps, grad_mode=mc.grad_mode, lookahead=mc.lookahead, lookahead_lr=alpha)
    info.update(fit_dwm(dwm.eval(), lm, params, batches, look, mc, None))
    return dwm, info
