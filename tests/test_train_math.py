import pytest
import torch

from dwmtrain.checkpoint import ResumeError, check_compatible
from dwmtrain.errors import ConfigError
from dwmtrain.lr_schedule import lr_multiplier
from dwmtrain.models.loss import per_sample_loss, weighted_loss


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
    from dwmtrain.stages.weighting import DomainWeights

    ds = TokenDataset(prepared)
    drop = ds.domain_names[0]
    idx = list(range(8))
    w = DomainWeights.oracle(ds, [drop]).weights(idx)
    keep = [ds.domain(i) != drop for i in idx]
    assert [bool(x) for x in w] == keep and w.sum().item() == pytest.approx(8 if any(keep) else 0)
    with pytest.raises(ConfigError, match="meta.oracle.drop"):
        DomainWeights.oracle(ds, ["no-such-domain"])


def test_domain_factors_weigh_each_domain_and_keep_the_mean_at_one(prepared):
    from dwmtrain.config import load_config
    from dwmtrain.data.dataset import TokenDataset
    from dwmtrain.errors import ConfigError
    from dwmtrain.stages.weighting import DomainWeights

    ds = TokenDataset(prepared)
    up = ds.domain(0)
    cfg = load_config("tiny", ["meta.mode=domain_weights", f"meta.domain_weights.factors={{{up}: 4}}"])
    assert cfg.meta.domain_weights.factors == {up: 4.0}
    for start in range(0, 64, 8):
        idx = list(range(start, start + 8))
        w = DomainWeights(ds, cfg.meta.domain_weights.factors, "f", "domains").weights(idx)
        raw = [4.0 if ds.domain(i) == up else 1.0 for i in idx]
        assert w.tolist() == pytest.approx([8 * r / sum(raw) for r in raw]) and w.mean().item() == pytest.approx(1)
    for bad, field in [("meta.domain_weights.factors={a: -1}", "factors.a"), ("meta.domain_weights.factors=[1]",
                       "expected a mapping"), ("meta.mode=domain_weights", "needs {domain: factor}")]:  # fmt: skip
        with pytest.raises(ConfigError, match=field):
            load_config("tiny", [bad])
    with pytest.raises(ConfigError, match="not among the data's domains"):
        DomainWeights(ds, {"nope": 2.0}, "meta.domain_weights.factors", "domains")


def test_experiment_configs_inherit_their_base(tmp_path):
    from dwmtrain.config import load_config

    base = load_config("paper_370m")
    cfg = load_config("experiments/paper/dsir_dwm")
    assert (cfg.meta.mode, cfg.meta.transfer.dwm_run, cfg.data.train_data) == (
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


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_fused_weighted_loss_equals_the_full_logits_path(dtype, tol, chunk):
    from dwmtrain.models.loss import fused_weighted_loss, per_sample_loss, weighted_loss

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 4, 33, 16, 50
    h = torch.randn(B, T, H, dtype=dtype, generator=g).requires_grad_()
    W = torch.randn(V, H, dtype=dtype, generator=g).requires_grad_()
    lab = torch.randint(0, V, (B, T), generator=g)
    lab[1, 5:9], lab[2, 1:] = -100, -100  # ignored tokens; sample 2 scores none
    w = torch.rand(B, generator=g, dtype=dtype) * 2
    want_ps = per_sample_loss(h @ W.t(), lab)
    want = weighted_loss(want_ps, w)
    gh, gw = torch.autograd.grad(3.0 * want, (h, W))  # a scaled upstream gradient (gradient accumulation)
    loss, ps = fused_weighted_loss(h, W, lab, w, chunk=chunk)
    fh, fw = torch.autograd.grad(3.0 * loss, (h, W))
    assert not ps.requires_grad and ps[2] == 0
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert rel(loss, want) < tol and rel(ps, want_ps) < tol
    assert rel(fh, gh) < tol and rel(fw, gw) < tol


def test_the_lm_returns_the_weighted_objective_without_logits():
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.loss import per_sample_loss, weighted_loss
    from dwmtrain.models.spec import ModelSpec

    lm = build_lm(ModelSpec.from_preset("tiny", 512, 32), seed=0)
    lm.loss_chunk_tokens = 50
    x = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
    w = torch.linspace(0.2, 1.8, 8)
    want = weighted_loss(per_sample_loss(lm(input_ids=x).logits, x), w)
    want.backward()
    ref = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()
    loss, per = lm(input_ids=x, sample_weights=w)
    loss.backward()
    assert torch.allclose(loss, want, rtol=1e-6) and per.shape == (8,)
    for n, p in lm.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-7), n


