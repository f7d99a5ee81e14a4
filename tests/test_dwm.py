import json
import math

import pytest
import torch

from dwmtrain.checkpoint.dwm_file import DWMFileError, load_dwm, load_dwm_state, save_dwm
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.models.weights import normalize_weights, weight_stats

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


def test_sigmoid_normalization_drops_but_does_not_sharpen():
    """Keep-gates: zero logits are uniform; a sample is raised above the rest only as far as others are dropped."""
    assert torch.allclose(normalize_weights(torch.zeros(8), normalization="sigmoid"), torch.ones(8))
    z = torch.tensor([40.0, 20.0, 20.0, 20.0, 20.0, 20.0, -40.0, -40.0])
    w = normalize_weights(z, normalization="sigmoid")
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    # the kept six share the weight equally (the oracle's shape); softmax would give nearly all of it to one
    assert torch.allclose(w[:6], torch.full((6,), 8 / 6), atol=1e-6) and w[6:].max() < 1e-15
    assert normalize_weights(z)[0] > 7.9


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

    with pytest.raises(DWMFileError, match="another architecture: backbone head_dim: file has 16, run expects 48"):
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


def _resign(path, edit):
    """The file as a writer that got ``edit`` wrong would make it: the edit in the sidecar and in the signed header
    alike, the sha256 redone (only the metadata's own checks can catch it)."""
    from safetensors.torch import load_file, save_file

    from dwmtrain.checkpoint.dwm_file import _SIGNED_KEY
    from dwmtrain.fileio import sha256_file

    side = json.loads((path.parent / (path.name + ".json")).read_text())
    edit(side)
    signed = {k: side.get(k) for k in ("format", "arch", "stage", "lm_step") if k in side}
    save_file(load_file(str(path)), str(path), metadata={_SIGNED_KEY: json.dumps(signed, sort_keys=True)})
    side["sha256"] = sha256_file(path)
    (path.parent / (path.name + ".json")).write_text(json.dumps(side))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["arch"].update(temperature=0.25), r"field arch.temperature is 0.25 but .* saved with 1.0"),
        (lambda m: m["arch"].update(pooling="max"), r"field arch.pooling is 'max' but .* saved with 'mean'"),
        (lambda m: m["arch"].update(attn_heads=2), r"field arch.attn_heads is 2 .* sidecar was edited"),
        (lambda m: m.update(stage=4), r"field stage is 4 but the DWM file was saved with 3"),
    ],
)
def test_an_edited_sidecar_is_refused_naming_the_field(tmp_path, edit, message):
    path = tmp_path / "d.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=3, lm_step=120)
    side = json.loads((tmp_path / "d.safetensors.json").read_text())
    edit(side)  # the checksum still matches the tensor file: only the sidecar changed
    (tmp_path / "d.safetensors.json").write_text(json.dumps(side))
    with pytest.raises(DWMFileError, match=message):
        load_dwm_state(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["arch"].update(pooling="max"), r"field arch.pooling='max': must be one of \('mean', 'last'\)"),
        (lambda m: m["arch"].update(backbone="huge"), r"field arch.backbone='huge': not one of the presets"),
        (lambda m: m.pop("arch"), r"field 'arch' missing"),
        (lambda m: m.update(arch="tiny"), r"field 'arch' must be an object"),
        (lambda m: m["arch"].pop("vocab_size"), r"field arch.vocab_size missing"),
        (lambda m: m["arch"].update(vocab_size="512"), r"field arch.vocab_size='512': must be a positive integer"),
        (
            lambda m: m["arch"].update(vocab_size=1024),
            r"tensor backbone.embed_tokens.weight is \(512, 64\), .*\(1024, 64\)",
        ),
        (lambda m: m["arch"].update(attn_heads=3), r"field arch.attn_heads=3: must divide"),
        (lambda m: m["arch"].update(temperature=0), r"field arch.temperature=0: must be > 0"),
        (lambda m: m["arch"].update(uniform_mix=1.5), r"field arch.uniform_mix=1.5: must be in \[0, 1\]"),
        (lambda m: m["arch"].update(color="red"), r"field arch.color is not a DWM setting"),
    ],
)
def test_every_metadata_field_is_validated_even_when_signed(tmp_path, edit, message):
    path = tmp_path / "d.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=3, lm_step=120)
    _resign(path, lambda m: None)
    load_dwm_state(path, ARCH)  # re-signed as it was: still loads
    _resign(path, lambda m: m["arch"].update(uniform_mix=1.0))  # a value dwm.uniform_mix allows
    load_dwm_state(path, ARCH)
    _resign(path, edit)
    with pytest.raises(DWMFileError, match=message):
        load_dwm_state(path)


