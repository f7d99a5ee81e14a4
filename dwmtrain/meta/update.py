"""The meta-update job's body: fit the DWM for stage k on the frozen LM from the boundary checkpoint.

One process per GPU (or CPU process); each meta-step is data-parallel: every rank draws its own
training micro-batch and validation batch, and the DWM gradients are all-reduced (NCCL / gloo).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from dwmtrain.checkpoint import RunState, consolidated_lm_state
from dwmtrain.checkpoint.dwm_file import load_dwm_state, save_dwm
from dwmtrain.checkpoint.universal import convert_to_universal, read_adam_state
from dwmtrain.config import Config, resolve_precision
from dwmtrain.data.dataset import rank_micro_batches
from dwmtrain.data.mixture import current_segment, open_training_data
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.data.validation import REWARD, open_validation
from dwmtrain.distributed import Dist, all_reduce_, all_reduce_grads, barrier, run_on_rank0
from dwmtrain.errors import CheckpointError, ResumeError
from dwmtrain.faults import fault_point
from dwmtrain.lr_schedule import scheduled_lr
from dwmtrain.meta.metagrad import (
    AdamMoments,
    default_fd_eps,
    dwm_surrogate,
    forward_reads,
    lm_params,
    meta_gradient,
    reward_gradient,
)
from dwmtrain.meta.rollout import RealStep, choose_strength
from dwmtrain.models.dwm import DWMArch, dwm_from_state, fresh_dwm
from dwmtrain.models.lm import build_lm, enable_activation_checkpointing, load_lm_state
from dwmtrain.models.spec import lm_spec
from dwmtrain.models.weights import log_weight_spread, weight_stats
from dwmtrain.rundir import RunDir, dwm_source

log = logging.getLogger(__name__)


def lookahead_lr(cfg: Config, scheduler_steps: int) -> float:
    """alpha of the lookahead theta* = theta - alpha sum_i w_i grad L_i: ``meta.lookahead_lr``, or the LM's
    scheduled learning rate at the boundary step (the one place alpha is decided, for every launch)."""
    return cfg.meta.lookahead_lr or scheduled_lr(cfg, scheduler_steps)


def checkpoint_lm(cfg: Config, rd: RunDir, tag: str, attn: str = "sdpa"):
    """The run's LM holding checkpoint ``tag``'s consolidated fp32 weights, and that state (CheckpointError when they
    do not fit the run's model)."""
    lm = build_lm(lm_spec(cfg.model), attn)
    state = consolidated_lm_state(rd, tag)
    if bad := load_lm_state(lm, state):
        raise CheckpointError(f"checkpoint {rd.checkpoint(tag)}: its weights do not fit the run's model: {bad[:3]}")
    return lm, state


def load_frozen_lm(cfg: Config, rd: RunDir, tag: str, d: Dist, attn: str):
    """The LM of checkpoint ``tag``, frozen: its consolidated fp32 weights (written at stage boundaries by
    rank 0, so no other node's shards and no optimizer state are read), else DeepSpeed's zero_to_fp32; held in
    ``meta.lm_dtype``. Its losses skip the full logits (``model.loss_chunk_tokens``; 0: the full-logits path), and
    ``model.activation_checkpointing`` recomputes its layers in the lookahead's backward (fd and per_sample)."""
    lm, state = checkpoint_lm(cfg, rd, tag, attn)
    dtype = torch.float32
    if cfg.meta.lm_dtype == "train":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            resolve_precision(cfg.deepspeed.precision, d.accelerator), torch.float32
        )
    lm.loss_chunk_tokens = cfg.model.loss_chunk_tokens
    lm = lm.to(d.device, dtype).eval().requires_grad_(False)
    if cfg.meta.grad_mode in ("fd", "per_sample") and enable_activation_checkpointing(
        lm, cfg.model.activation_checkpointing
    ):
        lm.train()  # Hugging Face recomputes only in training mode: no dropout may make its passes random
        for m in lm.modules():
            if isinstance(getattr(m, "attention_dropout", None), float):
                m.attention_dropout = 0.0
    return lm, state


