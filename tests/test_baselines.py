"""The cheap baselines and the warm start: loss-based reweighting (meta.mode=loss_reweight, Sow et al. 2025) and a
DWM that weighs stage 1 and seeds the first meta-update (meta.init_dwm)."""

from __future__ import annotations

import math

import pytest
import torch

from dwmtrain.checkpoint.dwm_file import DWMFileError, save_dwm
from dwmtrain.config import load_config
from dwmtrain.distributed import Dist
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.models.loss import per_sample_loss, weighted_loss
from dwmtrain.models.weights import loss_rule_weights
from dwmtrain.rundir import RunDir
from dwmtrain.stages.weighting import FrozenDWM, LossReweighting, LossRule, Uniform

from .helpers import stage_boundary

ARCH = DWMArch("tiny", 512, 32)
D = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")


def by_hand(f: list[float], tau: float) -> list[float]:
    g = [math.exp((v - max(f)) / tau) for v in f]
    return [len(g) * v / sum(g) for v in g]


def test_loss_rules_weigh_as_the_paper_defines_them():
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])  # h = -1, -0.5, 0, 0.5, 1
    cases = {"linupper": [0.0, 0.5, 1.0, 1.0, 1.0], "quadratic": [0.0, 0.75, 1.0, 0.75, 0.0],
             "extremes": [1.0, 0.5, 0.0, 0.5, 1.0]}  # fmt: skip
    for rule, f in cases.items():
        for tau in (1.0, 0.25):
            w = loss_rule_weights(losses, rule, tau)
            torch.testing.assert_close(w, torch.tensor(by_hand(f, tau)), rtol=1e-6, atol=1e-6)
            assert w.mean().item() == pytest.approx(1.0)
    w = loss_rule_weights(losses, "linupper")
    assert w[0] < w[1] < w[2] == w[3] == w[4]  # the lowest losses down-weighted, the upper half alike
    # shifting or scaling the losses changes nothing (they are mapped onto [-1, 1] first)
    torch.testing.assert_close(loss_rule_weights(3 * losses + 7, "quadratic"), loss_rule_weights(losses, "quadratic"))
    assert torch.equal(loss_rule_weights(torch.full((8,), 2.5)), torch.ones(8))  # equal losses: uniform
    assert (loss_rule_weights(losses, "extremes", 1e4) - 1).abs().max() < 1e-3  # a large tau: uniform
    with pytest.raises(ValueError, match="loss rule 'top'"):
        loss_rule_weights(losses, "top")


def test_the_lm_head_weighs_a_micro_batch_by_its_own_losses_in_one_forward():
    """A LossRule passed as sample_weights: the same loss and gradients as weights computed from the per-sample
    losses first and passed in, with no second LM forward."""
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    lm = build_lm(ModelSpec.from_preset("tiny", 512, 32), "eager", seed=0).double()
    x = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    calls = []
    lm.model.register_forward_hook(lambda *_: calls.append(1))
    rule = LossRule("linupper", 0.5)
    loss, losses = lm(input_ids=x, sample_weights=rule)
    loss.backward()
    g_rule = [p.grad.clone() for p in lm.parameters()]
    assert len(calls) == 1 and rule.weights.shape == (8,) and rule.weights.std() > 0
    lm.zero_grad()
    with torch.no_grad():
        ref_losses = per_sample_loss(lm(input_ids=x).logits, x)
    w = loss_rule_weights(ref_losses, "linupper", 0.5)
    torch.testing.assert_close(rule.weights, w)
    ref, _ = lm(input_ids=x, sample_weights=w)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(losses, ref_losses)
    for a, b in zip(g_rule, (p.grad for p in lm.parameters())):
        torch.testing.assert_close(a, b)
    assert weighted_loss(ref_losses, w).item() == pytest.approx(loss.item())


def boundary_of(tmp_path, *ov):
    cfg = load_config(None, [f"run.run_dir={tmp_path}", *ov])
    return stage_boundary(cfg, RunDir(tmp_path))


