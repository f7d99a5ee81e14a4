"""The DWM in other loops, end to end: ``examples/hf_trainer.py`` (the real ``transformers.Trainer``, 2 processes
under torchrun, DDP over gloo), ``examples/plain_loop.py``, and a DWM moving both ways between a dwmtrain run and
the Trainer."""

import json
import sys
from pathlib import Path

import pytest

from dwmtrain.api import DWM

from ..conftest import SP_MODEL
from .helpers import REPO, built_once, free_port, pretrain_cmd, run

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def trainer_cmd(data: Path, out: Path, *more: str, procs: int = 2) -> list[str]:
    launch = [TORCHRUN, "--nproc_per_node", str(procs), "--master_port", str(free_port())] if procs > 1 else [
        sys.executable]  # fmt: skip
    return [*launch, str(REPO / "examples" / "hf_trainer.py"), "--data", str(data), "--tokenizer", str(SP_MODEL),
            "--out", str(out), *more]  # fmt: skip


def logged(checkpoint: Path) -> dict[int, dict]:
    """The Trainer's per-step records of a checkpoint, by step."""
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {r["step"]: r for r in history if "loss" in r}


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory, data64):
    """8 steps on 2 processes, the DWM refit after steps 3 and 6, checkpoints at 4 and 8."""

    def build(out: Path) -> None:
        run(trainer_cmd(data64, out / "run"), timeout=300)

    return built_once(tmp_path_factory, "hf_trainer", build) / "run"


def test_the_trainer_on_two_processes_refits_at_its_boundaries_and_resumes_with_the_same_dwm(
    trainer_run, data64, tmp_path
):
    steps = logged(trainer_run / "checkpoint-8")
    assert [steps[s]["dwm_stage"] for s in range(1, 9)] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert all("dwm_weight_max" not in steps[s] for s in (1, 2, 3))  # stage 1: uniform, no DWM
    assert all(steps[s]["dwm_weight_max"] > 1.001 for s in range(4, 9))  # a fitted DWM's weights
    fitted = {k: DWM.load(trainer_run / "dwm" / f"stage{k}.safetensors", tokenizer=SP_MODEL) for k in (2, 3)}
    assert fitted[2].meta["lm_step"] == 3 and fitted[3].meta["lm_step"] == 6 and fitted[2].meta["world_size"] == 2
    saved = DWM.load(trainer_run / "checkpoint-4" / "dwm.safetensors")
    assert saved.meta["sha256"] == fitted[2].meta["sha256"]  # the checkpoint holds the DWM it trained with
    # resumed from step 4 in another directory: the same losses (so the same weights) and the same stage-3 DWM
    resumed = tmp_path / "resumed"
    run(trainer_cmd(data64, resumed, "--resume", str(trainer_run / "checkpoint-4")), timeout=300)
    again = logged(resumed / "checkpoint-8")
    for s in range(5, 9):
        assert again[s]["loss"] == pytest.approx(steps[s]["loss"], abs=1e-5), s
        assert again[s]["dwm_weight_max"] == pytest.approx(steps[s]["dwm_weight_max"], abs=1e-5), s
    assert DWM.load(resumed / "dwm" / "stage3.safetensors").meta["sha256"] == fitted[3].meta["sha256"]


def test_the_plain_loop_example_weighs_uniformly_then_by_its_fitted_dwm(data64, tmp_path):
    p = run([sys.executable, str(REPO / "examples" / "plain_loop.py"), "--data", str(data64), "--tokenizer",
             str(SP_MODEL), "--out", str(tmp_path), "--steps", "8", "--boundary", "4"])  # fmt: skip
    recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert all(r["w_max"] == 1.0 for r in recs[:4]) and all(r["w_max"] > 1.0 for r in recs[4:])
    assert DWM.load(tmp_path / "stage2.safetensors", tokenizer=SP_MODEL).meta["lm_step"] == 4


def test_a_dwm_moves_both_ways_between_a_dwmtrain_run_and_the_trainer(bilevel_reference, trainer_run, data64, tmp_path):
    ref, _ = bilevel_reference
    # a dwmtrain run's DWM weighs the Trainer's micro-batches from step 1 (its tokenizer checked against the data's)
    out = tmp_path / "with_ref"
    run(trainer_cmd(data64, out, "--dwm", str(ref / "dwm" / "stage2.safetensors"), "--boundaries", "",
                    "--max-steps", "2", "--save-steps", "2", procs=1))  # fmt: skip
    steps = logged(out / "checkpoint-2")
    assert all(steps[s]["dwm_stage"] == 2 and steps[s]["dwm_weight_max"] > 1.001 for s in (1, 2))
    # the Trainer's DWM weighs a dwmtrain run (meta.mode=fixed) of the same LM shape (its saved config.json)
    rd = tmp_path / "fixed"
    dwm = trainer_run / "dwm" / "stage2.safetensors"
    run(pretrain_cmd(rd, [f"data.train_data={data64}", f"model.hf_config={trainer_run / 'checkpoint-4'}",
                          "meta.mode=fixed", f"meta.fixed.dwm_path={dwm}", "stages.total_steps=2",
                          "stages.num_stages=1", "run.checkpoint_every=2"], world=1))  # fmt: skip
    recs = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    sha = DWM.load(dwm).meta["sha256"]
    assert [r["dwm"] for r in recs] == [f"stage2:{sha[:12]}"] * 2 and all(r["w_max"] > 1.001 for r in recs)