def checkpoint_moments(rd: RunDir, tag: str, params: dict) -> AdamMoments:
    """AdamW's state in checkpoint ``tag`` for the LM's ``params`` (meta.lookahead=adam), on their device, in fp32:
    rank 0 converts the ZeRO shards with DeepSpeed's ds_to_universal (unless a universal copy is there already),
    every rank reads it (a shared filesystem, as the LM's weights), and a copy made here is removed after.
    Collective."""
    uni = rd.universal(tag)
    made = not run_on_rank0(uni.is_dir)
    if made and (err := run_on_rank0(lambda: convert_to_universal(rd.checkpoint(tag), uni))):
        raise CheckpointError(f"meta.lookahead=adam needs the checkpoint's optimizer state: {err}")
    try:
        st = read_adam_state(uni, {k: tuple(t.shape) for k, t in params.items()})
    except ResumeError as e:
        raise CheckpointError(f"meta.lookahead=adam: {e}") from None
    finally:
        barrier()
        if made:
            run_on_rank0(lambda: _remove(uni))
    dev = next(iter(params.values())).device
    return AdamMoments(
        exp_avg={k: t.to(dev) for k, t in st["exp_avg"].items()},
        exp_avg_sq={k: t.to(dev) for k, t in st["exp_avg_sq"].items()},
        step=st["step"], betas=st["betas"], eps=st["eps"], weight_decay=st["weight_decay"],
    )  # fmt: skip


def _remove(uni: Path) -> None:
    """A universal copy and, if that was all it held, its parent folder (with the pointer ds_to_universal leaves)."""
    shutil.rmtree(uni, ignore_errors=True)
    with contextlib.suppress(OSError):
        if {p.name for p in uni.parent.iterdir()} <= {"latest_universal"}:
            (uni.parent / "latest_universal").unlink(missing_ok=True)
            uni.parent.rmdir()


def initial_dwm(cfg: Config, arch: DWMArch, stage: int, rd: RunDir, lm_state: dict) -> tuple:
    """The previous stage's DWM (at stage 2: ``meta.init_dwm``'s, the warm start, if given; with
    ``dwm.refresh_backbone`` its backbone copied again from this LM), or a fresh one (backbone copied from the LM,
    as the paper does)."""
    prev = rd.dwm(stage - 1) if stage > 2 else dwm_source(cfg.meta.init_dwm) if cfg.meta.init_dwm else None
    if prev is not None and prev.exists():
        _, state, _ = load_dwm_state(prev, arch)
        m = dwm_from_state(arch, state)
        if cfg.dwm.refresh_backbone:
            m.init_backbone_from(lm_state)
            return m, f"continued from {prev}, backbone refreshed from the LM"
        return m, f"continued from {prev}"
    return fresh_dwm(arch, cfg.run.seed, lm_state if cfg.dwm.init_backbone_from_lm else None)


@dataclasses.dataclass(frozen=True)
class Lookahead:
    """What every meta-step's lookahead starts from besides theta: its step size alpha, the boundary's v
    (meta.v=boundary; None: each step's own), AdamW's moments (meta.lookahead=adam; None: the SGD lookahead)."""

    alpha: float
    v: dict | None = None
    adam: AdamMoments | None = None


def meta_step(dwm, opt, lm, params, x: torch.Tensor, vb: dict, look: Lookahead, mc, log_before: bool = True) -> dict:
    """One Adam step of the DWM on dR/dw at (x, vb), or at x with the boundary's v (meta.v=boundary);
    gradients averaged over ranks. Returns the record (with R(theta), the validation loss before the lookahead,
    only when ``log_before``; R(theta*) only where a lookahead was taken)."""
    reads = lm_reads(dwm, lm, params, x)
    with torch.no_grad():  # the LM's passes first, without the DWM's graph alive beside them
        w0 = dwm(x, **reads)
    g = meta_gradient(lm, params, x, vb, w0, look.alpha, mc.grad_mode, mc.fd_eps, log_before, look.v, look.adam)
    w = dwm(x, **reads)  # [B], differentiable in the DWM parameters: the same values as w0
    trainable = [p for group in opt.param_groups for p in group["params"]]
    opt.zero_grad(set_to_none=False)
    dR = g.dR_dw
    if mc.normalize_grad:  # per micro-batch: the mean does not change the gradient (sum w = B), the scale does
        dR = (dR - dR.mean()) / dR.std(unbiased=False).clamp_min(1e-20)
    objective = dwm_surrogate(w, dR) / w.shape[0] if mc.normalize_grad else dwm_surrogate(w, dR)
    if mc.spread_penalty:  # collapse guard: a quadratic price on the spread of log-weights; unlike an entropy or
        # KL(w||uniform) term its gradient does not vanish as the softmax saturates (until fp32 underflows w to 0)
        objective = objective + mc.spread_penalty * log_weight_spread(w)
    objective.backward()
    gnorm = all_reduce_grads(trainable)
    opt.step()
    s = weight_stats(w)
    before = float("nan") if g.val_before is None else g.val_before  # every rank computes it, or none
    after = float("nan") if g.val_after is None else g.val_after  # the same on every rank
    diag = torch.tensor([before, after, s["entropy"], s["ess"]], dtype=torch.float64)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    all_reduce_(diag).div_(world)
    return {
        **({"val_loss_theta": diag[0].item()} if log_before else {}),
        **({"val_loss_theta_star": diag[1].item()} if g.val_after is not None else {}),
        "weight_entropy": diag[2].item(),
        "weight_ess": diag[3].item(),
        "w_min": s["min"],
        "w_max": s["max"],
        "grad_norm": gnorm,
    }


