"""StageHandoff: reuse, sha checks, missing checkpoints (world size 1); the DWM broadcast from rank 0 (2 gloo ranks)."""

from pathlib import Path

import pytest
import torch

from dwmtrain.config import load_config
from dwmtrain.distributed import Dist
from dwmtrain.models.dwm import DataWeightingModel, DWMArch, DWMFileError, save_dwm
from dwmtrain.rundir import RunDir
from dwmtrain.stages.handoff import StageHandoff
from dwmtrain.stages.meta_job import MetaJobError
from dwmtrain.stages.weighting import Uniform

from .spawn import run_distributed

ARCH = DWMArch("tiny", 512, 32)
D = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")


def handoff(tmp_path, *ov, expect_sha=None):
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=bilevel", *ov])
    return StageHandoff(cfg, D, ARCH, torch.float32, RunDir(tmp_path), expect_sha)


def test_stage1_uniform_and_finished_dwm_is_reused(tmp_path):
    h = handoff(tmp_path)
    assert isinstance(h.for_stage(1, None), Uniform) and h.for_stage(1, None).info == {"version": "uniform"}
    torch.manual_seed(0)
    m = DataWeightingModel(ARCH)
    torch.nn.init.normal_(m.fc2.weight)
    meta = save_dwm(m, RunDir(tmp_path).dwm(2), stage=2, lm_step=10)
    w = h.for_stage(2, "step0000010")  # no meta job: the file exists and checks out
    model, info = w.model, w.info
    assert info["sha256"] == meta["sha256"] and info["version"] == f"stage2:{meta['sha256'][:12]}"
    x = torch.randint(0, 512, (8, 32))
    assert torch.allclose(model(x), m.eval()(x)) and not any(p.requires_grad for p in model.parameters())

    h = handoff(tmp_path, expect_sha={2: "0" * 64})  # a resumed checkpoint trained with another DWM
    with pytest.raises(DWMFileError, match="is not the DWM the resumed checkpoint used for stage 2"):
        h.for_stage(2, "step0000010")


def test_a_compiled_dwm_weighs_as_the_eager_one_across_stages(tmp_path):
    from torch._dynamo.utils import counters

    h = handoff(tmp_path, "dwm.compile=true")
    x = torch.randint(0, 512, (8, 32))
    graphs = []
    for stage in (2, 3):  # a new DWM per stage, one compiled forward
        torch.manual_seed(stage)
        m = DataWeightingModel(ARCH)
        torch.nn.init.normal_(m.fc2.weight)
        save_dwm(m, RunDir(tmp_path).dwm(stage), stage=stage, lm_step=10 * stage)
        model = h.for_stage(stage, f"step{10 * stage:07d}").model
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        with torch.no_grad():
            torch.testing.assert_close(model(x), m.eval()(x), rtol=1e-5, atol=1e-6)
        assert model(x).std() > 1e-3  # weights that differ between samples
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]  # stage 3's DWM ran on stage 2's compiled graph: no recompile


def test_missing_dwm_needs_a_complete_stage_start_checkpoint(tmp_path):
    with pytest.raises(MetaJobError, match="no complete checkpoint step0000010 at the start of stage 2"):
        handoff(tmp_path).for_stage(2, "step0000010")


def test_corrupted_fixed_dwm_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=2, lm_step=0)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    h = handoff(tmp_path, "meta.mode=fixed", f"meta.dwm_path={path}")
    with pytest.raises(DWMFileError, match="corrupted or replaced"):
        h.for_stage(1, None)


# --------------------------------------------------------------------------- the DWM hand-off on 2 gloo ranks


