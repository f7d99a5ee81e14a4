"""What autograd keeps for the backward of one training micro-batch, counted by running the model's pieces on the
meta device (no memory, no time): one decoder layer, and the final norm with the fused loss head. Exact for what
the code saves (the fused loss's gradients included), at any size; checkpointing, the attention kernel and
allocator slack are accounted for by ``memory``."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from dwmtrain.models.spec import ModelSpec


@dataclass(frozen=True)
class Saved:
    """Bytes saved for the backward at one micro-batch."""

    layer_linear: int  #: one decoder layer: the part that grows with the tokens
    layer_quadratic: int  #: one decoder layer: the [T, T] attention probabilities of an unfused kernel
    head: int  #: the final norm and the fused loss (its chunk's logits and the LM head's gradient)
    layer_input: int  #: one decoder layer's input: what a checkpointed layer keeps


def _counter(exclude: set):
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in exclude:  # parameters are model states, counted there
            seen[s._cdata] = s.nbytes()
        return t

    return seen, pack


def _one_layer(spec: ModelSpec, attn: str, dtype: torch.dtype):
    from dwmtrain.models.lm import build_lm

    fields = {**spec.config, "num_hidden_layers": 1}
    with torch.device("meta"):
        lm = build_lm(ModelSpec(spec.name, json.dumps(fields, sort_keys=True)), attn, dtype=dtype)
    return lm.train()


def _saved(fn, exclude: set) -> int:
    seen, pack = _counter(exclude)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def saved_per_micro_batch(spec: ModelSpec, micro: int, seq: int, dtype: torch.dtype, attn: str, chunk: int) -> Saved:
    """Trace one decoder layer at ``seq`` and ``2 seq`` tokens (separating the quadratic attention term) and the
    loss head, on the meta device."""
    lm = _one_layer(spec, attn, dtype)
    params = {p.untyped_storage()._cdata for p in lm.parameters()}
    layer = lm.model.layers[0]

    def layer_at(t: int) -> int:
        h = torch.zeros(micro, t, spec.hidden_size, dtype=dtype, device="meta", requires_grad=True)
        pos = torch.arange(t, device="meta")[None]
        pe = lm.model.rotary_emb(h, pos)
        return _saved(lambda: layer(h, position_embeddings=pe, attention_mask=None, position_ids=pos), params)

    s1, s2 = layer_at(seq), layer_at(2 * seq)
    quadratic = max((s2 - 2 * s1) // 2, 0)  # S(T) = aT + bT^2
    h = torch.zeros(micro, seq, spec.hidden_size, dtype=dtype, device="meta", requires_grad=True)
    y = torch.zeros(micro, seq, dtype=torch.long, device="meta")
    w = torch.ones(micro, device="meta")
    head = _saved(lambda: lm.lm_head(lm.model.norm(h), labels=y, sample_weights=w, chunk=chunk or seq), params)
    return Saved(s1 - quadratic, quadratic, head, h.numel() * h.element_size())