def agreement(z: torch.Tensor, dR_dw: torch.Tensor) -> float:
    """Pearson correlation over one micro-batch between the DWM's logits and -dR/dw (1: the DWM ranks samples as
    the meta-gradient would; 0: unrelated)."""
    a, b = z - z.mean(), -(dR_dw - dR_dw.mean())
    den = (a.norm() * b.norm()).item()
    return (a * b).sum().item() / den if den > 0 else 0.0


@torch.no_grad()
def lm_reads(dwm, lm, params, x: torch.Tensor) -> dict:
    """What the DWM reads of the frozen LM's forward of x besides the tokens, as ``dwm``'s keyword arguments: the
    per-sample losses (dwm.loss_feature), the final hidden states (dwm.features=lm); the trainer's forward computes
    the same at the same parameters. {} for the paper's DWM."""
    if not dwm.reads_lm:
        return {}
    losses, hidden = forward_reads(lm, params, x)
    out = {"losses": losses.float()} if dwm.arch.loss_feature else {}
    return {**out, "hidden": hidden} if dwm.arch.features == "lm" else out


@torch.no_grad()
def _logits(dwm, x: torch.Tensor, reads: dict) -> torch.Tensor:
    return dwm.score(dwm.embed(x, hidden=reads.get("hidden")), reads.get("losses")).float()


def calibrate(dwm, lm, params, batches, look: Lookahead, mc) -> dict:
    """Shrink the fitted DWM toward uniform by how well it agrees with the meta-gradient on micro-batches it was
    not fitted on: logits *= clip(rho / meta.calibrate_rho, 0, 1). Early in training, when the DWM's ranking does
    not generalize, its weights would only add variance to the LM's gradient. Collective (rho averaged)."""
    rhos = []
    for x, vb in batches:
        reads = lm_reads(dwm, lm, params, x)
        w = dwm(x, **reads).detach()
        g = meta_gradient(lm, params, x, vb, w, look.alpha, mc.grad_mode, mc.fd_eps, False, look.v, look.adam)
        rhos.append(agreement(_logits(dwm, x, reads), g.dR_dw.float()))
    t = torch.tensor([sum(rhos), len(rhos)], dtype=torch.float64)
    all_reduce_(t)
    rho = (t[0] / t[1]).item()
    scale = min(max(rho / mc.calibrate_rho, 0.0), 1.0)
    with torch.no_grad():
        dwm.fc2.weight.mul_(scale)
        dwm.fc2.bias.mul_(scale)
    return {"held_out_agreement": rho, "logit_scale": scale, "batches": int(t[1].item())}


def boundary_v(lm, params, batches: MetaBatches) -> tuple[dict, tuple[float, float]]:
    """v = grad R(theta) over every example of the reward part once (meta.v=boundary), each rank its share (every
    world-th example), summed over ranks; and (R(theta), examples). Collective."""
    val, bs, d = batches.val, batches.val_batch_size, batches.d
    mine = list(range(d.rank, val.n, d.world))
    chunks = ({k: t.to(d.device) for k, t in vb.items()} for vb in val.chunked(mine, bs))
    v, tot = reward_gradient(lm, params, chunks)
    for t in v.values():
        all_reduce_(t)
    all_reduce_(tot)
    n = tot[1].item()  # v back in the LM's dtype, as the step mode's v is
    return {k: t.div_(n).to(params[k].dtype) for k, t in v.items()}, (tot[0].item() / n, n)


