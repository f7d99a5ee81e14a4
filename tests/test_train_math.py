import pytest
import torch

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
