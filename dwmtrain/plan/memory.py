"""Memory per process of a run, from its config: pure arithmetic over the model's shape, the batch and the
ZeRO / tensor-parallel layout (DeepSpeed's own estimators for the mixed-precision model states), plus what autograd
saves (``activations``: traced on the meta device)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dwmtrain.plan.activations import saved_per_micro_batch

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Item:
    """One line of the memory table: what, how many bytes, and how it was counted."""

    name: str
    nbytes: int
    how: str = ""


@dataclass(frozen=True)
class Layout:
    """Where the run's ranks are and how ZeRO (and tensor parallelism) holds the LM."""

    nodes: int
    gpus_per_node: int
    precision: str  #: fp32 | bf16 | fp16 (resolved for the accelerator)
    offload_optimizer: bool = False
    offload_params: bool = False
    zero_stage: int = 3
    tp: int = 1  #: ranks per tensor-parallel group

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def dp(self) -> int:
        """Data-parallel ranks: what ZeRO shards over."""
        return self.world // self.tp


def tensor_parallel_slice(spec, tp: int):
    """The model one rank of a tensor-parallel group of ``tp`` holds and computes: its share of the attention
    heads, key-value heads and MLP width (AutoTP's split), the embedding, norms and LM head whole."""
    if tp == 1:
        return spec
    from dwmtrain.models.spec import ModelSpec

    c = dict(spec.config)
    c.update(
        head_dim=spec.head_dim,
        num_attention_heads=spec.num_attention_heads // tp,
        num_key_value_heads=spec.num_key_value_heads // tp,
        intermediate_size=-(-c["intermediate_size"] // tp),
    )
    return ModelSpec(f"{spec.name} / tp {tp}", json.dumps(c, sort_keys=True))  # fmt: skip


def model_states(n_params: int, largest: int, lay: Layout) -> Item:
    """Parameters, gradients and Adam's states of this rank's ZeRO-3 partition (the gathered largest layer is
    counted under ``gathered``); under ZeRO-1/2, ``n_params`` is what the rank holds whole (its tensor-parallel
    slice)."""
    if lay.zero_stage < 3:
        return _zero12_model_states(n_params, lay)
    if lay.precision == "fp32":  # fp32 partition, its gradient, the fp32 master copy and Adam's m, v: 20 B/param
        per = 20 if not lay.offload_optimizer else (4 if not lay.offload_params else 0)
        return Item("model states (ZeRO-3 partition)", n_params * per // lay.world,
                    f"{per} B/param / {lay.world} ranks (fp32: partition, gradient, master, Adam m+v)")  # fmt: skip
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, largest_bytes = estimate_zero3_model_states_mem_needs(
        n_params, largest, lay.gpus_per_node, lay.nodes, cpu_offload=lay.offload_optimizer,
        cpu_offload_params=lay.offload_params, zero_init=True, additional_buffer_factor=1.0,
    )  # fmt: skip
    return Item("model states (ZeRO-3 partition)", gpu - largest_bytes,
                "DeepSpeed estimate_zero3_model_states_mem_needs (18 B/param / ranks, mixed precision)")  # fmt: skip


def _zero12_model_states(n_params: int, lay: Layout) -> Item:
    """ZeRO-1/2: the parameters whole on every rank, the gradients whole (stage 1) or partitioned (stage 2), the
    fp32 master and Adam's states partitioned over the data-parallel ranks."""
    dp, sliced = lay.dp, f", tensor-parallel slice 1/{lay.tp}" if lay.tp > 1 else ""
    name = f"model states (ZeRO-{lay.zero_stage}{sliced})"
    if lay.precision == "fp32":  # fp32 parameter; gradient; the optimizer's fp32 copy, its gradient, Adam m+v
        whole, parted = (8, 16) if lay.zero_stage == 1 else (4, 20)
        return Item(name, n_params * whole + n_params * parted // dp,
                    f"{whole} B/param + {parted} B/param / {dp} data-parallel ranks (fp32)")  # fmt: skip
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(n_params, dp, 1, cpu_offload=lay.offload_optimizer,
                                                   additional_buffer_factor=1.0)  # fmt: skip
    how = "DeepSpeed estimate_zero2_model_states_mem_needs"
    if lay.zero_stage == 1 and not lay.offload_optimizer:  # stage 1 keeps the 16-bit gradient whole
        gpu += 2 * n_params - 2 * n_params // dp
        how += " + the whole 16-bit gradient (stage 1)"
    return Item(name, gpu, how)


def host_model_states(n_params: int, largest: int, lay: Layout) -> int:
    """Host memory per node for the offloaded states (DeepSpeed's estimator; 0 without offload)."""
    if not lay.offload_optimizer or lay.precision == "fp32":
        return 0
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, _, _ = estimate_zero3_model_states_mem_needs(
        n_params, largest, lay.gpus_per_node, lay.nodes, cpu_offload=True,
        cpu_offload_params=lay.offload_params, zero_init=True, additional_buffer_factor=1.0,
    )  # fmt: skip
    return cpu


def gathered(n_params: int, largest: int, prefetch: int, reduce_bucket: int, lay: Layout) -> Item:
    """Parameters gathered for use (the largest module and the prefetch bucket) and the gradient bucket being
    reduce-scattered, in the training dtype (ZeRO-1/2 gather nothing: the bucket only)."""
    b = DTYPE_BYTES[lay.precision]
    if lay.zero_stage < 3:
        return Item("gradient bucket", min(n_params, reduce_bucket) * b, f"reduce bucket {reduce_bucket:,} elements")
    live = min(n_params, largest + prefetch) * b + min(n_params, reduce_bucket) * b
    how = f"(largest {largest:,} + prefetch {prefetch:,}) + reduce bucket {reduce_bucket:,} elements"
    return Item("gathered parameters + gradient bucket", live, how)


def activations(
    spec, micro: int, seq: int, lay: Layout, attn: str, chunk: int, every: int, fused_attn: bool, head: bool = True
) -> Item:
    """What one micro-batch's backward needs: the saved tensors of every layer (a checkpointed one keeps only its
    input), the loss head's, and one layer's worth being recomputed and differentiated at a time. ``fused_attn``:
    the attention kernel keeps no [T, T] probabilities (flash / memory-efficient SDPA)."""
    s = saved_per_micro_batch(spec, micro, seq, TORCH_DTYPE[lay.precision], attn, chunk)
    per_layer = s.layer_linear + (0 if fused_attn else s.layer_quadratic)
    n = spec.num_hidden_layers
    kept = sum(1 for i in range(n) if not every or i % every)
    # + the layer in backward, and the fused loss's transients: its fp32 head gradient and one chunk's logits
    transient = spec.vocab_size * (spec.hidden_size + 2 * (chunk or seq * micro)) * 4
    head_bytes = s.head + transient if head else 0  # head=False: logits at a few labelled positions only
    nbytes = kept * per_layer + (n - kept) * s.layer_input + per_layer + head_bytes
    how = f"traced on the meta device: {per_layer / 2**20:,.0f} MiB/layer saved, {n - kept} of {n} checkpointed"
    return Item(f"activations ({micro} x {seq} tokens)", nbytes, how)


def dwm_memory(dwm_params: int, backbone, micro: int, seq: int, lay: Layout) -> Item:
    """The frozen DWM replicated on every rank, in the training dtype, and its no-grad forward's largest
    intermediates (one layer's MLP and attention at a time; none without a backbone: dwm.features=lm)."""
    b = DTYPE_BYTES[lay.precision]
    fwd = micro * seq * (3 * backbone.intermediate_size + 4 * backbone.hidden_size) * b if backbone else 0
    return Item("DWM (frozen weights + forward)", dwm_params * b + fwd, f"{dwm_params:,} parameters, replicated")


@dataclass(frozen=True)
class MetaShape:
    """The meta job's copies of the LM and its batches."""

    copies: int  #: LM-sized tensors alive at the peak
    dtype: str  #: the dtype the frozen LM is held in


def meta_job_memory(n_params: int, dwm_params: int, saved_train: int, logits: int, shape: MetaShape) -> list[Item]:
    """Per process of the meta job: the frozen LM and its LM-sized temporaries (theta, the lookahead gradient
    turned theta*, v = grad L_val(theta*), the fd perturbation), the trained DWM with Adam, and the activations
    of the lookahead's backward."""
    b = DTYPE_BYTES[shape.dtype]
    return [
        Item("frozen LM + LM-sized temporaries", shape.copies * n_params * b,
             f"{shape.copies} copies x {n_params:,} x {b} B ({shape.dtype})"),
        Item("DWM being fitted (weights, gradient, Adam)", dwm_params * 16, "fp32: 16 B/param"),
        Item("activations of the lookahead", saved_train + logits, "traced as in training (no [B, T, V] logits)"),
    ]  # fmt: skip


def checkpoint_bytes(n_params: int, lay: Layout | None = None, rank_params: int = 0) -> tuple[int, int]:
    """(one checkpoint: the fp32 master weights and Adam's m and v, 12 B/param; under ZeRO-1/2 of what each
    tensor-parallel rank holds (``rank_params``: its slice, with its own copy of the embedding and head), plus its
    module weights in the training dtype; the consolidated fp32 weights written at stage boundaries and at the
    end, 4 B/param)."""
    if lay is None or lay.zero_stage == 3:
        return 12 * n_params, 4 * n_params
    held = (rank_params or n_params) * lay.tp
    return (12 + DTYPE_BYTES[lay.precision]) * held, 4 * n_params
