"""The DeepSpeed engine of a run: the seeded LM (built partitioned under ZeRO-3, whole for ZeRO-1/2 and tensor
parallelism), AdamW from the generated config, warmup + cosine."""

from __future__ import annotations

import functools

import torch

from dwmtrain.config import Config
from dwmtrain.distributed import Dist, broadcast_object, run_on_rank0
from dwmtrain.errors import ConfigError, DWMTrainError
from dwmtrain.lr_schedule import default_warmup, lr_multiplier
from dwmtrain.models.lm import build_lm, enable_activation_checkpointing, weighted_lm_class
from dwmtrain.models.pretrained import PretrainedWeights
from dwmtrain.models.spec import ModelSpec


def build_engine(cfg: Config, ds_config: dict, spec: ModelSpec, d: Dist, init_from: str = ""):
    """Collective: the LM wrapped by ZeRO (and split by AutoTP over ``d.tp`` ranks) with its optimizer and LR
    schedule (DeepSpeed engine); its weights those of the Hugging Face checkpoint ``init_from`` when given, else
    seeded."""
    import deepspeed

    attn, seed = cfg.model.attn_implementation, cfg.run.seed
    if cfg.deepspeed.zero_stage == 3:
        lm = build_partitioned_lm(spec, attn, seed, ds_config, init_from)
    else:  # ZeRO-1/2 keep every parameter whole (or AutoTP's slice of it) on every rank
        lm = build_whole_lm(spec, attn, seed, init_from)
    lm.loss_chunk_tokens = cfg.model.loss_chunk_tokens or lm.loss_chunk_tokens
    enable_activation_checkpointing(lm, cfg.model.activation_checkpointing)
    total = cfg.stages.total_steps
    warm = default_warmup(total, cfg.optimizer.warmup_steps)

    def schedule(opt):  # base lr * multiplier: lr_schedule.scheduled_lr computes the same value
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_multiplier(s, total, warm, cfg.optimizer.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(
        model=lm, model_parameters=lm.parameters(), config=ds_config, lr_scheduler=schedule,
        mpu=tensor_parallel_groups(spec, d) if d.tp > 1 else None,
    )  # fmt: skip
    return engine


def tensor_parallel_groups(spec: ModelSpec, d: Dist):
    """Collective: DeepSpeed's (data, tensor) process groups for AutoTP (``deepspeed.utils.groups``, which the
    engine takes as its ``mpu``: then its batch arithmetic counts data-parallel ranks only), checked against the
    ranks dwmtrain's data order and checkpoints assume."""
    from deepspeed.utils import groups

    for what, n in (("attention heads", spec.num_attention_heads), ("key-value heads", spec.num_key_value_heads)):
        if n % d.tp:
            raise ConfigError(f"deepspeed.tensor_parallel_size={d.tp}: does not divide the model's {n} {what} "
                              f"({spec.name})")  # fmt: skip
    groups._init_tp_mesh_device(tensor_model_parallel_size=d.tp)  # DeepSpeed's own AutoTP path calls the same
    if (groups.get_data_parallel_rank(), groups.get_tensor_model_parallel_rank()) != (d.dp_rank, d.tp_rank):
        raise DWMTrainError(
            f"rank {d.rank}: DeepSpeed put it at data-parallel rank {groups.get_data_parallel_rank()}, tensor-parallel "
            f"rank {groups.get_tensor_model_parallel_rank()}; dwmtrain expects {d.dp_rank}, {d.tp_rank}"
        )
    return groups


def build_whole_lm(spec: ModelSpec, attn: str, seed: int, init_from: str = ""):
    """The run's LM of ``spec`` built whole on this rank (every rank builds the same seeded weights), or with the
    weights of the Hugging Face checkpoint ``init_from``, read one tensor at a time; AutoTP then keeps each rank's
    slice. A node of 8 ranks holds 8 full copies while it builds: docs/scaling.md."""
    lm = build_lm(spec, attn, seed=seed)
    if init_from:
        weights = _checked_weights(init_from, lm, spec)  # unfit weights: every rank raises alike
        with torch.no_grad():
            for name, p in lm.named_parameters():
                p.copy_(weights.tensor(name))
    return lm


def build_partitioned_lm(spec: ModelSpec, attn: str, seed: int, ds_config: dict, init_from: str = ""):
    """Collective: the run's LM of ``spec``, built already partitioned by ZeRO-3 (``deepspeed.zero.Init``), with
    exactly the weights a plain seeded build gives, or those of the Hugging Face checkpoint ``init_from``.

    Only global rank 0 reads the full weights (building the seeded LM on the CPU as a single-process run would, or
    reading the checkpoint one tensor at a time); every other rank holds only its shards from the start. The values
    are copied in one tensor at a time: each parameter is gathered, rank 0 writes it, and DeepSpeed broadcasts and
    re-partitions it on leaving the context. So a node of 8 ranks holds one full copy at start-up instead of 8, and
    the weights do not depend on the device, the world size or where zero.Init draws its (discarded) initial
    values. The RNG state afterwards is the same on every rank (the plain build's when no checkpoint is read)."""
    import deepspeed
    import torch.distributed as dist

    main = not dist.is_initialized() or dist.get_rank() == 0
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    # Import the model's classes before zero.Init: on exit it puts back the __init__ a class had when it was
    # created inside the context, undoing what was decorated after (transformers >= 5.25's kernel hooks: every
    # forward then failed with "'LlamaAttention' object has no attribute '_kernel_funcs'").
    weighted_lm_class(type(spec.hf_config(attn)))
    with deepspeed.zero.Init(config_dict_or_path=ds_config):  # its draws are overwritten below
        lm = build_lm(spec, attn, dtype=None)
    release_free_host_memory()  # the construction's full-size temporaries
    if init_from:
        box: dict = {}
        run_on_rank0(lambda: box.update(w=_checked_weights(init_from, lm, spec)))  # unfit weights: every rank raises
        source = {n: (lambda n=n: box["w"].tensor(n)) for n, _ in lm.named_parameters()} if main else {}
        seeded = None
    else:
        seeded = build_lm(spec, attn, seed=seed) if main else None
        source = {n: (lambda p=p: _take(p)) for n, p in seeded.named_parameters()} if main else {}
    cpu_rng = broadcast_object(torch.get_rng_state() if main else None)  # the plain build's, on every rank
    _copy_into_partitions(lm, source, main)
    del seeded, source
    release_free_host_memory()
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    return lm


def _checked_weights(init_from: str, lm, spec: ModelSpec):
    """Rank 0: the checkpoint's weights, refused (ConfigError) unless every tensor fits the model."""
    weights = PretrainedWeights(init_from)
    want = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in lm.named_parameters()}
    if bad := weights.problems(want, spec.tie_word_embeddings):
        raise ConfigError(f"model.init_from={init_from}: its weights do not fit the model {spec.name}: "
                          + "; ".join(bad[:3]) + (f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""))  # fmt: skip
    return weights