APPLIED_CHECK_BATCHES = 4  #: micro-batches the fitted weights are recorded on, for the trainer to reproduce


class MetaBatches:
    """The meta job's data: training micro-batches from the run's current position in its data stream, and each
    rank's k-th batch of the validation source's reward part (never an example validation reports on)."""

    def __init__(self, cfg: Config, d: Dist, rd: RunDir, consumed_samples: int):
        self.data = open_training_data(cfg.data, lm_spec(cfg.model).vocab_size)
        self.val = open_validation(cfg, rd, REWARD)
        order = self.data.order(cfg.run.seed, current_segment(rd.data_mixture) if cfg.data.sources else None)
        self.stream = rank_micro_batches(order, consumed_samples, d.rank, d.world, cfg.deepspeed.micro_batch_size)
        self.d, self.val_batch_size = d, cfg.meta.val_batch_size

    @torch.no_grad()
    def fitted_weights(self, dwm, n: int, lm, params) -> dict:
        """The fitted DWM's fp32 weights of this rank's next ``n`` training micro-batches, their dataset indices (and
        for a DWM that reads the LM's forward, the LM's losses and pooled hidden states it weighed by): the trainer
        recomputes them in its own dtype at the boundary (``stages.boundary``)."""
        out: dict = {"indices": [next(self.stream)[1] for _ in range(n)], "weights": []}
        for i in out["indices"]:
            x = self.data.batch(i).to(self.d.device)
            reads = lm_reads(dwm, lm, params, x)
            out["weights"].append(dwm(x, **reads).float().tolist())
            if "losses" in reads:
                out.setdefault("losses", []).append(reads["losses"].tolist())
            if "hidden" in reads:  # pooled: the trainer's head gets the same [B, H] features
                out.setdefault("features", []).append(dwm.embed(x, hidden=reads["hidden"]).float().tolist())
        return out

    def __call__(self, k: int) -> tuple[torch.Tensor, dict]:
        """The next training micro-batch of the stream and the k-th validation batch of this rank."""
        d, bs = self.d, self.val_batch_size
        vb = next(self.val.batches(1, bs, d.rank, d.world, k * d.world * bs))
        return self.data.batch(next(self.stream)[1]).to(d.device), {n: t.to(d.device) for n, t in vb.items()}


def resolved_fd_eps(mc, params: dict):
    """``mc`` (the meta section) with fd's perturbation decided once for these frozen parameters (meta.fd_eps=0:
    ``default_fd_eps``)."""
    if mc.grad_mode == "fd" and not mc.fd_eps:
        return dataclasses.replace(mc, fd_eps=default_fd_eps(params))
    return mc


def fit_dwm(dwm, lm, params, batches, look: Lookahead, mc, records: Path | None) -> dict:
    """Fit ``dwm`` (in eval mode) on the frozen LM: ``mc.steps`` Adam meta-steps (its backbone trained as
    meta.backbone_trainable), then with meta.calibrate_batches its calibration on the micro-batches after the fitted
    ones (and the validation batches after theirs). ``batches``: a run's ``MetaBatches`` or a caller's
    (``meta.inputs.CallerBatches``). Returns the calibration's record ({} without). Collective."""
    if dwm.backbone is not None:
        dwm.backbone.requires_grad_(mc.backbone_trainable)
    opt = torch.optim.Adam([p for p in dwm.parameters() if p.requires_grad], lr=mc.lr)
    fit(dwm, opt, lm, params, batches, look, mc, records)
    if not mc.calibrate_batches:
        return {}
    return calibrate(dwm, lm, params, [batches(mc.steps + j) for j in range(mc.calibrate_batches)], look, mc)


def fit(dwm, opt, lm, params, batches: MetaBatches, look: Lookahead, mc, records: Path | None) -> None:
    """``mc.steps`` meta-steps; rank 0 (``records`` set) appends each one's record to ``records``."""
    for k in range(mc.steps):
        fault_point("meta-step", rank=batches.d.rank, step=k + 1)
        t0 = time.time()
        x, vb = batches(k)
        log_before = k in (0, mc.steps - 1) or (k + 1) % mc.log_every == 0
        rec = {"meta_step": k + 1, **meta_step(dwm, opt, lm, params, x, vb, look, mc, log_before)}
        rec["step_time_s"] = time.time() - t0
        if records is not None:
            with open(records, "a") as f:
                f.write(json.dumps(rec) + "\n")


