"""The meta-update job's body: fit the DWM for stage k on the frozen LM from the boundary checkpoint.

One process per GPU (or CPU process); each meta-step is data-parallel: every rank draws its own
training micro-batch and validation batch, and the DWM gradients are all-reduced (NCCL / gloo).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from dwmtrain.config import Config
from dwmtrain.data.dataset import GlobalOrder, TokenDataset, rank_micro_batches
from dwmtrain.distributed import Dist, all_reduce_, barrier
from dwmtrain.meta.metagrad import dwm_surrogate, lm_params, meta_gradient
from dwmtrain.models.dwm import DataWeightingModel, DWMArch, load_dwm_state, save_dwm, weight_stats
from dwmtrain.models.lm import build_lm, llama_config
from dwmtrain.stages.handoff import dwm_file
from dwmtrain.train.checkpoint import MARKER, safe_torch_load
from dwmtrain.train.evaluate import validation_set


def load_frozen_lm(cfg: Config, ckpt_root: Path, tag: str, device, attn: str):
    """Consolidate the ZeRO-3 shards with DeepSpeed's own zero_to_fp32 and freeze the LM."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    vocab = llama_config(cfg.model.preset, cfg.model.vocab_size).vocab_size
    lm = build_lm(cfg.model.preset, vocab, cfg.model.max_seq_len, attn)
    with safe_torch_load():
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    lm.load_state_dict(state)
    return lm.to(device).eval().requires_grad_(False), state


def initial_dwm(cfg: Config, arch: DWMArch, stage: int, run_dir: Path, lm_state: dict) -> tuple:
    """The previous stage's DWM, or a fresh one (backbone copied from the LM, as the paper does)."""
    prev = dwm_file(run_dir, stage - 1)
    if stage > 2 and prev.exists():
        _, state, _ = load_dwm_state(prev, arch)
        m = DataWeightingModel(arch)
        m.load_state_dict(state)
        return m, f"continued from {prev}"
    torch.manual_seed(cfg.run.seed + 7919)
    m = DataWeightingModel(arch)
    if cfg.dwm.init_backbone_from_lm:
        m.init_backbone_from(lm_state)
        return m, "fresh head, backbone initialized from the LM"
    return m, "fresh (random backbone)"


def run_meta_update(cfg: Config, d: Dist, stage: int, tag: str, lookahead_lr: float) -> dict:
    run_dir = Path(cfg.run.run_dir)
    ckpt_root = run_dir / "checkpoints"
    marker = json.loads((ckpt_root / tag / MARKER).read_text())
    mc = cfg.meta
    # the reference modes differentiate twice / forward-mode through attention: eager kernels only
    attn = "eager" if mc.grad_mode in ("jvp", "unrolled") else cfg.model.attn_implementation
    lm, lm_state = load_frozen_lm(cfg, ckpt_root, tag, d.device, attn)
    arch = DWMArch.from_config(cfg, lm.config.vocab_size)
    dwm, how = initial_dwm(cfg, arch, stage, run_dir, lm_state)
    del lm_state
    dwm = dwm.to(d.device).train()
    if not mc.backbone_trainable:
        dwm.backbone.requires_grad_(False)
    trainable = [p for p in dwm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=mc.lr)

    data = TokenDataset(cfg.data.train_data, "train", verify=cfg.data.verify)
    val = validation_set(cfg)
    # training micro-batches from the run's current position in its data stream
    stream = rank_micro_batches(
        GlobalOrder(len(data), cfg.run.seed),
        int(marker["consumed_samples"]),
        d.rank,
        d.world,
        cfg.deepspeed.micro_batch_size,
    )
    params = lm_params(lm)
    log_path = run_dir / "meta" / f"stage{stage}.jsonl"
    if d.is_main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
        print(
            f"[meta] stage {stage}: LM from {ckpt_root / tag} (step {marker['step']}); DWM {how}; "
            f"{mc.steps} meta-steps x {d.world} proc, mode {mc.grad_mode}, alpha {lookahead_lr:g}",
            flush=True,
        )
    t_start = time.time()
    for k in range(mc.steps):
        t0 = time.time()
        _, idx = next(stream)
        x = data.batch(idx).to(d.device)
        vb = next(val.batches(1, mc.val_batch_size, d.rank, d.world, offset=k * d.world * mc.val_batch_size))
        vb = {n: t.to(d.device) for n, t in vb.items()}
        w = dwm(x)  # [B], differentiable in the DWM parameters
        g = meta_gradient(lm, params, x, vb, w.detach(), lookahead_lr, mc.grad_mode, mc.fd_eps)
        opt.zero_grad(set_to_none=False)
        dwm_surrogate(w, g.dR_dw).backward()
        flat = torch.cat([p.grad.flatten() for p in trainable])
        all_reduce_(flat)
        flat /= d.world
        off = 0
        for p in trainable:
            p.grad.copy_(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
        gnorm = flat.norm().item()
        opt.step()
        s = weight_stats(w)
        diag = torch.tensor([g.val_before, g.val_after, s["entropy"], s["ess"]], dtype=torch.float64)
        all_reduce_(diag)
        diag /= d.world
        rec = {
            "meta_step": k + 1,
            "val_loss_theta": diag[0].item(),
            "val_loss_theta_star": diag[1].item(),
            "weight_entropy": diag[2].item(),
            "weight_ess": diag[3].item(),
            "w_min": s["min"],
            "w_max": s["max"],
            "grad_norm": gnorm,
            "step_time_s": time.time() - t0,
        }
        if d.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    barrier()
    meta = None
    if d.is_main:
        meta = save_dwm(
            dwm,
            dwm_file(run_dir, stage),
            stage=stage,
            lm_step=int(marker["step"]),
            meta_steps=mc.steps,
            grad_mode=mc.grad_mode,
            lookahead_lr=lookahead_lr,
            checkpoint=str(ckpt_root / tag),
            world_size=d.world,
            seconds=time.time() - t_start,
        )
        print(
            f"[meta] wrote {dwm_file(run_dir, stage)} (sha256 {meta['sha256'][:12]}...) "
            f"in {time.time() - t_start:.1f} s",
            flush=True,
        )
    barrier()
    return meta or {}
