"""The meta-update's inputs when they come from the caller's own loop rather than a dwmtrain run directory: its LM
(a model object or a Hugging Face checkpoint directory), its training micro-batches (any iterable of token-id
tensors or batch dicts), its reward set (token ids, or examples with labels), its optimizer's AdamW state.

``CallerBatches`` serves ``meta.update.fit`` exactly as a run's ``MetaBatches`` does (``batches(k)`` -> the k-th
training micro-batch and reward batch of this rank); every way an input is unusable is a ``DWMInputError`` naming it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from dwmtrain.distributed import Dist
from dwmtrain.errors import ConfigError, DWMInputError, DWMTrainError
from dwmtrain.meta.metagrad import AdamMoments
from dwmtrain.models.spec import SUPPORTED, ModelSpec


def process_dist(device: torch.device) -> Dist:
    """Where this process sits in the caller's process group (torch.distributed's default group; one process
    when there is none): the meta-update is data-parallel over it, as a run's meta job is."""
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", rank)), int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Dist(rank, world, local[0], local[1], device, device.type)


def unwrapped(model) -> torch.nn.Module:
    """The model itself, out of a DistributedDataParallel (or similar ``.module``) wrapper."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def lm_of(model) -> tuple[torch.nn.Module, ModelSpec]:
    """The LM to fit on and its shape: a model object of a supported architecture as it is (its own parameters,
    read, never changed), or a Hugging Face checkpoint directory loaded from its safetensors."""
    if isinstance(model, (str, os.PathLike)):
        return _load_lm(Path(model))
    model = unwrapped(model)
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise DWMInputError(
            f"model {type(model).__name__} (model_type {kind!r}): the meta-update takes a causal LM of "
            f"{', '.join(SUPPORTED)} (a Hugging Face PreTrainedModel with a config), not this one"
        )
    try:
        return model, ModelSpec.from_fields(type(model).__name__, cfg.to_dict())
    except ConfigError as e:
        raise DWMInputError(f"model {type(model).__name__}: {e}") from None


def _load_lm(path: Path) -> tuple[torch.nn.Module, ModelSpec]:
    """A Hugging Face checkpoint directory's LM in fp32, its weights read from safetensors one tensor at a time."""
    from dwmtrain.models.lm import build_lm, load_lm_state
    from dwmtrain.models.pretrained import PretrainedWeights

    try:
        spec = ModelSpec.from_hf_config(path, field="model")
        weights = PretrainedWeights(path)
    except ConfigError as e:
        raise DWMInputError(str(e)) from None
    lm = build_lm(spec)
    want = {n: tuple(p.shape) for n, p in lm.named_parameters()}
    if bad := weights.problems(want, spec.tie_word_embeddings):
        raise DWMInputError(f"model {path}: its weights do not fit its config.json: " + "; ".join(bad[:3]))
    load_lm_state(lm, {n: weights.tensor(n) for n in weights.shapes})
    return lm, spec


@contextlib.contextmanager
def frozen(model: torch.nn.Module):
    """The LM as the meta-update reads it, everything restored after: in eval mode (no dropout draws); its own
    forward in its own dtype (not accelerate's mixed-precision wrapper, whose bf16 matmuls would drown the fd
    step chosen for fp32 parameters); its parameters' ``.grad`` (a gradient the caller accumulated) set aside."""
    was, wrapped = model.training, "forward" in vars(model) and hasattr(model, "_original_forward")
    grads = {p: p.grad for p in model.parameters()}
    model.eval()
    if wrapped:
        patched, model.forward = model.forward, model._original_forward
    try:
        for p in grads:
            p.grad = None
        yield model
    finally:
        model.train(was)
        if wrapped:
            model.forward = patched
        for p, g in grads.items():
            p.grad = g