def _take(p: torch.nn.Parameter) -> torch.Tensor:
    """``p``'s values, ``p`` itself emptied: the seeded copy is freed as it is copied."""
    t, p.data = p.data, torch.empty(0)
    return t


def _copy_into_partitions(lm, source: dict, main: bool) -> None:
    """Collective: each parameter gathered in turn, rank 0 writes ``source[name]()`` into it, DeepSpeed
    re-partitions it; what rank 0 read is freed as it goes. A read that fails on rank 0 (a checkpoint's disk) is
    the same error on every rank at once, before anyone waits in the gather."""
    import deepspeed

    with torch.no_grad():
        for name, p in lm.named_parameters():
            value, err = None, None
            if main:
                try:
                    value = source.pop(name)()
                except Exception as e:  # noqa: BLE001 - reaches every rank as the project's error
                    err = f"reading {name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
            if err := broadcast_object(err):
                raise ConfigError(f"model.init_from: {err}")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if main:
                    p.data.copy_(value)
            del value
            release_free_host_memory()  # the gathered copy just freed (else the heap keeps it resident)


def release_free_host_memory() -> None:
    """Return the C heap's free pages to the system (glibc ``malloc_trim``). Building and partitioning frees
    many tensors of a few MiB, below glibc's mmap threshold, which the heap otherwise keeps resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _malloc_trim():
    lib = _libc()
    return getattr(lib, "malloc_trim", None) if lib is not None else None


@functools.cache
def _libc():
    """The C library (glibc's malloc_trim and mallopt where it has them; musl and macOS have not), or None."""
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