def _handoff(d, root, dwm_path, mode, rank0_raises=False):
    import dwmtrain.stages.handoff as handoff
    from dwmtrain.config import load_config
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.rundir import RunDir

    if d.is_main and rank0_raises:  # something no one planned for, on rank 0 only

        def unexpected(*a, **k):
            raise KeyError("no such thing")

        handoff.load_dwm_state = unexpected
    if not d.is_main:  # only rank 0 may read the file: the others get the tensors over gloo

        def no_file_access(*a, **k):
            raise AssertionError(f"rank {d.rank} read the DWM file")

        handoff.load_dwm_state = no_file_access
    ov = [f"run.run_dir={root}", f"meta.mode={mode}", f"meta.dwm_path={dwm_path}"]
    h = handoff.StageHandoff(load_config(None, ov), d, DWMArch("tiny", 512, 32), torch.float32, RunDir(root))
    try:
        w = h.for_stage(2, "step0000004")
        model, info = w.model, w.info
    except Exception as e:  # noqa: BLE001 - returned to the test, which checks every rank raised the same
        return type(e).__name__, str(e)
    torch.manual_seed(0)
    x = torch.randint(0, 512, (8, 32))
    return model(x), info


def _saved_dwm(path: Path):
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch, save_dwm

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
    (w0, i0), (w1, i1) = run_distributed(_handoff, str(tmp_path), str(path), mode)
    assert i0 == i1 and i0["sha256"] == meta["sha256"]
    assert torch.allclose(w0, want) and torch.equal(w0, w1) and not torch.allclose(want, torch.ones(8))


def test_corrupted_dwm_fails_on_every_rank_at_once(tmp_path):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    r0, r1 = run_distributed(_handoff, str(tmp_path), str(path), "fixed")
    assert r0 == r1 and r0[0] == "DWMFileError" and "corrupted or replaced" in r0[1]


def test_any_failure_on_rank0_in_the_handoff_fails_every_rank_at_once(tmp_path):
    from dwmtrain.rundir import RunDir

    path = RunDir(tmp_path).dwm(2)
    _saved_dwm(path)
    r0, r1 = run_distributed(_handoff, str(tmp_path), str(path), "fixed", True)
    # at once: rank 1 raised rank 0's error, passed on to it; a rank left waiting would instead have raised the
    # process group's timeout (60 s, tests/spawn.py)
    assert r0[0] == "KeyError" and r1[0] == "RankZeroError" and "KeyError: 'no such thing'" in r1[1]


def test_a_fixed_dwm_fitted_with_another_tokenizer_is_refused_naming_both(tmp_path):
    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(ARCH), path, stage=2, lm_step=0, tokenizer="/tok/a.model", tokenizer_sha256="a" * 64)
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "meta.mode=fixed", f"meta.dwm_path={path}",
                             "data.tokenizer=/tok/b.json"])  # fmt: skip
    same = StageHandoff(cfg, D, ARCH, torch.float32, RunDir(tmp_path), tokenizer_sha="a" * 64)
    assert same.for_stage(1, None).info["sha256"]
    other = StageHandoff(cfg, D, ARCH, torch.float32, RunDir(tmp_path), tokenizer_sha="b" * 64)
    with pytest.raises(DWMFileError, match=r"fitted with tokenizer /tok/a.model .*data.tokenizer=/tok/b.json"):
        other.for_stage(1, None)


@pytest.mark.parametrize("writes", [True, False])
def test_a_meta_job_that_aborts_at_exit_after_writing_its_dwm(tmp_path, monkeypatch, capsys, writes):
    """Its DWM verifies (sha256, architecture): the run goes on with it, saying so; no DWM: MetaJobError."""
    import sys

    import dwmtrain.stages.handoff as handoff_module

    rd, tag = RunDir(tmp_path), "step0000010"
    rd.marker(tag).parent.mkdir(parents=True)
    rd.marker(tag).write_text("{}")
    write = (
        f"from dwmtrain.models.dwm import DataWeightingModel, DWMArch, save_dwm; "
        f"save_dwm(DataWeightingModel(DWMArch('tiny', 512, 32)), {str(rd.dwm(2))!r}, stage=2, lm_step=10); "
    )
    job = [sys.executable, "-c", (write if writes else "") + "import os; os.abort()"]  # fmt: skip
    monkeypatch.setattr(handoff_module, "meta_job_command", lambda *a, **k: job)
    h = handoff(tmp_path)
    if not writes:
        with pytest.raises(MetaJobError, match=r"meta-update job exited with -6"):
            h.for_stage(2, tag)
        return
    assert h.for_stage(2, tag).info["stage"] == 2
    assert "the meta-update job exited -6 after writing" in capsys.readouterr().out