def test_step_statistics_stay_on_the_device_until_reduced(monkeypatch):
    from dwmtrain.models.weights import weight_stats
    from dwmtrain.train.loop import StepStats

    mbs = [(torch.tensor([2.0, 4.0]), torch.tensor([0.5, 1.5])), (torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))]
    s = StepStats(["x", "y"])

    def host_sync(*a, **k):
        raise AssertionError("a host synchronisation inside the step")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__float__"):
            m.setattr(torch.Tensor, name, host_sync)
        for (losses, w), dom in zip(mbs, ([0, 1], [1, 1])):
            s.add(losses, w, torch.tensor(dom))
    stop, bad, r = s.agree(False, True)  # one process: the sums as they are
    assert (r["w_dom/x"], r["w_dom/y"]) == pytest.approx((0.5, 1.5 / 3))
    assert not stop and not bad
    assert r["loss"] == pytest.approx(((0.5 * 2 + 1.5 * 4) / 2 + 0) / 2)
    assert r["loss_unweighted"] == pytest.approx((3 + 2) / 2)
    assert r["w_ess"] == pytest.approx((weight_stats(mbs[0][1])["ess"] + 0) / 2)
    assert (r["w_min"], r["w_max"]) == (0.0, 1.5)


def test_nonfinite_steps_are_counted_and_too_many_in_a_row_stop_naming_step_stage_and_dwm():
    from dwmtrain.errors import DWMTrainError
    from dwmtrain.train.nonfinite import NonFiniteCount, NonFiniteError

    c = NonFiniteCount(stop_after=2)
    for bad in (False, True, False, True):
        c.record(bad)
        c.check(4, 2, "stage2:abc", "step0000004")  # never two in a row yet
    assert (c.total, c.streak) == (2, 1)
    c.record(True)
    with pytest.raises(NonFiniteError) as e:
        c.check(5, 2, "stage2:abc", "step0000004")
    msg = str(e.value)
    assert isinstance(e.value, DWMTrainError) and "\n" not in msg
    assert "steps 4-5, stage 2, DWM stage2:abc" in msg and "resumes from checkpoint step0000004" in msg


def test_the_lookahead_alpha_follows_the_lr_scheduler_not_the_step_count():
    from dwmtrain.checkpoint import RunState
    from dwmtrain.config import load_config
    from dwmtrain.lr_schedule import scheduled_lr
    from dwmtrain.meta.update import lookahead_lr

    cfg = load_config(None, ["stages.total_steps=100", "optimizer.warmup_steps=10"])
    state = RunState(step=40, stage=3, consumed_samples=0, skipped_steps=3)  # 3 updates skipped: LR at 37
    assert state.scheduler_steps == 37
    assert lookahead_lr(cfg, state.scheduler_steps) == scheduled_lr(cfg, 37) != scheduled_lr(cfg, 40)
    fixed = load_config(None, ["meta.lookahead_lr=0.01"])
    assert lookahead_lr(fixed, 37) == 0.01


def test_a_run_that_draws_more_than_its_data_says_how_often_and_from_which_step():
    from dwmtrain.train.setup import epochs_note

    assert epochs_note(100, 32, 3200) == "" and epochs_note(100, 32, 10_000) == ""
    note = epochs_note(100, 32, 3000)  # 3,200 drawn: the 94th step is the first of the second epoch
    assert "3,200 sequences from 3,000" in note and "1.07 epochs" in note and "from step 94" in note
    # the paper's 370M config (7,500 steps of 4,096 x 1,024 tokens) on a 30B-token selection
    note = epochs_note(7500, 4096, 30_000_000_000 // 1024)
    assert "1.05 epochs" in note and "from step 7153" in note


def test_mfu_peaks_by_device_name_and_model_flops_with_attention(monkeypatch):
    """The dense bf16 peak of each GPU by the name torch reports (a PCIe H100 is not an SXM5 one), and the FLOPs
    MFU divides by: 6N plus PaLM's 12 L H T attention, the DWM's forward beside it."""
    from dwmtrain.accelerators import peak_flops
    from dwmtrain.models.spec import ModelSpec, attention_flops_per_token, model_flops_per_token
    from dwmtrain.train.metrics import mfu

    monkeypatch.delenv("DWMTRAIN_PEAK_TFLOPS", raising=False)
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H100 NVL": 835, "NVIDIA H200": 989,
             "NVIDIA H200 NVL": 835, "NVIDIA A100-SXM4-80GB": 312, "NVIDIA A100 80GB PCIe": 312}  # fmt: skip
    assert {n: peak_flops(n) / 1e12 for n in names} == names
    assert peak_flops("cpu") is None and mfu(1e6, 1e9, 8, None) is None
    monkeypatch.setenv("DWMTRAIN_PEAK_TFLOPS", "100")
    assert peak_flops("anything") == 1e14
    spec = ModelSpec.from_preset("1.3b", 32000, 1024)  # 24 layers, 16 heads x 128
    assert attention_flops_per_token(spec, 1024, True) == 12 * 24 * 2048 * 1024
    assert attention_flops_per_token(spec, 1024, False) == 4 * 24 * 2048 * 1024
    assert model_flops_per_token(spec, 1024) == 6 * spec.num_parameters() + 12 * 24 * 2048 * 1024
    assert mfu(1e5, 1e10, 4, 1e15) == 1e15 / 4e15
