"""Every meta-gradient mode against unrolled autograd through theta*, tiny model in float64."""

import copy

import pytest
import torch

from dwmtrain.meta.metagrad import FD_EPS, AdamMoments, default_fd_eps, dwm_surrogate, lm_params, meta_gradient
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.models.lm import build_lm
from dwmtrain.models.spec import ModelSpec


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    lm = build_lm(ModelSpec.from_preset("tiny"), "eager", seed=0).double().eval().requires_grad_(False)
    dwm = DataWeightingModel(DWMArch("tiny", 512, 16, attn_implementation="eager")).double()
    torch.nn.init.normal_(dwm.fc2.weight, std=0.5)
    x = torch.randint(0, 512, (8, 16))
    vb_ids = torch.randint(0, 512, (4, 12))
    labels = torch.full_like(vb_ids, -100)
    labels[:, -3:] = vb_ids[:, -3:]  # target tokens only, as LAMBADA
    vb = {"input_ids": vb_ids, "attention_mask": torch.ones_like(vb_ids), "labels": labels}
    return lm, dwm, x, vb


def dwm_grad(dwm, x, g):
    dwm.zero_grad()
    dwm_surrogate(dwm(x), g.dR_dw).backward()
    return torch.cat([p.grad.flatten() for p in dwm.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode, tol", [("per_sample", 1e-6), ("jvp", 1e-6), ("fd", 1e-6)])
def test_modes_match_unrolled_autograd(setup, mode, tol):
    lm, dwm, x, vb = setup
    params = lm_params(lm)
    w = dwm(x).detach()
    alpha = 0.5
    ref = meta_gradient(lm, params, x, vb, w, alpha, "unrolled")
    got = meta_gradient(lm, params, x, vb, w, alpha, mode)  # fd: the default eps for fp64
    err_w = ((got.dR_dw - ref.dR_dw).norm() / ref.dR_dw.norm()).item()
    g_ref, g_got = dwm_grad(dwm, x, ref), dwm_grad(dwm, x, got)
    err = ((g_got - g_ref).norm() / g_ref.norm()).item()
    print(f"meta-gradient mode {mode}: relative error of dR/dw {err_w:.2e}, of the DWM gradient {err:.2e}")
    assert err < tol and err_w < tol
    assert got.val_after == pytest.approx(ref.val_after, rel=1e-10)
    assert ref.dR_dw.abs().max() > 0


def test_finite_difference_error_shrinks_with_eps(setup):
    lm, dwm, x, vb = setup
    params, w = lm_params(lm), dwm(x).detach()
    ref = meta_gradient(lm, params, x, vb, w, 0.5, "unrolled").dR_dw
    errs = [
        ((meta_gradient(lm, params, x, vb, w, 0.5, "fd", fd_eps=e).dR_dw - ref).norm() / ref.norm()).item()
        for e in (1e-1, 1e-2)
    ]
    assert errs[1] < errs[0] / 10  # O(eps^2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_default_fd_eps_is_near_the_most_accurate_for_the_dtype(setup, dtype):
    """meta.fd_eps=0 picks the perturbation by dtype and parameter norm (FD_EPS): within 3x of the best error
    over a grid of eps, against the exact fp64 meta-gradient."""
    lm, dwm, x, vb = setup
    params, w = lm_params(lm), dwm(x).detach()
    exact = meta_gradient(lm, params, x, vb, w, 0.5, "per_sample").dR_dw
    lm_d = copy.deepcopy(lm).to(dtype)
    params_d = lm_params(lm_d)

    def err(eps):
        got = meta_gradient(lm_d, params_d, x, vb, w.to(dtype), 0.5, "fd", fd_eps=eps).dR_dw.double()
        return ((got - exact).norm() / exact.norm()).item()

    eps = default_fd_eps(params_d)
    norm = torch.sqrt(sum(p.square().sum() for p in params.values())).item()
    assert eps == pytest.approx(max(FD_EPS[dtype][0] * norm, FD_EPS[dtype][1]), rel=1e-2)
    grid = [err(e) for e in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)]
    assert err(0.0) == err(eps) <= 3 * min(grid), (err(eps), grid)
    assert err(eps) < (2e-3 if dtype == torch.float32 else 1e-1)


def test_fused_attention_modes_run_without_double_backward():
    """fd and per_sample need only first-order autograd, so fused SDPA kernels are fine."""
    torch.manual_seed(1)
    lm = build_lm(ModelSpec.from_preset("tiny"), "sdpa", seed=0).eval().requires_grad_(False)
    x = torch.randint(0, 512, (8, 16))
    vb = {"input_ids": x[:2], "attention_mask": torch.ones_like(x[:2]), "labels": x[:2]}
    w = torch.ones(8)
    a = meta_gradient(lm, lm_params(lm), x, vb, w, 0.1, "fd").dR_dw
    b = meta_gradient(lm, lm_params(lm), x, vb, w, 0.1, "per_sample").dR_dw
    assert torch.allclose(a, b, rtol=0.05, atol=1e-4 * b.abs().max().item())


def test_lookahead_step_lowers_val_loss_along_val_gradient(setup):
    """Sanity: weighting toward samples whose gradients align with validation lowers R."""
    lm, dwm, x, vb = setup
    params = lm_params(lm)
    g = meta_gradient(lm, params, x, vb, torch.ones(8, dtype=torch.float64), 0.5, "per_sample")
    better = torch.ones(8, dtype=torch.float64) - 0.5 * torch.sign(g.dR_dw)
    g2 = meta_gradient(lm, params, x, vb, better, 0.5, "per_sample")
    assert g2.val_after < g.val_after


def test_meta_step_at_world_size_1_follows_the_exact_dwm_gradient(setup):
    """meta_step = one optimizer step of the DWM on the unrolled reference gradient (no process group)."""
    import copy
    from types import SimpleNamespace

    from dwmtrain.meta.update import Lookahead, meta_step

    lm, dwm0, x, vb = setup
    dwm = copy.deepcopy(dwm0)
    params = lm_params(lm)
    ref = meta_gradient(lm, params, x, vb, dwm(x).detach(), 0.5, "unrolled")
    g_ref = dwm_grad(copy.deepcopy(dwm0), x, ref)
    before = torch.cat([p.detach().flatten().clone() for p in dwm.parameters()])
    opt = torch.optim.SGD(dwm.parameters(), lr=1e-3)
    mc = SimpleNamespace(grad_mode="per_sample", fd_eps=1e-2, normalize_grad=False, spread_penalty=0.0)
    rec = meta_step(dwm, opt, lm, params, x, vb, Lookahead(0.5), mc)
    after = torch.cat([p.detach().flatten() for p in dwm.parameters()])
    assert torch.allclose(after - before, -1e-3 * g_ref, rtol=1e-6, atol=1e-12)
    assert rec["grad_norm"] == pytest.approx(g_ref.norm().item(), rel=1e-6)
    assert rec["val_loss_theta_star"] == pytest.approx(ref.val_after, rel=1e-10)
    assert rec["val_loss_theta"] == pytest.approx(ref.val_before, rel=1e-10)
    assert rec["w_min"] < 1 < rec["w_max"] and 1 < rec["weight_ess"] < 8


def test_normalized_meta_gradient_is_the_same_direction_at_a_known_scale(setup):
    """normalize_grad: sum(w) = B is constant, so centring dR/dw changes nothing; the scale is 1 / (B std)."""
    import copy
    from types import SimpleNamespace

    from dwmtrain.meta.update import Lookahead, meta_step

    lm, dwm0, x, vb = setup
    dwm, params = copy.deepcopy(dwm0), lm_params(lm)
    ref = meta_gradient(lm, params, x, vb, dwm(x).detach(), 0.5, "per_sample")
    g_ref = dwm_grad(copy.deepcopy(dwm0), x, ref)
    before = torch.cat([p.detach().flatten().clone() for p in dwm.parameters()])
    opt = torch.optim.SGD(dwm.parameters(), lr=1e-3)
    mc = SimpleNamespace(grad_mode="per_sample", fd_eps=1e-2, normalize_grad=True, spread_penalty=0.0)
    meta_step(dwm, opt, lm, params, x, vb, Lookahead(0.5), mc)
    after = torch.cat([p.detach().flatten() for p in dwm.parameters()])
    scale = 1.0 / (8 * ref.dR_dw.std(unbiased=False).item())
    assert torch.allclose(after - before, -1e-3 * scale * g_ref, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("spread_penalty, collapses", [(0.0, True), (0.3, False)])
def test_the_spread_guard_prevents_a_constructed_collapse(setup, spread_penalty, collapses):
    """Adam at lr 0.1 on the DWM head, always the same micro-batch: unguarded, the linear meta-objective drives the
    weights onto one sample; the guard's quadratic price on var(log w) keeps them spread."""
    import copy
    from types import SimpleNamespace

    from dwmtrain.meta.update import Lookahead, meta_step

    lm, dwm0, x, vb = setup
    dwm, params = copy.deepcopy(dwm0), lm_params(lm)
    dwm.backbone.requires_grad_(False)
    opt = torch.optim.Adam([p for p in dwm.parameters() if p.requires_grad], lr=0.1)
    mc = SimpleNamespace(grad_mode="per_sample", fd_eps=1e-2, normalize_grad=True, spread_penalty=spread_penalty)
    for _ in range(30):
        rec = meta_step(dwm, opt, lm, params, x, vb, Lookahead(0.5), mc)
    if collapses:
        assert rec["weight_ess"] < 1.1 and rec["w_max"] > 7.5, rec
    else:
        assert rec["weight_ess"] > 5 and rec["w_max"] < 3, rec


def test_agreement_of_logits_with_the_meta_gradient():
    from dwmtrain.meta.update import agreement

    g = torch.tensor([0.3, -0.1, 0.2, -0.4, 0.0, 0.1, -0.2, 0.5])
    assert agreement(-2 * g + 1, g) == pytest.approx(1.0)  # ranks as -dR/dw does
    assert agreement(g, g) == pytest.approx(-1.0)
    assert agreement(torch.zeros(8), g) == 0.0  # a uniform DWM agrees with nothing


def test_the_logging_forward_is_optional_and_changes_nothing(setup):
    lm, dwm, x, vb = setup
    params = lm_params(lm)
    w = dwm(x).detach()
    a = meta_gradient(lm, params, x, vb, w, 0.5, "fd", with_before=True)
    b = meta_gradient(lm, params, x, vb, w, 0.5, "fd", with_before=False)
    assert b.val_before is None and a.val_before is not None
    assert torch.equal(a.dR_dw, b.dR_dw) and a.val_after == b.val_after


def test_the_chunked_losses_equal_the_full_logits_path(setup):
    """The meta job's memory-saving losses (the fused weighted loss in the lookahead, per-sample losses a chunk of
    logits at a time in the fd forwards, the validation head only at the labelled positions, here different in
    every example) against the full [B, T, V] logits, fp64: the validation loss and dR/dw in fd and per_sample."""
    from dwmtrain.meta.metagrad import val_loss

    lm, dwm, x, vb = setup
    vb = dict(vb, labels=torch.full_like(vb["labels"], -100))
    for i, t in enumerate((3, 7, 11, 5)):  # a target of one or two tokens, somewhere else in each example
        vb["labels"][i, t : t + 1 + i % 2] = vb["input_ids"][i, t : t + 1 + i % 2]
    full = copy.deepcopy(lm)
    full.loss_chunk_tokens, lm.loss_chunk_tokens = 0, 5  # 5: several chunks per micro-batch
    params, w = lm_params(lm), dwm(x).detach()
    assert val_loss(lm, params, vb).item() == pytest.approx(val_loss(full, lm_params(full), vb).item(), rel=1e-12)
    for mode in ("fd", "per_sample"):
        a = meta_gradient(lm, params, x, vb, w, 0.5, mode).dR_dw
        b = meta_gradient(full, lm_params(full), x, vb, w, 0.5, mode).dR_dw
        assert ((a - b).norm() / b.norm()).item() < (1e-8 if mode == "fd" else 1e-10), mode  # fd: / 2 eps
    lm.loss_chunk_tokens = 1024


def _halves(vb: dict) -> list[dict]:
    return [{k: t[:1] for k, t in vb.items()}, {k: t[1:] for k, t in vb.items()}]


@pytest.mark.parametrize("mode", ["per_sample", "fd", "jvp"])
def test_the_boundarys_v_is_the_whole_sets_gradient_and_the_lookahead_as_alpha_vanishes(setup, mode):
    """meta.v=boundary: v summed over the reward set in any batches is the gradient of its mean loss; with it,
    dR/dw is the lookahead's in the limit alpha -> 0 (theta* = theta), and -alpha <v, grad L_i> at any alpha."""
    from dwmtrain.meta.metagrad import reward_gradient, val_loss

    lm, dwm, x, vb = setup
    params, w = lm_params(lm), dwm(x).detach()
    v, tot = reward_gradient(lm, params, _halves(vb))  # batches of 1 and 3 examples: the sum over examples
    v = {k: t / tot[1] for k, t in v.items()}
    whole, _ = reward_gradient(lm, params, [vb])
    assert tot[1] == 4 and tot[0] / 4 == pytest.approx(val_loss(lm, params, vb).item(), rel=1e-12)
    assert all(torch.allclose(v[k], whole[k] / 4, rtol=1e-10, atol=1e-14) for k in v)
    errs = {}
    for alpha in (1e-4, 1e-5, 1e-6, 0.5):
        got = meta_gradient(lm, params, x, None, w, alpha, mode, v=v, with_before=False)
        ref = meta_gradient(lm, params, x, vb, w, alpha, "unrolled")  # the lookahead on the same four examples
        errs[alpha] = ((got.dR_dw - ref.dR_dw).norm() / ref.dR_dw.norm()).item()
        exact = meta_gradient(lm, params, x, None, w, alpha, "per_sample", v=v, with_before=False).dR_dw
        assert got.val_after is None and torch.allclose(got.dR_dw, exact, rtol=1e-5, atol=1e-12 * alpha)
    # the error is theta*'s shift, O(alpha): tenfold smaller per tenfold smaller alpha; at alpha 0.5 it is not small
    assert 8 < errs[1e-4] / errs[1e-5] < 12 and 8 < errs[1e-5] / errs[1e-6] < 12 and errs[1e-6] < 1e-4, errs
    assert errs[0.5] > 0.1, errs


def test_a_meta_step_with_the_boundarys_v_records_no_theta_star(setup):
    import copy
    from types import SimpleNamespace

    from dwmtrain.meta.metagrad import reward_gradient
    from dwmtrain.meta.update import Lookahead, meta_step

    lm, dwm0, x, vb = setup
    params = lm_params(lm)
    v, tot = reward_gradient(lm, params, [vb])
    v = {k: t / tot[1] for k, t in v.items()}
    mc = SimpleNamespace(grad_mode="per_sample", fd_eps=1e-2, normalize_grad=False, spread_penalty=0.0)
    dwm = copy.deepcopy(dwm0)
    rec = meta_step(dwm, torch.optim.SGD(dwm.parameters(), lr=1e-3), lm, params, x, vb, Lookahead(0.5, v), mc, True)
    assert "val_loss_theta_star" not in rec and rec["val_loss_theta"] == pytest.approx(tot[0].item() / 4)
    assert rec["grad_norm"] > 0


def test_the_boundarys_v_of_a_bf16_lm_is_summed_in_fp32(setup):
    from dwmtrain.meta.metagrad import reward_gradient

    lm, _, _, vb = setup
    ref, _ = reward_gradient(lm, lm_params(lm), [vb])
    bf = copy.deepcopy(lm).to(torch.bfloat16)
    singles = [{k: t[i : i + 1] for k, t in vb.items()} for i in range(4)]
    v, tot = reward_gradient(bf, lm_params(bf), singles)
    assert all(t.dtype == torch.float32 for t in v.values()) and tot[1] == 4
    num = sum(((v[k].double() - ref[k]) ** 2).sum() for k in v) ** 0.5
    den = sum((ref[k] ** 2).sum() for k in ref) ** 0.5
    assert num / den < 0.05  # bf16 forwards and backwards, an fp32 sum


def _moments(params, step=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    m = {k: 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}
    s = {k: 1e-6 * torch.rand(t.shape, generator=g, dtype=t.dtype) for k, t in params.items()}
    return AdamMoments(m, s, step=step, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


@pytest.mark.parametrize("mode", ["per_sample", "fd"])
def test_the_adamw_lookahead_is_exact_against_torchs_adamw(setup, mode):
    """meta.lookahead=adam: dR/dw_i against central differences in w_i through torch.optim.AdamW's own step from the
    same moments (an independent implementation: its bias corrections, eps and decoupled weight decay), fp64."""
    from dwmtrain.analysis.diagnostic import true_effects
    from dwmtrain.meta.rollout import RealStep

    lm, _, x, vb = setup
    params = lm_params(lm)
    adam, alpha, w = _moments(params), 1e-3, torch.ones(x.shape[0], dtype=torch.float64)
    got = meta_gradient(lm, params, x, vb, w, alpha, mode, adam=adam).dR_dw
    ref = -true_effects(lm, params, x, RealStep(adam, alpha), [vb], h=1e-4)
    err = ((got - ref).norm() / ref.norm()).item()
    sgd = meta_gradient(lm, params, x, vb, w, alpha, mode).dR_dw / x.shape[0]  # the same step size per sample
    print(
        f"adam lookahead ({mode}) vs torch AdamW finite differences: relative error {err:.2e}; "
        f"the SGD lookahead's {((sgd - ref).norm() / ref.norm()).item():.2e}"
    )
    assert err < 1e-5 and ((sgd - ref).norm() / ref.norm()).item() > 0.1  # Adam's geometry is not SGD's


def test_the_adamw_lookahead_with_the_boundarys_v_is_its_alpha_to_0_limit(setup):
    from dwmtrain.meta.metagrad import reward_gradient

    lm, _, x, vb = setup
    params = lm_params(lm)
    adam, w = _moments(params), torch.ones(x.shape[0], dtype=torch.float64)
    v, tot = reward_gradient(lm, params, [vb])
    v = {k: t / tot[1] for k, t in v.items()}
    at_v = meta_gradient(lm, params, x, None, w, 1e-7, "per_sample", with_before=False, v=v, adam=adam).dR_dw
    step = meta_gradient(lm, params, x, vb, w, 1e-7, "per_sample", adam=adam).dR_dw
    assert ((at_v - step).norm() / step.norm()).item() < 1e-4


def test_the_adamw_update_and_its_derivative_match_autograd():
    g = torch.randn(50, dtype=torch.float64, requires_grad=True)
    m, s = 0.01 * torch.randn(50, dtype=torch.float64), 1e-4 * torch.rand(50, dtype=torch.float64)
    s[:5] = 0.0  # a parameter with no history
    adam = AdamMoments({"p": m}, {"p": s}, step=3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0)
    u, jac = adam.update("p", g)
    (ref,) = torch.autograd.grad(u.sum(), g)  # u is elementwise in g: its Jacobian's diagonal is this gradient
    assert torch.allclose(jac, ref, rtol=1e-10, atol=0)
    zero = adam.update("p", torch.zeros(50, dtype=torch.float64))[1]
    assert torch.isfinite(zero).all()


def test_a_rollout_is_torchs_adamw_and_leaves_the_checkpoint_as_it_was(setup):
    """One real step of meta.rollout (torch's AdamW) equals the AdamW lookahead's own formula, and neither the
    parameters nor the moments it started from are changed."""
    from dwmtrain.meta.metagrad import adam_lookahead
    from dwmtrain.meta.rollout import RealStep, rollout

    lm, _, x, _ = setup
    params = lm_params(lm)
    adam = _moments(params)
    before = {k: t.clone() for k, t in adam.exp_avg.items()}
    after = rollout(lm, params, RealStep(adam, 1e-3), [x])
    star, _ = adam_lookahead(lm, params, x, torch.ones(x.shape[0], dtype=torch.float64), 1e-3, adam)
    assert all(torch.allclose(after[k], star[k], rtol=0, atol=1e-12) for k in params)
    assert all(torch.equal(adam.exp_avg[k], before[k]) for k in before)
    assert all(params[k].data_ptr() == p.data_ptr() for k, p in lm.named_parameters())  # theta untouched


def test_the_strength_is_the_scale_whose_rollout_ends_with_the_lowest_reward_loss(setup):
    from dwmtrain.meta.rollout import RealStep, choose_strength, reward_loss, rollout

    lm, dwm, x, vb = setup
    params, step = lm_params(lm), RealStep(_moments(lm_params(lm)), 3e-2, clip=1.0)
    xs = [x, x.flip(0)]
    fc2 = dwm.fc2.weight.clone()
    got = choose_strength(lm, params, step, dwm, [0.0, 1.0, 4.0], xs, [vb])
    assert got["reward"][0] == pytest.approx(reward_loss(lm, rollout(lm, params, step, xs), [vb]), abs=1e-12)
    assert len(set(got["reward"])) == 3  # the weights matter
    assert got["chosen"] == [0.0, 1.0, 4.0][min(range(3), key=lambda i: got["reward"][i])]
    assert torch.equal(dwm.fc2.weight, fc2)