def lookahead_inputs(cfg: Config, rd: RunDir, tag: str, lm, params, batches: MetaBatches, alpha: float,
                     timings: dict) -> Lookahead:  # fmt: skip
    """What every meta-step's lookahead starts from: alpha, AdamW's moments (meta.lookahead=adam) and the boundary's
    v (meta.v=boundary); their times into ``timings``. Collective."""
    look = Lookahead(alpha)
    if cfg.meta.lookahead == "adam":
        t_m = time.time()
        look = dataclasses.replace(look, adam=checkpoint_moments(rd, tag, params))
        timings["load_moments_s"] = time.time() - t_m
    if cfg.meta.v == "boundary":
        t_v = time.time()
        v, reward = boundary_v(lm, params, batches)
        look = dataclasses.replace(look, v=v)
        timings["reward_gradient_s"] = time.time() - t_v
        if batches.d.is_main:
            log.info(f"v over the whole reward part ({reward[1]:.0f} examples, R(theta) {reward[0]:.4f}) in "
                     f"{timings['reward_gradient_s']:.1f} s")  # fmt: skip
    return look


def set_strength(cfg: Config, dwm, lm, params, batches: MetaBatches, step: RealStep) -> dict:
    """meta.strength: rank 0 picks the DWM's logit scale (``meta.rollout.choose_strength``) by rollouts of ``step``
    over the next meta.strength_steps micro-batches of the stream, scored on the reward part's first
    meta.strength_reward_examples examples; every rank scales its DWM by it. Collective; the choice and the rewards."""
    mc, d = cfg.meta, batches.d

    def pick() -> dict:
        xs = [batches.data.batch(next(batches.stream)[1]).to(d.device) for _ in range(mc.strength_steps)]
        ids = range(min(batches.val.n, mc.strength_reward_examples))
        reward = [{k: t.to(d.device) for k, t in vb.items()} for vb in batches.val.chunked(ids, batches.val_batch_size)]
        return choose_strength(lm, params, step, dwm, mc.strength, xs, reward, lambda x: lm_reads(dwm, lm, params, x))

    out = run_on_rank0(pick)
    with torch.no_grad():
        dwm.fc2.weight.mul_(out["chosen"])
        dwm.fc2.bias.mul_(out["chosen"])
    if d.is_main:
        tried = ", ".join(f"x{s:g} R {r:.4f}" for s, r in zip(out["scales"], out["reward"]))
        log.info(f"strength (logit scale) x{out['chosen']:g} chosen by {mc.strength_steps}-step rollouts: {tried}")
    return out


