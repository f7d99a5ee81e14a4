"""The bi-level meta-gradient, in every mode. Pure functions of (LM, params, batches, weights).

Lookahead (paper Eq. 4):  theta*(w) = theta - alpha * sum_i w_i grad L_i(theta)
Upper objective:          R(w) = L_val(theta*(w))    (mean target-token loss; lower is better)

theta*(w) is *linear* in w and the LM is frozen, so the chain rule needs no second derivative:

    dR/dw_i = <grad L_val(theta*), d theta*/d w_i> = -alpha * <v, grad L_i(theta)>,  v = grad L_val(theta*)

and the DWM gets dR/d theta_w = sum_i dR/dw_i * d w_i / d theta_w (one backward through the DWM with
the surrogate sum_i stopgrad(dR/dw_i) * w_i). With meta.v=boundary, v = grad R(theta) once per boundary over
the whole reward part instead (Eq. 5's sum, no lookahead): exact as alpha -> 0, where theta* = theta and each
meta-step's v on one validation batch is a noisy estimate of it; the O(alpha) shift of theta* is what it drops.

With meta.lookahead=adam, theta* is the AdamW step the engine would take from the checkpoint's moments (m, s, step t):

    g = sum_i w_i grad L_i / B,  m' = b1 m + (1-b1) g,  s' = b2 s + (1-b2) g^2,  a = m'/(1-b1^t),  r = sqrt(s'/(1-b2^t))
    theta*(w) = theta (1 - alpha wd) - alpha a / (r + eps)

no longer linear in w, but elementwise in g: d theta*/d w_i = -(alpha / B) J * grad L_i with the diagonal
J = d(a / (r + eps))/dg, so dR/dw_i = -(alpha / B) <v * J, grad L_i> (the same inner products with v * J for v).
Gradient clipping is not part of it (the engine clips the global batch's norm, which one micro-batch does not
estimate). ``tools/meta_diagnostic.py`` and the tests check it against finite differences through torch's AdamW.

The inner products c_i = <v, grad L_i(theta)> are computed by one of:

    fd          (L_i(theta + eps v) - L_i(theta - eps v)) / (2 eps): two forwards; works with fused
                attention kernels and with any parameter layout (DARTS-style hypergradient). O(eps^2).
    per_sample  exact: one first-order backward per sample; works with fused kernels.
    jvp         exact: one forward-mode pass (torch.func.jvp); eager attention only.
    unrolled    reference: autograd through theta*(w) with create_graph (double backward); eager only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from dwmtrain.models.loss import per_example_loss, per_sample_loss

Params = dict[str, torch.Tensor]

#: The fd step's perturbation, by dtype, as (per unit of the LM's parameter norm, floor). Its truncation error
#: grows with eps; its rounding error grows as eps shrinks below the rounding of the perturbed parameters
#: (which scales with their norm) or of the losses (the floor). Chosen from the error against the exact
#: per_sample mode in fp64 over a grid of eps (``tools/bench.py --only metaacc``; docs/benchmarks.md): at the
#: tiny (norm 20), small (55) and 370m (447) presets the default is within a few times of the best eps.
FD_EPS = {
    torch.float64: (2e-7, 1e-5),
    torch.float32: (3e-4, 2e-2),
    torch.bfloat16: (2e-3, 3e-1),
    torch.float16: (2e-3, 3e-1),
}


def default_fd_eps(params: Params) -> float:
    """The fd perturbation's norm for these parameters (meta.fd_eps=0): max(per-norm x |params|, floor) of
    their dtype (the norm in fp64, so a bf16 LM's does not round)."""
    dtype = next(iter(params.values())).dtype
    per_norm, floor = FD_EPS.get(dtype, FD_EPS[torch.bfloat16])
    norm = torch.sqrt(sum(t.detach().double().square().sum() for t in params.values())).item()
    return max(per_norm * norm, floor)


def lm_params(model: torch.nn.Module) -> Params:
    """Detached parameters of the LM, by name, that a lookahead moves: those that require a gradient (what an
    optimizer moves; a caller's partly frozen model keeps the rest), or all of them when none does (a frozen copy,
    as the meta job loads)."""
    named = list(model.named_parameters())
    moved = [(n, p) for n, p in named if p.requires_grad] or named
    return {n: p.detach() for n, p in moved}


def _chunked(model) -> int:
    """The LM head's chunk of tokens when the model computes its losses without full logits (0: it does not)."""
    return getattr(model, "loss_chunk_tokens", 0) if hasattr(model, "lm_head") else 0


def train_losses(model, params: Params, x: torch.Tensor) -> torch.Tensor:
    """Per-sample mean token loss L_i at ``params``. x [B, T] -> [B]. Without full [B, T, V] logits where the
    model can (``models.lm.WeightedLoss``, no gradient: the fd mode's perturbed forwards)."""
    if _chunked(model) and not torch.is_grad_enabled():
        return functional_call(model, params, (x,), {"sample_weights": torch.ones(x.shape[0], device=x.device)})[1]
    return per_sample_loss(functional_call(model, params, (x,)).logits, x)


class _Reads:
    """A weighting rule that weighs uniformly and keeps what the LM head hands it: its forward's per-sample losses
    and final hidden states."""

    needs_hidden = True

    def __call__(self, losses: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        self.losses, self.hidden = losses, hidden
        return torch.ones_like(losses)


@torch.no_grad()
def forward_reads(model, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-sample losses [B] and final hidden states [B, T, H] of the LM's forward of x at ``params`` (what a
    DWM that reads the LM's forward weighs by), from one forward, through the head the trainer's goes through."""
    if _chunked(model):
        r = _Reads()
        functional_call(model, params, (x,), {"sample_weights": r})
        return r.losses, r.hidden
    out = functional_call(model, params, (x,), {"output_hidden_states": True})
    return per_sample_loss(out.logits, x), out.hidden_states[-1]


def weighted_train_loss(model, params: Params, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_i w_i L_i at ``params`` (w is data), through the fused loss where the model has it."""
    if _chunked(model):
        return functional_call(model, params, (x,), {"sample_weights": w.detach()})[0] * x.shape[0]
    return (w.detach() * train_losses(model, params, x)).sum()


def val_loss(model, params: Params, vb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Validation loss R at ``params``: mean over examples of the labelled-token loss. The LM head is applied
    only where some example has a label (the LAMBADA targets), where the model allows (``logits_to_keep``)."""
    kw = {"attention_mask": vb["attention_mask"]}
    labels = vb["labels"]
    if _chunked(model):
        pos = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)  # logits at t predict the token at t + 1
        logits = functional_call(model, params, (vb["input_ids"],), {**kw, "logits_to_keep": pos}).logits
        tok = F.cross_entropy(
            logits.float().transpose(1, 2) if logits.dtype != torch.float64 else logits.transpose(1, 2),
            labels[:, pos + 1],
            ignore_index=-100,
            reduction="none",
        )
        m = (labels[:, pos + 1] != -100).to(tok.dtype)
        return ((tok * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    logits = functional_call(model, params, (vb["input_ids"],), kw).logits
    return per_example_loss(logits, labels)[0].mean()


def _norm(v: Params) -> float:
    """|v|, accumulated in fp64 when v is bf16/fp16 (fp32 and fp64 as they are)."""
    dt = next(iter(v.values())).dtype
    if dt in (torch.bfloat16, torch.float16):
        sq = sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in v.values())
        return max(float(sq) ** 0.5, 1e-30)
    return _dot(v, v).sqrt().clamp_min(1e-30).item()


def _dot(a: Params, b: Params) -> torch.Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _axpy(alpha: float, x: Params, y: Params) -> Params:
    """y + alpha * x, by name."""
    return {k: y[k] + alpha * x[k] for k in y}


@dataclass(frozen=True)
class AdamMoments:
    """The optimizer state a lookahead=adam step starts from: AdamW's first and second moments by parameter name
    (fp32, as the engine keeps them), the steps it has taken, and its hyperparameters."""

    exp_avg: Params
    exp_avg_sq: Params
    step: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float | dict[str, float]  #: one for all, or by parameter name (a no-decay group's biases, norms)

    def decay(self, k: str) -> float:
        return self.weight_decay[k] if isinstance(self.weight_decay, dict) else self.weight_decay

    def update(self, k: str, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For parameter ``k`` and its gradient g: AdamW's update direction a / (r + eps) at step t = step + 1,
        and its elementwise derivative J in g (both in g's dtype, computed in fp32 at least)."""
        b1, b2 = self.betas
        t = self.step + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        dt = torch.promote_types(g.dtype, torch.float32)
        g32 = g.to(dt)
        a = (b1 * self.exp_avg[k].to(dt) + (1 - b1) * g32) / bc1
        r = ((b2 * self.exp_avg_sq[k].to(dt) + (1 - b2) * g32 * g32) / bc2).sqrt()
        den = r + self.eps
        # dr/dg = (1-b2) g / (bc2 r); where r = 0 the moments and g are all 0 and so is the derivative
        dr = torch.where(r > 0, (1 - b2) * g32 / (bc2 * r.clamp_min(1e-38)), torch.zeros_like(r))
        jac = (1 - b1) / bc1 / den - a / (den * den) * dr
        return (a / den).to(g.dtype), jac.to(g.dtype)


def adam_lookahead(
    model, params: Params, x: torch.Tensor, w: torch.Tensor, alpha: float, adam: AdamMoments, with_star: bool = True
) -> tuple[Params | None, Params]:
    """theta* = theta (1 - alpha wd) - alpha * AdamW's update of g = sum_i w_i grad L_i(theta) / B (None without
    ``with_star``: a boundary's v needs no theta*), and the diagonal J = d update / d g (w is data here)."""
    with _differentiable(model, params) as p:
        g = torch.autograd.grad(weighted_train_loss(model, p, x, w) / x.shape[0], list(p.values()))
    star, jac = {}, {}
    for k, gk in zip(params, g):
        u, jac[k] = adam.update(k, gk)
        if with_star:
            star[k] = params[k] * (1 - alpha * adam.decay(k)) - alpha * u
    return (star if with_star else None), jac


@dataclass
class MetaGrad:
    """dR/dw and diagnostics of one meta-step."""

    dR_dw: torch.Tensor  # [B]
    val_before: float | None  # R at theta (None when not asked for: it is for the log only)
    val_after: float | None  # R at theta* (None with a boundary's v: no lookahead is taken)


@contextlib.contextmanager
def _differentiable(model, params: Params):
    """``params`` as leaves that require grad. Where they are the model's own parameters (the frozen LM's theta),
    those very tensors: a checkpointed layer (model.activation_checkpointing) then recomputes with the same
    parameters it ran with; other values (theta*) get detached copies."""
    own = dict(model.named_parameters())
    if all(k in own and own[k].data_ptr() == t.data_ptr() and own[k].shape == t.shape for k, t in params.items()):
        ps = {k: own[k] for k in params}
        flags = {k: p.requires_grad for k, p in ps.items()}
        try:
            yield {k: p.requires_grad_(True) for k, p in ps.items()}
        finally:
            for k, p in ps.items():
                p.requires_grad_(flags[k])
    else:
        yield {k: t.detach().requires_grad_(True) for k, t in params.items()}


@contextlib.contextmanager
def _no_recompute(model):
    """No layer is checkpointed meanwhile (Hugging Face recomputes only in training mode): a functional call at
    parameters that are not the module's own cannot be recomputed, which the module would do with its own."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def lookahead(model, params: Params, x: torch.Tensor, w: torch.Tensor, alpha: float) -> Params:
    """theta* = theta - alpha * sum_i w_i grad L_i(theta) (w is data here, not differentiated)."""
    with _differentiable(model, params) as p:
        g = torch.autograd.grad(weighted_train_loss(model, p, x, w), list(p.values()))
    # theta* in the gradient's own memory: theta + (-(alpha g)), the same rounding as theta - alpha g. A gradient
    # autograd returned as an expanded or shared tensor (stride 0, the same storage twice) gets its own memory.
    seen: set[int] = set()

    def own(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        t = t if key not in seen and 0 not in t.stride() else t.clone()
        seen.add(key)
        return t

    return {k: own(gk).mul_(-alpha).add_(params[k]) for k, gk in zip(params, g)}


def meta_gradient(
    model,
    params: Params,
    x: torch.Tensor,
    vb: dict[str, torch.Tensor],
    w: torch.Tensor,
    alpha: float,
    mode: str = "fd",
    fd_eps: float = 0.0,
    with_before: bool = True,
    v: Params | None = None,
    adam: AdamMoments | None = None,
) -> MetaGrad:
    """dR/dw_i for the micro-batch ``x`` with weights ``w`` (see the module docstring). ``fd_eps``: the fd
    perturbation's norm (0: ``default_fd_eps``). ``with_before``: also R(theta), a validation forward the
    gradient does not need (diagnostics). ``v``: the boundary's v (``reward_gradient``; meta.v=boundary) instead
    of grad L_val(theta*) on ``vb``: no lookahead, no validation pass. ``adam``: the optimizer state of an
    AdamW lookahead (meta.lookahead=adam); None: the paper's SGD lookahead."""
    if mode == "unrolled":
        if adam is not None:
            raise ValueError("meta.grad_mode=unrolled is the SGD lookahead's reference; the AdamW lookahead's is "
                             "finite differences through torch's AdamW (tests, tools/meta_diagnostic.py)")  # fmt: skip
        return _unrolled(model, params, x, vb, w, alpha)
    before = None
    if with_before:
        with torch.no_grad():
            before = val_loss(model, params, vb).item()
    scale, after = alpha, None
    if adam is not None:
        star, jac = adam_lookahead(model, params, x, w, alpha, adam, with_star=v is None)
        scale = alpha / x.shape[0]
    elif v is None:
        star, jac = lookahead(model, params, x, w, alpha), None
    if v is None:
        ps = {k: t.requires_grad_(True) for k, t in star.items()}
        with _no_recompute(model):
            r = val_loss(model, ps, vb)
            v = dict(zip(ps, torch.autograd.grad(r, list(ps.values()))))
        after = r.item()
        del ps, r  # theta* is no longer needed: at most theta, v and one perturbed copy are alive from here
    if adam is not None:
        del star
        v = {k: t * jac[k] for k, t in v.items()}  # dR/dw_i = -(alpha / B) <v * J, grad L_i>
        del jac
    c = inner_products(model, params, x, v, mode, fd_eps)
    return MetaGrad(-scale * c, before, after)


def reward_gradient(model, params: Params, batches) -> tuple[Params, torch.Tensor]:
    """The gradient at ``params`` of the summed per-example reward loss over ``batches`` (validation batches), and
    [that sum, the number of examples] in fp64: one rank's share of v = grad R(theta) over the whole reward part
    (Eq. 5's sum). Zeros where the rank has no batch."""
    tot = torch.zeros(2, dtype=torch.float64)
    # summed in fp32 at least: a bf16 running sum would drop most of each batch's share
    v = {k: torch.zeros_like(t, dtype=torch.promote_types(t.dtype, torch.float32)) for k, t in params.items()}
    with _differentiable(model, params) as p:
        for vb in batches:
            n = vb["input_ids"].shape[0]
            r = val_loss(model, p, vb) * n
            r.backward()  # (not autograd.grad: reentrant activation checkpointing needs backward)
            for k, t in p.items():
                if t.grad is not None:
                    v[k] += t.grad
                    t.grad = None
            tot += torch.tensor([r.item(), n], dtype=torch.float64)
    return v, tot


def inner_products(model, params: Params, x: torch.Tensor, v: Params, mode: str, fd_eps: float) -> torch.Tensor:
    """c_i = <v, grad L_i(params)> for every sample of x. [B]"""
    if mode == "fd":
        # perturbation of norm fd_eps along v; central difference error is O(eps^2)
        eps = (fd_eps or default_fd_eps(params)) / _norm(v)
        with torch.no_grad():
            up = train_losses(model, _axpy(eps, v, params), x)
            dn = train_losses(model, _axpy(-eps, v, params), x)
        return (up - dn) / (2 * eps)
    if mode == "per_sample":
        out = []
        with _differentiable(model, params) as p:
            for i in range(x.shape[0]):
                gi = torch.autograd.grad(train_losses(model, p, x[i : i + 1])[0], list(p.values()))
                out.append(sum((g * v[k]).sum() for g, k in zip(gi, p)))
        return torch.stack(out)
    if mode == "jvp":
        names = list(params)

        def f(*flat):
            return train_losses(model, dict(zip(names, flat)), x)

        _, c = torch.func.jvp(f, tuple(params[k] for k in names), tuple(v[k] for k in names))
        return c
    raise ValueError(f"meta.grad_mode={mode!r}: unknown")


def _unrolled(model, params: Params, x, vb, w, alpha) -> MetaGrad:
    """Reference: differentiate R(theta*(w)) w.r.t. w through the lookahead with create_graph."""
    wl = w.detach().clone().requires_grad_(True)
    p = {k: t.detach().requires_grad_(True) for k, t in params.items()}
    g = torch.autograd.grad((wl * train_losses(model, p, x)).sum(), list(p.values()), create_graph=True)
    star = {k: params[k] - alpha * gk for k, gk in zip(p, g)}
    r = val_loss(model, star, vb)
    (dw,) = torch.autograd.grad(r, wl)
    with torch.no_grad():
        before = val_loss(model, params, vb).item()
    return MetaGrad(dw.detach(), before, r.item())


def dwm_surrogate(w: torch.Tensor, dR_dw: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient w.r.t. the DWM parameters is dR/d theta_w (minimizing R)."""
    return (dR_dw.detach().to(w.dtype) * w).sum()