def on_every_rank(fn, d: Dist):
    """``fn()`` on every process; an input error on any of them is raised on all at once, naming the rank (none is
    left waiting in a collective for a rank that stopped)."""
    if d.world == 1:
        return fn()
    err, out = None, None
    try:
        out = fn()
    except DWMTrainError as e:
        err = str(e)
    errs: list = [None] * d.world
    torch.distributed.all_gather_object(errs, err)
    if bad := [(r, e) for r, e in enumerate(errs) if e]:
        raise DWMInputError(f"rank {bad[0][0]}: {bad[0][1]}")
    return out


def adam_moments(optimizer, model: torch.nn.Module) -> AdamMoments:
    """The AdamW state of ``optimizer`` (a torch Adam/AdamW, or a wrapper of one with ``.optimizer``) for
    ``model``'s parameters by name: what the Adam-aware lookahead (meta.lookahead=adam) starts from."""
    opt = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    avg, sq, decay, steps, hyper = {}, {}, {}, set(), set()
    for group in opt.param_groups:
        decoupled = isinstance(opt, torch.optim.AdamW) or group.get("decoupled_weight_decay")
        if group.get("weight_decay") and not decoupled:
            raise DWMInputError(f"optimizer {type(opt).__name__}: weight decay added to the gradient; the Adam-aware "
                                "lookahead models AdamW's decoupled decay (use AdamW)")  # fmt: skip
        if "betas" not in group or group.get("amsgrad"):
            raise DWMInputError(f"optimizer {type(opt).__name__}: meta.lookahead=adam models AdamW (betas, no amsgrad)")
        hyper.add((tuple(group["betas"]), group["eps"]))
        for p in group["params"]:
            st = opt.state.get(p, {})
            if p.requires_grad and id(p) in names and "exp_avg" in st:
                n = names[id(p)]
                avg[n], sq[n], decay[n] = st["exp_avg"].float(), st["exp_avg_sq"].float(), group["weight_decay"]
                steps.add(int(st["step"]))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in avg]
    if missing or len(hyper) != 1 or len(steps) != 1:
        why = (f"no Adam moments for {missing[0]} (has it taken a step? an Adam-family optimizer?)" if missing
               else "its parameter groups differ in betas, eps or step count")  # fmt: skip
        raise DWMInputError(f"optimizer {type(opt).__name__}: meta.lookahead=adam needs AdamW's state: {why}")
    (betas, eps), step = hyper.pop(), steps.pop()
    return AdamMoments(avg, sq, step, betas, eps, decay)


def _ids(item, where: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids, attention_mask, labels) of a tensor or a batch dict."""
    if isinstance(item, torch.Tensor):
        return item, None, None
    if isinstance(item, dict) and "input_ids" in item:
        more = (None if item.get(k) is None else torch.as_tensor(item[k]) for k in ("attention_mask", "labels"))
        return (torch.as_tensor(item["input_ids"]), *more)
    raise DWMInputError(f"{where}: expected a tensor of token ids or a dict with input_ids, got {type(item).__name__}")


def checked_ids(x, vocab: int, where: str, dims: int, whose: str = "the LM") -> torch.Tensor:
    """``x`` as long token ids, refused (naming ``where``) unless a ``dims``-d non-empty integer tensor of ids in
    [0, vocab) (``whose`` vocabulary: the LM's, a DWM's)."""
    if not isinstance(x, torch.Tensor) or x.dim() != dims or x.dtype.is_floating_point or x.dtype == torch.bool \
            or x.numel() == 0:  # fmt: skip
        what = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise DWMInputError(f"{where}: expected {dims}-d integer token ids, got {what}")
    lo, hi = int(x.min()), int(x.max())
    if lo < 0 or hi >= vocab:
        raise DWMInputError(f"{where}: token id {hi if hi >= vocab else lo} is outside the vocabulary of {vocab} of "
                            f"{whose} (ids of another tokenizer?)")  # fmt: skip
    return x.long()


class TrainStream:
    """The caller's training micro-batches, checked: [B, T] token ids of packed sequences (no padding: the
    meta-gradient scores every position), read again from the start when a re-iterable (a list, a DataLoader)
    runs out."""

    def __init__(self, batches: Iterable, vocab: int):
        self.source, self.vocab, self.n, self.it = batches, vocab, 0, iter(batches)

    def take(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` micro-batches (all read and checked now: an input error before any meta-step)."""
        return [next(self) for _ in range(n)]

    def __next__(self) -> torch.Tensor:
        try:
            item = next(self.it)
        except StopIteration:
            self.it = iter(self.source)
            if self.it is self.source or self.n == 0:
                raise DWMInputError(f"train_batches ran out after {self.n} micro-batches: give enough for the "
                                    "meta-steps, or a re-iterable (a list, a DataLoader)") from None  # fmt: skip
            return next(self)
        where = f"train_batches[{self.n}]"
        x, mask, _ = _ids(item, where)
        if mask is not None and not bool(mask.all()):
            raise DWMInputError(f"{where}: padded (attention_mask has zeros); the meta-update takes packed "
                                "pretraining sequences of one length")  # fmt: skip
        self.n += 1
        return checked_ids(x, self.vocab, where, 2)


