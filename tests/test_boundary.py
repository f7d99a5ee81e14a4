"""StageBoundary: reuse, sha checks, missing checkpoints (one rank); the DWM broadcast from rank 0 (2 gloo ranks)."""

from pathlib import Path

import pytest
import torch

from dwmtrain.checkpoint.dwm_file import DWMFileError, save_dwm
from dwmtrain.config import load_config
from dwmtrain.distributed import Dist
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.rundir import RunDir
from dwmtrain.stages.meta_job import MetaJobError
from dwmtrain.stages.weighting import Uniform

from .helpers import stage_boundary
from .spawn import run_distributed

ARCH = DWMArch("tiny", 512, 32)
D = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")


def boundary_of(tmp_path, *ov, expect_sha=None):
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=bilevel", *ov])
    return stage_boundary(cfg, RunDir(tmp_path), expect_sha)


def test_stage1_uniform_and_finished_dwm_is_reused(tmp_path):
    h = boundary_of(tmp_path)
    assert isinstance(h.for_stage(1), Uniform) and h.for_stage(1).info == {"version": "uniform"}
    torch.manual_seed(0)
    m = DataWeightingModel(ARCH)
    torch.nn.init.normal_(m.fc2.weight)
    meta = save_dwm(m, RunDir(tmp_path).dwm(2), stage=2, lm_step=10)
    w = h.for_stage(2)  # no meta job: the file exists and checks out
    model, info = w.model, w.info
    assert info["sha256"] == meta["sha256"] and info["version"] == f"stage2:{meta['sha256'][:12]}"
    x = torch.randint(0, 512, (8, 32))
    assert torch.allclose(model(x), m.eval()(x)) and not any(p.requires_grad for p in model.parameters())

    h = boundary_of(tmp_path, expect_sha={2: "0" * 64})  # a resumed checkpoint trained with another DWM
    with pytest.raises(DWMFileError, match="is not the DWM the resumed checkpoint used for stage 2"):
        h.for_stage(2)


def test_a_compiled_dwm_weighs_as_the_eager_one_across_stages(tmp_path):
    from torch._dynamo.utils import counters

    h = boundary_of(tmp_path, "dwm.compile=true")
    x = torch.randint(0, 512, (8, 32))
    graphs = []
    for stage in (2, 3):  # a new DWM per stage, one compiled forward
        torch.manual_seed(stage)
        m = DataWeightingModel(ARCH)
        torch.nn.init.normal_(m.fc2.weight)
        save_dwm(m, RunDir(tmp_path).dwm(stage), stage=stage, lm_step=10 * stage)
        model = h.for_stage(stage).model
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        with torch.no_grad():
            torch.testing.assert_close(model(x), m.eval()(x), rtol=1e-5, atol=1e-6)
        assert model(x).std() > 1e-3  # weights that differ between samples
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # stage 3's DWM ran on stage 2's compiled graph: no recompile


def test_missing_dwm_needs_a_complete_stage_start_checkpoint(tmp_path):
    with pytest.raises(MetaJobError, match="no complete checkpoint step0000010 at the start of stage 2"):
        boundary_of(tmp_path).for_stage(2)


def test_corrupted_fixed_dwm_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=2, lm_step=0)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    h = boundary_of(tmp_path, "meta.mode=fixed", f"meta.fixed.dwm_path={path}")
    with pytest.raises(DWMFileError, match="corrupted or replaced"):
        h.for_stage(1)


# --------------------------------------------------------------------------- the DWM at a boundary on 2 gloo ranks


