import json
import math

import pytest
import torch

from dwmtrain.models.dwm import (
    DataWeightingModel,
    DWMArch,
    DWMFileError,
    load_dwm,
    load_dwm_state,
    normalize_weights,
    save_dwm,
    weight_stats,
)

ARCH = DWMArch("tiny", 512, 32)


def test_normalize_weights_mean_one_temperature_and_mix():
    z = torch.tensor([0.0, 1.0, 2.0, -1.0])
    w = normalize_weights(z)
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(w, 4 * torch.softmax(z, 0))
    hot, cold = normalize_weights(z, temperature=0.1), normalize_weights(z, temperature=10.0)
    assert hot.max() > w.max() > cold.max()
    assert torch.allclose(normalize_weights(z, uniform_mix=1.0), torch.ones(4))
    mixed = normalize_weights(z, uniform_mix=0.5)
    assert torch.allclose(mixed, 0.5 * w + 0.5) and mixed.min() >= 0.5


def test_weight_stats():
    s = weight_stats(torch.ones(8))
    assert s["ess"] == pytest.approx(8) and s["entropy"] == pytest.approx(torch.log(torch.tensor(8.0)).item())
    s = weight_stats(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
    assert s["ess"] == pytest.approx(1) and s["entropy"] == pytest.approx(0, abs=1e-6)


def test_fresh_dwm_uniform_and_permutation_equivariant():
    torch.manual_seed(0)
    m = DataWeightingModel(ARCH).eval()
    x = torch.randint(0, 512, (8, 32))
    assert torch.equal(m(x), torch.ones(8))
    torch.nn.init.normal_(m.fc2.weight)
    w = m(x)
    perm = torch.randperm(8)
    assert torch.allclose(m(x[perm]), w[perm], atol=1e-6)
    # batch-level: a sample's weight depends on the other samples too
    y = x.clone()
    y[1:] = torch.randint(0, 512, (7, 32))
    assert not torch.isclose(m(y)[0], w[0])


def test_save_load_roundtrip_and_checks(tmp_path):
    torch.manual_seed(1)
    m = DataWeightingModel(ARCH)
    torch.nn.init.normal_(m.fc2.weight)
    meta = save_dwm(m, tmp_path / "d.safetensors", stage=3, lm_step=120)
    side = json.loads((tmp_path / "d.safetensors.json").read_text())
    assert side["stage"] == 3 and side["lm_step"] == 120 and side["sha256"] == meta["sha256"]
    m2 = load_dwm(tmp_path / "d.safetensors", expect=ARCH)
    x = torch.randint(0, 512, (8, 32))
    assert torch.allclose(m.eval()(x), m2.eval()(x))

    with pytest.raises(DWMFileError, match="another architecture: backbone: file has 'tiny', run expects 'small'"):
        load_dwm_state(tmp_path / "d.safetensors", DWMArch("small", 512, 32))
    # the run's temperature / mix / context length do not matter to the tensors
    load_dwm_state(tmp_path / "d.safetensors", DWMArch("tiny", 512, 1024, temperature=2.0, uniform_mix=0.1))
    raw = bytearray((tmp_path / "d.safetensors").read_bytes())
    raw[-3] ^= 1
    (tmp_path / "d.safetensors").write_bytes(bytes(raw))
    with pytest.raises(DWMFileError, match="sha256 .* does not match"):
        load_dwm_state(tmp_path / "d.safetensors")
    (tmp_path / "e.safetensors").write_bytes(b"x")
    with pytest.raises(DWMFileError, match="metadata .* missing"):
        load_dwm_state(tmp_path / "e.safetensors")


def test_backbone_init_from_lm():
    from dwmtrain.models.lm import build_lm

    lm = build_lm("tiny", seed=3)
    m = DataWeightingModel(ARCH)
    m.init_backbone_from(lm.state_dict())
    assert torch.equal(m.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="dwm.init_backbone_from_lm=false"):
        DataWeightingModel(DWMArch("small", 4096, 32)).init_backbone_from(lm.state_dict())


def test_log_weight_spread_and_oracle_weights():
    from dwmtrain.models.dwm import log_weight_spread, oracle_weights

    assert log_weight_spread(torch.ones(8)).item() == pytest.approx(0.0, abs=1e-12)
    w = torch.tensor([2.0, 0.5, 2.0, 0.5, 2.0, 0.5, 2.0, 0.5])
    assert log_weight_spread(w).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)
    assert log_weight_spread(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0])).item() > 100  # unbounded as weights collapse
    w = oracle_weights(torch.tensor([1, 0, 1, 1, 0, 1, 1, 1]))
    assert w.tolist() == pytest.approx([8 / 6, 0, 8 / 6, 8 / 6, 0, 8 / 6, 8 / 6, 8 / 6])
    assert w.mean().item() == pytest.approx(1)
    assert oracle_weights(torch.zeros(8)).sum() == 0  # every sample dropped: nothing is learned from the batch