def test_an_unreadable_tensor_file_is_a_dwm_file_error(tmp_path):
    from dwmtrain.fileio import sha256_file

    path = tmp_path / "d.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=3, lm_step=120)
    path.write_bytes(b"\xff" * 64)  # not safetensors at all, with a matching checksum
    side = json.loads((tmp_path / "d.safetensors.json").read_text())
    (tmp_path / "d.safetensors.json").write_text(json.dumps({**side, "sha256": sha256_file(path)}))
    with pytest.raises(DWMFileError, match=r"d.safetensors: cannot be read \("):
        load_dwm_state(path)


def test_the_same_fit_has_the_same_sha256_wherever_and_whenever_it_is_written(tmp_path):
    m = DataWeightingModel(ARCH)
    shas = {
        save_dwm(m, tmp_path / f"r{i}" / "d.safetensors", 2, 4, seconds=i, checkpoint=f"/run{i}")["sha256"]
        for i in range(4)
    }
    assert len(shas) == 1  # informational fields are not signed; the header's one entry has a fixed order


def test_dwm_files_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        save_dwm(DataWeightingModel(ARCH), tmp_path / "d.safetensors", stage=2, lm_step=4)
    finally:
        os.umask(old)
    for name in ("d.safetensors", "d.safetensors.json"):  # not safetensors' 0600
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644


def test_backbone_init_from_lm():
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec

    lm = build_lm(ModelSpec.from_preset("tiny"), seed=3)
    m = DataWeightingModel(ARCH)
    m.init_backbone_from(lm.state_dict())
    assert torch.equal(m.backbone.embed_tokens.weight, lm.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="dwm.init_backbone_from_lm=false"):
        DataWeightingModel(DWMArch("small", 4096, 32)).init_backbone_from(lm.state_dict())


def test_log_weight_spread_and_oracle_weights():
    from dwmtrain.models.weights import domain_factor_weights as oracle_weights
    from dwmtrain.models.weights import log_weight_spread

    assert log_weight_spread(torch.ones(8)).item() == pytest.approx(0.0, abs=1e-12)
    w = torch.tensor([2.0, 0.5, 2.0, 0.5, 2.0, 0.5, 2.0, 0.5])
    assert log_weight_spread(w).item() == pytest.approx(math.log(2) ** 2, rel=1e-6)
    assert log_weight_spread(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0])).item() > 100  # unbounded as weights collapse
    w = oracle_weights(torch.tensor([1, 0, 1, 1, 0, 1, 1, 1]))
    assert w.tolist() == pytest.approx([8 / 6, 0, 8 / 6, 8 / 6, 0, 8 / 6, 8 / 6, 8 / 6])
    assert w.mean().item() == pytest.approx(1)
    assert oracle_weights(torch.zeros(8)).sum() == 0  # every sample dropped: nothing is learned from the batch


def test_a_file_without_the_signed_header_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from dwmtrain.fileio import sha256_file

    path = tmp_path / "d.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=3, lm_step=120)
    save_file(load_file(str(path)), str(path))  # the tensors alone, the sidecar's sha256 made to match
    side = json.loads((tmp_path / "d.safetensors.json").read_text())
    (tmp_path / "d.safetensors.json").write_text(json.dumps({**side, "sha256": sha256_file(path)}))
    with pytest.raises(DWMFileError, match="no signed metadata in its header"):
        load_dwm_state(path, ARCH)