def _boundary_on_rank(d, root, dwm_path, mode, rank0_raises=False):
    import dwmtrain.stages.boundary as boundary
    from dwmtrain.config import load_config
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.rundir import RunDir

    if d.is_main and rank0_raises:  # something no one planned for, on rank 0 only

        def unexpected(*a, **k):
            raise KeyError("no such thing")

        boundary.load_dwm_state = unexpected
    if not d.is_main:  # only rank 0 may read the file: the others get the tensors over gloo

        def no_file_access(*a, **k):
            raise AssertionError(f"rank {d.rank} read the DWM file")

        boundary.load_dwm_state = no_file_access
    ov = [f"run.run_dir={root}", f"meta.mode={mode}", f"meta.fixed.dwm_path={dwm_path}"]
    inputs = dict(d=d, rd=RunDir(root), arch=DWMArch("tiny", 512, 32), dtype=torch.float32, starts=[0, 4, 8])
    h = boundary.StageBoundary(boundary.BoundaryInputs(cfg=load_config(None, ov), **inputs))
    try:
        w = h.for_stage(2)
        model, info = w.model, w.info
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks every rank raised the same
        return type(e).__name__, str(e)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (8, 32))
    return model(x), info


def _saved_dwm(path: Path):
    from dwmtrain.checkpoint.dwm_file import save_dwm
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch

    torch.manual_seed(0)
    m = DataWeightingModel(DWMArch("tiny", 512, 32))
    torch.nn.init.normal_(m.fc2.weight)
    meta = save_dwm(m, path, stage=2, lm_step=4)
    torch.manual_seed(0)
    return m.eval()(torch.randint(0, 512, (8, 32))), meta


@pytest.mark.parametrize("mode", ["fixed", "bilevel"])
def test_dwm_broadcast_from_rank0_gives_every_rank_the_same_model(tmp_path, mode):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)  # bilevel reuses the finished stage-2 DWM; fixed reads it from dwm_path
    want, meta = _saved_dwm(path)
    (w0, i0), (w1, i1) = run_distributed(_boundary_on_rank, str(tmp_path), str(path), mode)
    assert i0 == i1 and i0["sha256"] == meta["sha256"]
    assert torch.allclose(w0, want) and torch.equal(w0, w1) and not torch.allclose(want, torch.ones(8))


def test_corrupted_dwm_fails_on_every_rank_at_once(tmp_path):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    r0, r1 = run_distributed(_boundary_on_rank, str(tmp_path), str(path), "fixed")
    assert r0 == r1 and r0[0] == "DWMFileError" and "corrupted or replaced" in r0[1]


def test_any_failure_on_rank0_at_the_boundary_fails_every_rank_at_once(tmp_path):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    r0, r1 = run_distributed(_boundary_on_rank, str(tmp_path), str(path), "fixed", True)
    # at once: rank 1 raised rank 0's error, passed on to it; a rank left waiting would instead have raised the
    # process group's timeout (60 s, tests/spawn.py)
    assert r0[0] == "KeyError" and r1[0] == "RankZeroError" and "KeyError: 'no such thing'" in r1[1]


def test_a_fixed_dwm_fitted_with_another_tokenizer_is_refused_naming_both(tmp_path):
    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=2, lm_step=0, tokenizer="/tok/a.model", tokenizer_sha256="a" * 64)
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=fixed", f"meta.fixed.dwm_path={path}",
                             "data.tokenizer=/tok/b.json"])  # fmt: skip
    same = stage_boundary(cfg, RunDir(tmp_path), tokenizer_sha="a" * 64)
    assert same.for_stage(1).info["sha256"]
    other = stage_boundary(cfg, RunDir(tmp_path), tokenizer_sha="b" * 64)
    with pytest.raises(DWMFileError, match=r"fitted with tokenizer /tok/a.model .*data.tokenizer=/tok/b.json"):
        other.for_stage(1)


def test_a_fixed_dwm_fitted_on_larger_micro_batches_is_refused(tmp_path):
    from dwmtrain.errors import DWMInputError

    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=2, lm_step=0, micro_batch_size=8)  # as a DWM fitted elsewhere
    for mb in (8, 4):
        cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=fixed", f"meta.fixed.dwm_path={path}",
                                 f"deepspeed.micro_batch_size={mb}"])  # fmt: skip
        if mb == 8:
            assert stage_boundary(cfg, RunDir(tmp_path)).for_stage(1).info["sha256"]
        else:
            with pytest.raises(DWMInputError, match=r"deepspeed.micro_batch_size=4: .*micro-batches of 8"):
                stage_boundary(cfg, RunDir(tmp_path)).for_stage(1)