class RewardSet:
    """The reward examples R is measured on: token ids [N, T] (every next token counts), or examples with their own
    ``labels`` (-100: not scored) and ``attention_mask``; padded per batch, on the right."""

    def __init__(self, reward, vocab: int):
        if isinstance(reward, torch.Tensor) and reward.dim() != 2:
            raise DWMInputError(f"reward: expected token ids [N, T] or a list of examples, got {tuple(reward.shape)}")
        items = list(reward.unbind(0)) if isinstance(reward, torch.Tensor) else list(reward)
        if not items:
            raise DWMInputError("reward: the reward set is empty; the meta-update fits the DWM to lower its loss")
        self.examples = []
        for i, item in enumerate(items):
            x, mask, labels = _ids(item, f"reward[{i}]")
            x = checked_ids(x.reshape(-1), vocab, f"reward[{i}]", 1)
            mask = torch.ones_like(x) if mask is None else mask.reshape(-1).long()
            labels = x.masked_fill(mask == 0, -100) if labels is None else labels.reshape(-1).long()
            if not bool((labels[1:] != -100).any()):
                raise DWMInputError(f"reward[{i}]: no labelled token after the first (nothing to score)")
            self.examples.append((x, mask, labels))
        self.n = len(self.examples)

    def batch(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Examples ``ids`` as one batch: input_ids, attention_mask, labels [b, T_max]."""
        t = max(self.examples[i][0].numel() for i in ids)

        def pad(j: int, v: int) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(self.examples[i][j], (0, t - self.examples[i][j].numel()),
                                                        value=v) for i in ids])  # fmt: skip

        return {"input_ids": pad(0, 0), "attention_mask": pad(1, 0), "labels": pad(2, -100)}

    def chunked(self, ids: list[int], size: int) -> Iterator[dict[str, torch.Tensor]]:
        for s in range(0, len(ids), size):
            yield self.batch(ids[s : s + size])


class CallerBatches:
    """``meta.update.fit``'s data from the caller's own inputs: rank r's k-th meta-step takes the next of its
    micro-batches ``train`` and the reward batch of examples (k * world + r) * size ... (wrapping around the set)."""

    def __init__(self, train: Iterator[torch.Tensor], reward: RewardSet, val_batch_size: int, d: Dist):
        self.stream, self.val, self.val_batch_size, self.d = train, reward, val_batch_size, d

    def __call__(self, k: int) -> tuple[torch.Tensor, dict]:
        bs, d = self.val_batch_size, self.d
        first = (k * d.world + d.rank) * bs
        vb = self.val.batch([(first + j) % self.val.n for j in range(bs)])
        return next(self.stream).to(d.device), {n: t.to(d.device) for n, t in vb.items()}
