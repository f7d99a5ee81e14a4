"""``dwmtrain plan``: whether a run fits before it is launched. Memory per GPU (model states, gathered
parameters, activations, the fused loss, the DWM, the runtime), the meta job's memory per process, checkpoint
sizes and disk, tokens per step and time per stage; a verdict, and the first change that makes it fit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dwmtrain.config import Config, batch_plan, resolve_precision
from dwmtrain.config.stages import stage_starts
from dwmtrain.errors import ConfigError
from dwmtrain.models.dwm import DWMArch, dwm_forward_flops_per_token, dwm_parameter_count
from dwmtrain.models.spec import lm_spec, model_flops_per_token
from dwmtrain.plan import memory as mem
from dwmtrain.plan.hardware import RUNTIME_BYTES, Device

HEADROOM = 0.92  #: a plan fits when its peak is within this share of the device's memory (fragmentation)
LAMBADA_TOKENS = 128  #: a LAMBADA example's length as planned (passage and target; most are shorter)
META_COPIES = 3  #: LM-sized tensors the meta job holds at its peak (meta.update: theta, theta* or theta+eps v, v)


@dataclass(frozen=True)
class Plan:
    cfg: Config
    device: Device
    layout: mem.Layout
    n_params: int
    dwm_params: int
    items: list[mem.Item]
    meta_items: list[mem.Item]
    host_offload_per_node: int
    checkpoint_bytes: tuple[int, int]
    disk_bytes: int
    tokens_per_step: int
    steps_per_stage: list[int]
    flops_per_token: float
    mfu: float

    @property
    def peak(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def meta_peak(self) -> int:
        return sum(i.nbytes for i in self.meta_items)

    @property
    def budget(self) -> int:
        return int(self.device.memory_bytes * HEADROOM)

    @property
    def fits(self) -> bool:
        """Training fits."""
        return self.peak <= self.budget

    @property
    def meta_over(self) -> bool:
        """The bi-level meta job does not fit (training's fit aside)."""
        return self.cfg.meta.mode == "bilevel" and self.meta_peak > self.budget

    def stage_seconds(self) -> list[float] | None:
        if not self.device.peak_flops:
            return None
        rate = self.layout.world * self.device.peak_flops * self.mfu / self.flops_per_token  # tokens/s
        return [s * self.tokens_per_step / rate for s in self.steps_per_stage]


def _largest_module(spec) -> int:
    """The biggest single module ZeRO-3 gathers whole: the embedding (or the untied head), or an MLP matrix."""
    return max(spec.vocab_size * spec.hidden_size, spec.hidden_size * spec.intermediate_size)


def _flops_per_token(spec, seq: int, arch, dwm_params: int, every: int) -> float:
    """The LM's model FLOPs (6N + PaLM's 12 L H T attention), the recompute of checkpointed layers (their share
    of the forward), and the DWM's forward."""
    L = spec.num_hidden_layers
    recompute = model_flops_per_token(spec, seq, False) * len(range(0, L, every)) / L if every else 0.0
    return model_flops_per_token(spec, seq) + recompute + dwm_forward_flops_per_token(arch, seq, dwm_params)


def _disk(cfg: Config, ckpt: tuple[int, int]) -> int:
    """The checkpoints a run keeps at its end: keep_last periodic ones, every stage boundary's (with its fp32
    weights), and the final one."""
    r, st = cfg.run, cfg.stages
    periodic = min(r.keep_last, st.total_steps // r.checkpoint_every)
    boundaries = st.num_stages - 1 if r.keep_stage_checkpoints else 0
    return (periodic + boundaries + 1) * ckpt[0] + (boundaries + 1) * ckpt[1]


def make_plan(cfg: Config, nodes: int, gpus_per_node: int, device: Device, mfu: float = 0.4) -> Plan:
    spec = lm_spec(cfg.model)
    ds, seq = cfg.deepspeed, cfg.data.seq_len
    lay = mem.Layout(nodes, gpus_per_node, resolve_precision(ds.precision, device.accelerator),
                     ds.offload_optimizer == "cpu", ds.offload_params == "cpu", ds.zero_stage,
                     ds.tensor_parallel_size)  # fmt: skip
    bp = batch_plan(cfg, lay.world)
    arch = DWMArch.from_config(cfg, spec.vocab_size)
    n, nd, largest = spec.num_parameters(), dwm_parameter_count(arch), _largest_module(spec)
    here = mem.tensor_parallel_slice(spec, lay.tp)  # what one rank holds and computes
    mb, chunk, every = bp.micro_batch_size, cfg.model.loss_chunk_tokens, cfg.model.activation_checkpointing
    fused = cfg.model.attn_implementation == "sdpa"
    items = [
        mem.model_states(n if lay.zero_stage == 3 else here.num_parameters(), largest, lay),
        mem.gathered(n, largest, ds.prefetch_bucket_size, ds.reduce_bucket_size, lay),
        mem.activations(here, mb, seq, lay, cfg.model.attn_implementation, chunk, every, fused),
        mem.dwm_memory(nd, arch.backbone_spec() if arch.features == "backbone" else None, mb, seq, lay),
        mem.Item(
            "runtime (context, libraries, communication buffers)",
            RUNTIME_BYTES[device.accelerator],
            "per process; see plan.hardware",
        ),  # fmt: skip
    ]
    ckpt = mem.checkpoint_bytes(n, lay, here.num_parameters())
    starts = [*stage_starts(cfg.stages.total_steps, cfg.stages.num_stages, list(cfg.stages.boundaries)),
              cfg.stages.total_steps]  # fmt: skip
    resident = sum(i.nbytes for i in items if not i.name.startswith("activations"))
    return Plan(
        cfg, device, lay, n, nd, items, meta_items(cfg, spec, nd, lay, device, resident),
        mem.host_model_states(n, largest, lay),
        ckpt, _disk(cfg, ckpt), bp.global_batch_size * seq, [b - a for a, b in zip(starts, starts[1:])],
        _flops_per_token(spec, seq, arch, nd, every), mfu,
    )  # fmt: skip


def meta_items(
    cfg: Config, spec, dwm_params: int, lay: mem.Layout, device: Device, trainer_resident: int
) -> list[mem.Item]:
    """The meta job's memory per process: every process holds the whole frozen LM (data-parallel over
    ``meta.nproc``), in ``meta.lm_dtype``."""
    dtype = lay.precision if cfg.meta.lm_dtype == "train" else "fp32"
    meta_lay = dataclasses.replace(lay, precision=dtype)
    mb, seq, chunk = cfg.deepspeed.micro_batch_size, cfg.data.seq_len, cfg.model.loss_chunk_tokens
    every = cfg.model.activation_checkpointing if cfg.meta.grad_mode in ("fd", "per_sample") else 0
    act = mem.activations(spec, mb, seq, meta_lay, cfg.model.attn_implementation, chunk, every, True)
    adam = cfg.meta.lookahead == "adam"  # + the update's derivative J beside theta*, and AdamW's moments in fp32
    copies = META_COPIES + adam
    items = mem.meta_job_memory(spec.num_parameters(), dwm_params, act.nbytes, 0, mem.MetaShape(copies, dtype))
    n = spec.num_parameters()
    if adam or cfg.meta.strength:
        items.append(mem.Item("AdamW moments (meta.lookahead=adam or meta.strength)", 8 * n,
                              f"m and v, {n:,} x 2 x 4 B (fp32)"))  # fmt: skip
    if cfg.meta.strength:  # rank 0's rollout: its own parameters, gradient and AdamW state, in the LM's dtype
        b = mem.DTYPE_BYTES[dtype]
        items.append(mem.Item("a strength rollout (meta.strength, rank 0)", 4 * n * b,
                              f"parameters, gradient, m, v: 4 x {n:,} x {b} B"))  # fmt: skip
    val_len = min(seq, LAMBADA_TOKENS) if cfg.data.val_source == "lambada" else seq  # held-out, target: up to seq
    val = mem.activations(spec, cfg.meta.val_batch_size, val_len, meta_lay, cfg.model.attn_implementation, chunk, 0,
                          True, head=False)  # fmt: skip
    items.append(mem.Item("activations of the validation pass at theta*", val.nbytes,
                          f"{cfg.meta.val_batch_size} x {val_len} tokens, not recomputed"))  # fmt: skip
    items.append(mem.Item("runtime", RUNTIME_BYTES[device.accelerator], ""))
    if cfg.meta.launch == "local" and device.accelerator == "cuda":  # trainer ranks wait on the same GPUs
        items.append(
            mem.Item(
                "the waiting trainer rank on this GPU",
                trainer_resident,
                "its model states, gathered "
                "parameters, DWM and runtime (activations freed, the caching allocator emptied)",
            )
        )
    return items


def _with(cfg: Config, section: str, **fields) -> Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **fields)})