@pytest.mark.parametrize("writes", [True, False])
def test_a_meta_job_that_aborts_at_exit_after_writing_its_dwm(tmp_path, monkeypatch, caplog, writes):
    """Its DWM verifies (sha256, architecture): the run goes on with it, saying so; no DWM: MetaJobError."""
    import sys

    import dwmtrain.stages.boundary as boundary_module

    rd, tag = RunDir(tmp_path), "step0000010"
    rd.marker(tag).parent.mkdir(parents=True)
    rd.marker(tag).write_text("{}")
    write = (
        "from dwmtrain.models.dwm import DataWeightingModel, DWMArch; "
        "from dwmtrain.checkpoint.dwm_file import save_dwm; "
        f"save_dwm(DataWeightingModel(DWMArch('tiny', 512, 32)), {str(rd.dwm(2))!r}, stage=2, lm_step=10); "
    )
    job = [sys.executable, "-c", (write if writes else "") + "import os; os.abort()"]  # fmt: skip
    monkeypatch.setattr(boundary_module, "meta_job_command", lambda *a, **k: job)
    h = boundary_of(tmp_path)
    if not writes:
        with pytest.raises(MetaJobError, match=r"meta-update job exited with -6"):
            h.for_stage(2)
        return
    assert h.for_stage(2).info["stage"] == 2
    assert "the meta-update job exited -6 after writing" in caplog.text


@pytest.mark.parametrize("fitted", [False, True])
def test_a_boundary_hashes_its_dwm_once_and_writes_its_record(tmp_path, monkeypatch, fitted):
    """Reused or just fitted by the meta job, the stage's DWM file is hashed and read once on rank 0; the
    boundary's record (checkpoint, meta job, broadcast) goes to meta/stage2.pause.json."""
    import json
    import sys

    import dwmtrain.checkpoint.dwm_file as dwm_file
    import dwmtrain.stages.boundary as boundary_module

    rd = RunDir(tmp_path)
    write = (f"from dwmtrain.models.dwm import DataWeightingModel, DWMArch; from dwmtrain.checkpoint.dwm_file "
             f"import save_dwm; save_dwm(DataWeightingModel(DWMArch('tiny', 512, 32)), {str(rd.dwm(2))!r}, "
             "stage=2, lm_step=10, timings={'meta_steps_s': 2.0})")  # fmt: skip
    if fitted:
        rd.marker("step0000010").parent.mkdir(parents=True)
        rd.marker("step0000010").write_text("{}")
        monkeypatch.setattr(boundary_module, "meta_job_command", lambda *a, **k: [sys.executable, "-c", write])
    else:
        exec(write)
    hashed = []
    real = dwm_file.sha256_file
    monkeypatch.setattr(dwm_file, "sha256_file", lambda p: hashed.append(p) or real(p))
    w = boundary_of(tmp_path).for_stage(2, checkpoint_s=1.5)
    assert w.info["stage"] == 2 and hashed == [rd.dwm(2)]
    rec = json.loads((rd.meta_dir / "stage2.pause.json").read_text())
    assert rec["checkpoint_s"] == 1.5 and rec["meta_job"] == {"meta_steps_s": 2.0}
    assert rec["total_s"] == pytest.approx(rec["checkpoint_s"] + rec["meta_job_s"] + rec["broadcast_s"])