def test_a_refreshed_backbone_is_the_current_lms_and_the_head_is_kept(tmp_path):
    from dwmtrain.config import load_config
    from dwmtrain.meta.update import initial_dwm
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import ModelSpec
    from dwmtrain.rundir import RunDir

    rd = RunDir(tmp_path)
    prev = DataWeightingModel(ARCH)
    torch.nn.init.normal_(prev.fc2.weight)
    save_dwm(prev, rd.dwm(2), stage=2, lm_step=10)
    lm = build_lm(ModelSpec.from_preset("tiny"), seed=3).state_dict()  # the LM at stage 3's start
    for refresh in (False, True):
        cfg = load_config(None, [f"dwm.refresh_backbone={refresh}"])
        m, how = initial_dwm(cfg, ARCH, 3, rd, lm)
        assert torch.equal(m.fc2.weight, prev.fc2.weight) and torch.equal(
            m.attn.in_proj_weight, prev.attn.in_proj_weight
        )
        fresh = torch.equal(m.backbone.embed_tokens.weight, lm["model.embed_tokens.weight"])
        assert fresh == refresh and how.endswith("backbone refreshed from the LM") == refresh
        assert torch.equal(m.backbone.embed_tokens.weight, prev.backbone.embed_tokens.weight) != refresh


def test_a_loss_aware_dwm_weighs_by_the_losses_and_needs_them(tmp_path):
    import dataclasses

    torch.manual_seed(0)
    arch = dataclasses.replace(ARCH, loss_feature=True)
    m = DataWeightingModel(arch).eval()
    x, losses = torch.randint(0, 512, (8, 32)), torch.rand(8) * 3
    assert torch.equal(m(x, losses=losses), torch.ones(8))  # a fresh head: uniform, as the paper's
    torch.nn.init.normal_(m.fc2.weight)
    w = m(x, losses=losses)
    perm = torch.randperm(8)
    assert torch.allclose(m(x[perm], losses=losses[perm]), w[perm], atol=1e-6)
    assert not torch.allclose(m(x, losses=losses.flip(0)), w, atol=1e-4)  # the same tokens, other losses
    assert torch.allclose(m(x, losses=2 * losses + 1), w, atol=1e-5)  # standardized: a shift or scale is nothing
    with pytest.raises(ValueError, match="dwm.loss_feature"):
        m(x)
    save_dwm(m, tmp_path / "d.safetensors", stage=2, lm_step=1)
    assert torch.allclose(load_dwm(tmp_path / "d.safetensors")(x, losses=losses), w)
    with pytest.raises(DWMFileError):  # the paper's DWM and a loss-aware one are not the same tensors
        load_dwm_state(tmp_path / "d.safetensors", ARCH)


def test_the_trainer_applies_a_loss_aware_dwm_to_the_losses_of_its_own_forward():
    """FrozenDWM of a loss-aware DWM gives a rule of the forward's losses: through the fused loss head and through
    full logits the objective is mean_i w_i L_i with w = dwm(x, losses=L) at the same parameters."""
    import dataclasses

    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.loss import per_sample_loss
    from dwmtrain.models.spec import ModelSpec

    torch.manual_seed(0)
    m = DataWeightingModel(dataclasses.replace(ARCH, loss_feature=True)).eval()
    torch.nn.init.normal_(m.fc2.weight)
    lm = build_lm(ModelSpec.from_preset("tiny", 512, 32), seed=1)
    x = torch.randint(0, 512, (8, 32))
    with torch.no_grad():
        losses = per_sample_loss(lm(input_ids=x).logits, x)
    want = m(x, losses=losses)
    assert want.std() > 0.05
    applied_in_its_own_forward(m, lm, x, want, losses)