def test_loss_reweighting_is_uniform_for_its_burn_in_then_a_rule_every_stage(tmp_path):
    h = boundary_of(tmp_path, "meta.mode=loss_reweight", "stages.total_steps=200", "meta.loss_reweight.rule=quadratic")
    x = torch.zeros(8, 32, dtype=torch.long)
    for stage in (1, 3):
        w = h.for_stage(stage)
        assert isinstance(w, LossReweighting) and w.version == "loss:quadratic:t1:from10" and w.from_step == 10
        assert torch.equal(w(x, list(range(8)), step=9), torch.ones(8))
        rule = w(x, list(range(8)), step=10)
        assert isinstance(rule, LossRule) and (rule.rule, rule.temperature) == ("quadratic", 1.0)
    nan = w(x, list(range(8)), step=10) * float("nan")  # the non-finite fault reaches a rule's weights too
    assert torch.isnan(nan(torch.arange(8.0))).all()
    with pytest.raises(Exception, match=r"micro_batch_size=1: meta.mode=loss_reweight weighs the samples"):
        load_config(None, ["meta.mode=loss_reweight", "deepspeed.micro_batch_size=1", "deepspeed.global_batch_size=1"])
    cfg = load_config(None, ["meta.mode=loss_reweight"])
    assert not cfg.meta.uses_dwm and load_config(None, []).meta.uses_dwm
    with pytest.raises(Exception, match=r"meta.loss_reweight.rule"):
        load_config(None, ["meta.mode=loss_reweight", "meta.loss_reweight.rule=top"])


def _dwm_file(path, arch=ARCH, seed=0):
    torch.manual_seed(seed)
    m = DataWeightingModel(arch)
    torch.nn.init.normal_(m.fc2.weight)
    return m, save_dwm(m, path, stage=3, lm_step=40)


def test_a_warm_start_weighs_stage_1_and_seeds_the_first_meta_update(tmp_path):
    from dwmtrain.meta.update import initial_dwm

    proxy = tmp_path / "proxy"
    m, meta = _dwm_file(RunDir(proxy).dwm(3))
    _dwm_file(RunDir(proxy).dwm(2), seed=1)
    for spec in (str(proxy), str(RunDir(proxy).dwm(3))):  # a run directory (its newest DWM), or the file
        h = boundary_of(tmp_path / "run", "meta.mode=bilevel", f"meta.init_dwm={spec}")
        w = h.for_stage(1)
        assert isinstance(w, FrozenDWM) and w.info["sha256"] == meta["sha256"]
        x = torch.randint(0, 512, (8, 32))
        torch.testing.assert_close(w(x, list(range(8))), m.eval()(x))
        cfg = load_config(None, [f"meta.init_dwm={spec}"])
        fitted, how = initial_dwm(cfg, ARCH, 2, RunDir(tmp_path / "run"), {})
        assert how == f"continued from {RunDir(proxy).dwm(3)}"
        assert all(torch.equal(a, b) for a, b in zip(fitted.state_dict().values(), m.state_dict().values()))
    assert isinstance(boundary_of(tmp_path / "cold", "meta.mode=bilevel").for_stage(1), Uniform)
    cfg = load_config(None, [f"run.run_dir={tmp_path / 'run'}", "meta.mode=bilevel"])  # the warm start dropped on
    resumed = stage_boundary(cfg, RunDir(tmp_path / "run"), {1: meta["sha256"]})  # a resume
    with pytest.raises(Exception, match=r"stage 1 was weighed by a DWM .*set meta.init_dwm"):
        resumed.for_stage(1)


def test_a_warm_start_of_another_architecture_or_nothing_is_refused_in_one_line(tmp_path):
    from dwmtrain.stages.modes import BilevelMode

    init_dwm_problems = BilevelMode().problems

    other = tmp_path / "other.safetensors"
    _dwm_file(other, DWMArch("tiny", 512, 32, attn_heads=2))
    cfg = load_config(None, [f"meta.init_dwm={other}", "model.vocab_size=512", "data.seq_len=32"])
    problems = init_dwm_problems(cfg)
    assert len(problems) == 1 and "another DWM architecture" in problems[0] and str(other) in problems[0]
    with pytest.raises(DWMFileError):  # and at the start of the run, before stage 1 is weighed
        boundary_of(tmp_path / "run", "meta.mode=bilevel", f"meta.init_dwm={other}").for_stage(1)
    missing = load_config(None, [f"meta.init_dwm={tmp_path / 'nowhere'}"])
    assert "neither a DWM file nor a run directory" in init_dwm_problems(missing)[0]
    with pytest.raises(Exception, match=r"meta.init_dwm.*goes with meta.mode=bilevel"):
        load_config(None, ["meta.mode=none", f"meta.init_dwm={other}"])