def run_meta_update(cfg: Config, d: Dist, stage: int, tag: str, started_at: float | None = None) -> dict:
    """Fit stage ``stage``'s DWM on the LM of checkpoint ``tag``; rank 0 writes it. Collective.

    The DWM's metadata records where the job's time went (``timings``: start-up, loading the LM, the
    meta-steps, writing), which the trainer reports as part of the stage boundary's pause."""
    t_in = time.time()
    timings = {"startup_s": t_in - started_at} if started_at else {}
    rd, mc = RunDir(cfg.run.run_dir), cfg.meta
    state = RunState.read(rd.marker(tag))
    alpha = lookahead_lr(cfg, state.scheduler_steps)  # skipped steps did not advance the LR
    # the reference modes differentiate twice / forward-mode through attention: eager kernels only
    attn = "eager" if mc.grad_mode in ("jvp", "unrolled") else cfg.model.attn_implementation
    lm, lm_state = load_frozen_lm(cfg, rd, tag, d, attn)
    timings["load_lm_s"] = time.time() - t_in
    dwm, how = initial_dwm(cfg, DWMArch.from_config(cfg, lm.config.vocab_size), stage, rd, lm_state)
    del lm_state
    dwm = dwm.to(d.device).eval()  # as the trainer applies it: gradients flow all the same, no dropout draws
    batches, params = MetaBatches(cfg, d, rd, state.consumed_samples), lm_params(lm)
    mc = resolved_fd_eps(mc, params)
    records = rd.meta_records(stage) if d.is_main else None
    if records is not None:
        records.parent.mkdir(parents=True, exist_ok=True)
        records.write_text("")
        eps = f" (fd_eps {mc.fd_eps:.3g})" if mc.grad_mode == "fd" else ""
        log.info(f"stage {stage}: LM from {rd.checkpoint(tag)} (step {state.step}); DWM {how}; {mc.steps} "
              f"meta-steps x {d.world} proc, mode {mc.grad_mode}{eps}, {mc.lookahead} lookahead, alpha {alpha:g}; "
              f"validation {batches.val.describe()}")  # fmt: skip
    look = lookahead_inputs(cfg, rd, tag, lm, params, batches, alpha, timings)
    t_start = time.time()
    cal = fit_dwm(dwm, lm, params, batches, look, mc, records)
    if cal and d.is_main:
        log.info(f"stage {stage}: held-out agreement {cal['held_out_agreement']:.3f} -> logits x "
                 f"{cal['logit_scale']:.3f}")  # fmt: skip
    barrier()
    timings["meta_steps_s"] = time.time() - t_start
    strength = {}
    if mc.strength:  # after calibration: the rollouts judge the weights the trainer would apply
        t_s = time.time()
        adam = look.adam or checkpoint_moments(rd, tag, params)
        step = RealStep(adam, scheduled_lr(cfg, state.scheduler_steps), cfg.optimizer.grad_clip)
        strength = set_strength(cfg, dwm, lm, params, batches, step)
        timings["strength_s"] = time.time() - t_s
    probe = batches.fitted_weights(dwm, APPLIED_CHECK_BATCHES, lm, params) if d.is_main else {}
    made = FitRecord(stage=stage, tag=tag, lm_step=state.step, alpha=alpha, world=d.world, calibration=cal,
               timings=timings, started=t_start, tokenizer=cfg.data.tokenizer, applied_check=probe,
               strength=strength, micro_batch_size=cfg.deepspeed.micro_batch_size)  # fmt: skip
    meta = write_dwm(dwm, rd, mc, made) if d.is_main else {}
    barrier()
    return meta


@dataclasses.dataclass(frozen=True)
class FitRecord:
    """What made one fitted DWM: its stage, the LM checkpoint, the lookahead alpha, the job's world, the
    calibration, where the job's time went (``started``: when the meta-steps began) and the tokenizer."""

    stage: int
    tag: str
    lm_step: int
    alpha: float
    world: int
    calibration: dict
    timings: dict
    started: float
    tokenizer: str
    applied_check: dict = dataclasses.field(default_factory=dict)  #: the weights the trainer must reproduce
    strength: dict = dataclasses.field(default_factory=dict)  #: meta.strength's candidates, their rewards, the choice
    micro_batch_size: int = 0  #: the training micro-batch it was fitted on (smaller ones are refused where applied)


def write_dwm(dwm, rd: RunDir, mc, fit: FitRecord) -> dict:
    """Rank 0: the fitted DWM and what made it (its settings, its tokenizer, where the job's time went) as the
    stage's file."""
    info = dict(meta_steps=mc.steps, grad_mode=mc.grad_mode, lookahead=mc.lookahead, lookahead_lr=fit.alpha,
                world_size=fit.world, micro_batch_size=fit.micro_batch_size, **fit.calibration)  # fmt: skip
    info.update(tokenizer=os.path.abspath(fit.tokenizer), tokenizer_sha256=load_tokenizer(fit.tokenizer).sha256)
    if mc.grad_mode == "fd":
        info["fd_eps"] = mc.fd_eps
    info["timings"] = {k: round(v, 3) for k, v in fit.timings.items()}
    if fit.applied_check:
        info["applied_check"] = fit.applied_check
    if fit.strength:
        info["strength"] = fit.strength
    path = rd.dwm(fit.stage)
    took = time.time() - fit.started
    meta = save_dwm(dwm, path, stage=fit.stage, lm_step=fit.lm_step, checkpoint=str(rd.checkpoint(fit.tag)),
                    seconds=took, **info)  # fmt: skip
    log.info(f"wrote {path} (sha256 {meta['sha256'][:12]}...) in {took:.1f} s")
    return meta
