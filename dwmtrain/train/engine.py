"""The DeepSpeed engine of a run: the seeded LM (built partitioned), AdamW from the generated config, warmup +
cosine."""

from __future__ import annotations

import functools

import torch

from dwmtrain.config import Config
from dwmtrain.distributed import broadcast_object
from dwmtrain.lr_schedule import default_warmup, lr_multiplier
from dwmtrain.models.lm import build_lm
from dwmtrain.models.spec import ModelSpec


def build_engine(cfg: Config, ds_config: dict, spec: ModelSpec):
    """Collective: the LM wrapped by ZeRO-3 with its optimizer and LR schedule (DeepSpeed engine)."""
    import deepspeed

    lm = build_partitioned_lm(spec, cfg.model.attn_implementation, cfg.run.seed, ds_config)
    lm.loss_chunk_tokens = cfg.model.loss_chunk_tokens or lm.loss_chunk_tokens
    total = cfg.stages.total_steps
    warm = default_warmup(total, cfg.optimizer.warmup_steps)

    def schedule(opt):  # base lr * multiplier: lr_schedule.scheduled_lr computes the same value
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, total, warm, cfg.optimizer.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=lm, model_parameters=lm.parameters(), config=ds_config, lr_scheduler=schedule
    )
    return engine


def build_partitioned_lm(spec: ModelSpec, attn: str, seed: int, ds_config: dict):
    """Collective: the run's seeded LM of ``spec``, built already partitioned by ZeRO-3 (``deepspeed.zero.Init``), with
    exactly the weights a plain seeded build gives.

    Only global rank 0 builds the full LM (on the CPU, from the seed, as a single-process run would); every
    other rank holds only its shards from the start. The values are then copied in one tensor at a time:
    each parameter is gathered, rank 0 writes it, and DeepSpeed broadcasts and re-partitions it on leaving
    the context. So a node of 8 ranks holds one full copy at start-up instead of 8, and the weights do not
    depend on the device, the world size or where zero.Init draws its (discarded) initial values. The RNG
    state afterwards is the plain build's on every rank."""
    import deepspeed
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # its draws are overwritten below
        lm = build_lm(spec, attn, dtype=None)
    release_free_host_memory()  # the construction's full-size temporaries
    seeded = build_lm(spec, attn, seed=seed) if main else None
    cpu_rng = broadcast_object(torch.get_rng_state() if main else None)
    source = dict(seeded.named_parameters()) if main else {}
    with torch.no_grad():
        for name, p in lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if main:
                    p.data.copy_(source[name].data)
                    source[name].data = torch.empty(0)  # the seeded copy is freed as it is copied
            release_free_host_memory()  # the gathered copy just freed (else the heap keeps it resident)
    del seeded, source
    release_free_host_memory()
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return lm


def release_free_host_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``). Building and partitioning frees
    many tensors of a few MiB, below glibc's mmap threshold, which the heap otherwise keeps resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