@dataclass(frozen=True)
class Fix:
    """One change that makes a plan fit: its ``key=value`` (or ``--nodes N``), the plan with it, and, for a change
    that alters the method, what it alters."""

    label: str
    plan: Plan
    alters: str = ""


def first_fix(cfg: Config, nodes: int, gpus_per_node: int, device: Device) -> Fix | None:
    """The first single change, in the order a user would try them, that makes training and the meta job fit:
    the changes that keep the method first (activation checkpointing, the meta job's dtype, validation batch and
    launch, CPU offload, more nodes); only where none fits, a smaller micro-batch, which for a weighted run changes
    the method (the DWM weighs fewer samples against each other), said so in ``alters``."""
    for label, change, n, alters in _candidates(cfg, nodes):
        try:
            p = make_plan(change(), n, gpus_per_node, device)
        except ConfigError:  # not a valid config, or a global batch that does not divide over that many ranks
            continue
        if p.fits and not p.meta_over:
            return Fix(label, p, alters)
    return None


def _candidates(cfg: Config, nodes: int):
    """(label, a function making the changed config, nodes, what it alters of the method) in the order tried."""
    m, ds, out = cfg.meta, cfg.deepspeed, []
    if cfg.model.activation_checkpointing != 1:
        out.append(("model.activation_checkpointing=1", lambda: _with(cfg, "model", activation_checkpointing=1)))
    if m.mode == "bilevel":
        if m.lm_dtype != "train":
            out.append(("meta.lm_dtype=train", lambda: _with(cfg, "meta", lm_dtype="train")))
        if m.val_batch_size > 1:
            v = m.val_batch_size // 2
            out.append((f"meta.val_batch_size={v}", lambda: _with(cfg, "meta", val_batch_size=v)))
        if m.launch == "local":  # the meta job gets the GPUs to itself
            out.append(("meta.launch=external", lambda: _with(cfg, "meta", launch="external")))
    if ds.offload_optimizer == "none":
        out.append(("deepspeed.offload_optimizer=cpu", lambda: _with(cfg, "deepspeed", offload_optimizer="cpu")))
    if ds.offload_params == "none":  # (parameters offloaded need the optimizer offloaded too)
        out.append(("deepspeed.offload_optimizer=cpu deepspeed.offload_params=cpu",
                    lambda: _with(cfg, "deepspeed", offload_optimizer="cpu", offload_params="cpu")))  # fmt: skip
    tries = [(label, make, nodes, "") for label, make in out]
    tries += [(f"--nodes {nodes * k}", lambda: cfg, nodes * k, "") for k in (2, 4, 8, 16)]
    weighted, mb = m.mode != "none", ds.micro_batch_size
    for smaller in sorted({mb // 2, mb // 4, 2 if weighted else 1} - {0, 1 if weighted else 0}, reverse=True):
        if smaller < mb:  # the same global batch: more accumulation
            alters = (f"the DWM then weighs {smaller} samples against each other instead of {mb}" if weighted
                      else "")  # fmt: skip
            tries.append((f"deepspeed.micro_batch_size={smaller}",
                          lambda s=smaller: _with(cfg, "deepspeed", micro_batch_size=s), nodes, alters))  # fmt: skip
    return tries