def applied_in_its_own_forward(m, lm, x, want, losses) -> None:
    """Through the fused loss head and through full logits, FrozenDWM's rule applies ``want`` to the forward's own
    losses: the objective is mean_i w_i L_i, and the weights are data to the LM's backward."""
    from dwmtrain.models.loss import weighted_objective
    from dwmtrain.stages.weighting import FrozenDWM

    for chunked in (True, False):
        rule = FrozenDWM(m, {"version": "t"})(x, list(range(8)))
        loss, got_losses, applied = weighted_objective(lm, x, rule, chunked)
        assert torch.allclose(applied, want, atol=1e-5) and torch.allclose(got_losses, losses, atol=1e-5)
        assert torch.allclose(loss, (want * losses).mean(), atol=1e-5)
        loss.backward()
        lm.zero_grad()


LM_ARCH = DWMArch("tiny", 512, 32, features="lm")  # dwm.features=lm: the LM's own hidden states, no backbone


def test_a_dwm_on_the_lms_hidden_states_has_no_backbone_and_weighs_by_them(tmp_path):
    torch.manual_seed(0)
    m = DataWeightingModel(LM_ARCH).eval()
    assert m.backbone is None and m.reads_lm and not DataWeightingModel(ARCH).reads_lm
    H = LM_ARCH.backbone_spec().hidden_size
    hidden = torch.randn(8, 32, H)
    assert torch.equal(m(None, hidden=hidden), torch.ones(8))  # a fresh head: uniform
    torch.nn.init.normal_(m.fc2.weight)
    w = m(None, hidden=hidden)
    perm = torch.randperm(8)
    assert torch.allclose(m(None, hidden=hidden[perm]), w[perm], atol=1e-6)
    assert not torch.allclose(m(None, hidden=hidden.flip(1)[:, :1]), w, atol=1e-4)  # other states, other weights
    with pytest.raises(ValueError, match="dwm.features=lm"):
        m(torch.randint(0, 512, (8, 32)))
    m.init_backbone_from({})  # nothing to copy into
    save_dwm(m, tmp_path / "d.safetensors", stage=2, lm_step=1)
    back = load_dwm(tmp_path / "d.safetensors")
    assert back.backbone is None and torch.allclose(back(None, hidden=hidden), w)
    with pytest.raises(DWMFileError):  # the paper's DWM and one without a backbone are not the same tensors
        load_dwm_state(tmp_path / "d.safetensors", ARCH)
    head = sum(p.numel() for p in m.parameters())
    assert head < sum(p.numel() for p in DataWeightingModel(ARCH).parameters()) / 2


@pytest.mark.parametrize("loss_feature", [False, True])
def test_the_trainer_applies_a_dwm_on_its_own_hidden_states_in_the_same_forward(loss_feature):
    """FrozenDWM of a dwm.features=lm DWM gives a rule resolved inside the LM's forward: through the fused loss head
    and through full logits the weights are dwm(hidden=the LM's final states[, losses=its losses]) of that very
    forward, and the meta job's read of the LM (metagrad.forward_reads) gives the same states and losses."""
    import dataclasses

    from dwmtrain.meta.metagrad import forward_reads, lm_params
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.loss import per_sample_loss
    from dwmtrain.models.spec import ModelSpec

    torch.manual_seed(0)
    m = DataWeightingModel(dataclasses.replace(LM_ARCH, loss_feature=loss_feature)).eval()
    torch.nn.init.normal_(m.fc2.weight)
    lm = build_lm(ModelSpec.from_preset("tiny", 512, 32), seed=1)
    x = torch.randint(0, 512, (8, 32))
    with torch.no_grad():
        losses, hidden = per_sample_loss(lm(input_ids=x).logits, x), lm.model(input_ids=x).last_hidden_state
    want = m(None, hidden=hidden, losses=losses if loss_feature else None)
    assert want.std() > 0.05
    applied_in_its_own_forward(m, lm, x, want, losses)
    for chunk in (1024, 0):  # the meta job's read: fused head, then full logits
        lm.loss_chunk_tokens = chunk
        r_losses, r_hidden = forward_reads(lm, lm_params(lm), x)
        assert torch.allclose(r_losses, losses, atol=1e-5) and torch.allclose(r_hidden, hidden, atol=1e-6)
