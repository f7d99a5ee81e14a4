"""The DeepSpeed engine of a run: the seeded LM, AdamW from the generated config, warmup + cosine."""

from __future__ import annotations

import torch

from dwmtrain.config import Config
from dwmtrain.models.lm import build_lm
from dwmtrain.train.loss import default_warmup, lr_multiplier


def build_engine(cfg: Config, ds_config: dict, vocab_size: int):
    """Collective: the LM wrapped by ZeRO-3 with its optimizer and LR schedule (DeepSpeed engine)."""
    import deepspeed

    lm = build_lm(cfg.model.preset, vocab_size, cfg.model.max_seq_len, cfg.model.attn_implementation, seed=cfg.run.seed)
    lm.loss_chunk_tokens = cfg.model.loss_chunk_tokens or lm.loss_chunk_tokens
    total = cfg.stages.total_steps
    warm = default_warmup(total, cfg.optimizer.warmup_steps)

    def schedule(opt):  # base lr * multiplier: train.loss.scheduled_lr computes the same value
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, total, warm, cfg.optimizer.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=lm, model_parameters=lm.parameters(), config=ds_config, lr_scheduler=schedule
    )
    return engine