class _Tokens:
    """Training data as the boundary reads it: ``batch(indices)`` -> token ids."""

    def __init__(self, n: int = 64):
        self.ids = torch.randint(0, 512, (n, 32), generator=torch.Generator().manual_seed(1))

    def batch(self, indices):
        return self.ids[indices]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_trainer_applies_the_weights_that_were_fitted(tmp_path, caplog, dtype):
    """The meta job records its fp32 weights of a few micro-batches in the DWM file; the boundary recomputes them
    with the DWM as the trainer applies it (its dtype, its call) and records how far they are; a DWM whose weights
    stray is said, naming the remedy."""
    import json

    from dwmtrain.models.weights import APPLIED_TOLERANCE

    torch.manual_seed(0)
    m = DataWeightingModel(ARCH).eval()
    torch.nn.init.normal_(m.fc2.weight, std=0.5)
    data, idx = _Tokens(), [list(range(0, 8)), list(range(8, 16)), list(range(40, 48))]
    with torch.no_grad():
        fitted = [m(data.batch(ix)).tolist() for ix in idx]
    rd = RunDir(tmp_path)
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=bilevel"])
    for stage, weights in ((2, fitted), (3, [[w + 0.5 for w in ws] for ws in fitted])):  # 3: not these weights
        save_dwm(m, rd.dwm(stage), stage=stage, lm_step=10, applied_check={"indices": idx, "weights": weights})
        stage_boundary(cfg, rd, data=data, dtype=dtype).for_stage(stage)
    good = json.loads((rd.meta_dir / "stage2.pause.json").read_text())["applied_check"]
    assert good["ok"] and good["micro_batches"] == 3 and good["tolerance"] == APPLIED_TOLERANCE[dtype]
    if dtype == torch.float32:
        assert good["max_abs_diff"] < 1e-5
    else:  # rounded, and within the tolerance
        assert 0 < good["max_abs_diff"] <= good["tolerance"] and good["dtype"] == "bfloat16"
    bad = json.loads((rd.meta_dir / "stage3.pause.json").read_text())["applied_check"]
    assert not bad["ok"] and bad["max_abs_diff"] == pytest.approx(0.5, abs=good["tolerance"])
    assert "stage 3: the DWM's weights here" in caplog.text and "dwm.dtype=fp32" in caplog.text
    assert "stage 2: the DWM's weights here" not in caplog.text


def test_applied_and_fitted_weights_of_other_shapes_are_an_error():
    from dwmtrain.models.weights import applied_vs_fitted

    with pytest.raises(ValueError, match="8 applied weights against 7 fitted"):
        applied_vs_fitted([torch.ones(8)], [[1.0] * 7], torch.float32)


def test_an_applied_check_that_cannot_run_is_said_and_stops_nothing(tmp_path, caplog):
    import json

    rd = RunDir(tmp_path)
    m = DataWeightingModel(ARCH)
    save_dwm(
        m, rd.dwm(2), stage=2, lm_step=10, applied_check={"indices": [list(range(90, 98))], "weights": [[1.0] * 8]}
    )
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=bilevel"])
    w = stage_boundary(cfg, rd, data=_Tokens(64)).for_stage(2)  # indices past the data (it changed since)
    assert w.info["stage"] == 2 and "the applied-weights check could not run" in caplog.text
    assert "error" in json.loads((rd.meta_dir / "stage2.pause.json").read_text())["applied_check"]


def test_a_backbone_refreshed_from_another_shaped_lm_is_refused_before_the_run():
    from dwmtrain.stages.modes import mode_of

    cfg = load_config(None, ["meta.mode=bilevel", "model.preset=small", "dwm.backbone=tiny",
                             "dwm.init_backbone_from_lm=false", "dwm.refresh_backbone=true"])  # fmt: skip
    (why,) = mode_of(cfg).problems(cfg)
    assert "dwm.refresh_backbone copies the LM" in why and "dwm.refresh_backbone=false" in why
    cfg = load_config(None, ["meta.mode=bilevel", "model.preset=small", "dwm.backbone=tiny",
                             "dwm.init_backbone_from_lm=false"])  # fmt: skip
    assert mode_of(cfg).problems(cfg) == []
