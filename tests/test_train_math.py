import pytest
import torch

from dwmtrain.errors import ConfigError
from dwmtrain.train.checkpoint import ResumeError, check_compatible
from dwmtrain.train.loss import lr_multiplier, per_sample_loss, weighted_loss


def test_per_sample_and_weighted_loss_match_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7, requires_grad=True)
    x = torch.randint(0, 7, (3, 5))
    L = per_sample_loss(logits, x)
    lp = logits.log_softmax(-1)
    want = torch.stack([-lp[b, torch.arange(4), x[b, 1:]].mean() for b in range(3)])
    assert torch.allclose(L, want)
    w = torch.tensor([0.5, 2.0, 0.5])
    loss = weighted_loss(L, w)
    assert torch.allclose(loss, (0.5 * want[0] + 2 * want[1] + 0.5 * want[2]) / 3)
    (g,) = torch.autograd.grad(loss, logits, retain_graph=True)
    gs = [torch.autograd.grad(L[i], logits, retain_graph=True)[0] for i in range(3)]
    assert torch.allclose(g, sum(w[i] * gs[i] for i in range(3)) / 3)
    assert torch.allclose(weighted_loss(L, torch.ones(3)), L.mean())


def test_lr_schedule_warmup_then_cosine():
    m = [lr_multiplier(s, 100, 10, 0.1) for s in range(100)]
    assert m[0] == pytest.approx(0.1) and m[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(m[10:], m[11:]))
    assert m[-1] == pytest.approx(0.1, abs=1e-3)


def test_resume_compatibility():
    saved = {"model_preset": "tiny", "global_batch_size": 32, "tokenizer_sha256": "a", "total_steps": 10}
    assert check_compatible(saved, {**saved, "total_steps": 20}) == ["total_steps: 10 -> 20"]
    with pytest.raises(ResumeError, match=r"model.preset: checkpoint has 'tiny', now 'small'"):
        check_compatible(saved, {**saved, "model_preset": "small"})
    with pytest.raises(ResumeError, match="data.tokenizer"):
        check_compatible(saved, {**saved, "tokenizer_sha256": "b"})


def test_weight_alarm_names_what_collapsed():
    from dwmtrain.train.loop import weight_alarm

    ok = {"w_ess": 7.9, "w_max": 1.2}
    assert weight_alarm(ok, 8, 0.5, 0.5) == ""
    assert "mean ESS 1.50 < 0.5 x 8" in weight_alarm({"w_ess": 1.5, "w_max": 1.2}, 8, 0.5, 0.5)
    assert "max weight 7.00 > 0.5 x 8" in weight_alarm({"w_ess": 6.0, "w_max": 7.0}, 8, 0.5, 0.5)


def test_domain_oracle_zeroes_the_dropped_domain(prepared):
    from dwmtrain.data.dataset import TokenDataset
    from dwmtrain.errors import ConfigError
    from dwmtrain.stages.handoff import DomainOracle

    ds = TokenDataset(prepared)
    drop = ds.domain_names[0]
    idx = list(range(8))
    w = DomainOracle(ds, [drop]).weights(idx)
    keep = [ds.domain(i) != drop for i in idx]
    assert [bool(x) for x in w] == keep and w.sum().item() == pytest.approx(8 if any(keep) else 0)
    with pytest.raises(ConfigError, match="meta.oracle_drop"):
        DomainOracle(ds, ["no-such-domain"])


def test_experiment_configs_inherit_their_base(tmp_path):
    from dwmtrain.config import load_config

    base = load_config("paper_370m")
    cfg = load_config("experiments/paper/dsir_dwm")
    assert (cfg.meta.mode, cfg.meta.dwm_run, cfg.data.train_data) == (
        "transfer",
        "/ckpt/370m-random_dwm",
        "/data/sp-dsir-1024",
    )
    assert cfg.optimizer == base.optimizer and cfg.deepspeed == base.deepspeed and cfg.data.seq_len == 1024
    (tmp_path / "a.yaml").write_text("base: b.yaml\nrun:\n  name: a\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere\n")
    with pytest.raises(ConfigError, match="base='nowhere'"):
        load_config(tmp_path / "c.yaml")
