"""Batch arithmetic (pure): micro-batch x accumulation x world size = the global batch, checked against each
other; the only place batch sizes are reconciled."""

from __future__ import annotations

from dataclasses import dataclass

from dwmtrain.config.checks import check
from dwmtrain.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """Resolved batch sizes: global = micro * accum * data-parallel ranks (the world over the tensor-parallel size:
    the ranks of one tensor-parallel group train on the same micro-batches)."""

    micro_batch_size: int
    gradient_accumulation_steps: int
    world_size: int  #: data-parallel ranks
    global_batch_size: int
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


def global_batch_sequences(global_batch: int, global_tokens: int, seq_len: int) -> int:
    """Sequences per optimizer step from ``global_batch_size`` / ``global_batch_tokens`` (0: not set)."""
    if not global_tokens:
        return global_batch
    check(
        global_tokens % seq_len == 0,
        "deepspeed.global_batch_tokens",
        global_tokens,
        f"must be a multiple of data.seq_len={seq_len}",
    )
    check(
        not global_batch or global_batch * seq_len == global_tokens,
        "deepspeed.global_batch_size",
        global_batch,
        f"contradicts deepspeed.global_batch_tokens={global_tokens} "
        f"(= {global_tokens // seq_len} sequences of {seq_len})",
    )
    return global_tokens // seq_len


def resolve_batch(
    micro: int, world: int, seq_len: int, global_batch: int = 0, global_tokens: int = 0, accum: int = 0
) -> BatchPlan:
    """Check micro-batch, accumulation, global batch and world size against each other."""
    if world <= 0:
        raise ConfigError(f"world_size={world}: must be > 0")
    global_batch = global_batch_sequences(global_batch, global_tokens, seq_len)
    per_step = micro * world
    if global_batch:
        if global_batch % per_step:
            raise ConfigError(
                f"deepspeed.global_batch_size={global_batch}: not divisible by micro_batch_size x world_size "
                f"= {micro} x {world} = {per_step}"
            )
        derived = global_batch // per_step
        if accum and accum != derived:
            raise ConfigError(
                f"deepspeed.gradient_accumulation_steps={accum}: contradicts global batch {global_batch} = "
                f"{micro} x {world} x {derived}"
            )
        accum = derived
    else:
        accum = accum or 1
        global_batch = per_step * accum
    return BatchPlan(micro, accum, world, global_batch, seq_len)


def batch_plan(cfg, world: int) -> BatchPlan:
    """The batch plan of a run's config (its ``deepspeed`` and ``data`` sections) at ``world`` ranks."""
    ds = cfg.deepspeed
    return resolve_batch(
        ds.micro_batch_size,
        data_parallel_size(world, ds.tensor_parallel_size),
        cfg.data.seq_len,
        ds.global_batch_size,
        ds.global_batch_tokens,
        ds.gradient_accumulation_steps,
    )


def data_parallel_size(world: int, tensor_parallel: int) -> int:
    """Data-parallel ranks of ``world`` ranks in tensor-parallel groups of ``tensor_parallel``."""
    if world % tensor_parallel:
        raise ConfigError(f"deepspeed.tensor_parallel_size={tensor_parallel}: does not divide the world of {world} "
                          "ranks")  # fmt: skip
    return world // tensor_parallel
