"""Real `deepspeed --num_gpus 2` launches of launchers/pretrain.py on CPU (gloo), tiny preset."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from dwmtrain.checkpoint import safe_torch_load
from dwmtrain.checkpoint.dwm_file import save_dwm
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.report import summarize

from ..helpers import wandb_history, wandb_offline_runs
from .helpers import (
    DEEPSPEED,
    REPO,
    by_step,
    free_port,
    master_port,
    pretrain_cmd,
    records,
    run,
    run_until_step_then_kill,
    short_run,
)

pytestmark = pytest.mark.slow


def base(data64, *extra):
    return short_run(data64, "run.keep_last=2", "meta.mode=none", *extra)


@pytest.mark.parametrize("variant", [[], ["--tied"]], ids=["untied", "tied-gqa"])
def test_weighted_loss_gradients_under_zero3(variant):
    port = str(free_port())
    script = str(REPO / "tests" / "integration" / "check_weighted_grad.py")
    p = run([DEEPSPEED, "--num_gpus", "2", "--master_port", port, script, *variant])
    assert "CHECK-OK" in p.stdout


def test_trains_loss_falls_checkpoints_and_exact_resume_after_sigkill(tmp_path, data64):
    launched = []  # every command this test runs

    def launch(run_dir: Path, overrides: list[str]) -> list[str]:
        launched.append(pretrain_cmd(run_dir, overrides))
        return launched[-1]

    full, killed = tmp_path / "full", tmp_path / "killed"
    run(launch(full, base(data64)))
    a = by_step(full / "metrics.jsonl")
    assert sorted(a) == list(range(1, 13))
    assert a[12]["loss"] < a[1]["loss"] - 0.5, "loss must fall"
    assert [a[s]["stage"] for s in (1, 4, 5, 8, 9, 12)] == [1, 1, 2, 2, 3, 3]
    assert all(r["w_min"] == r["w_max"] == 1.0 and r["dwm"] == "uniform" for r in a.values())
    for k in ("loss_unweighted", "lr", "tokens_per_s", "samples_seen", "w_entropy", "w_ess"):
        assert k in a[1]
    assert not {"mfu", "mfu_dwm", "peak_mem_gib"} & set(a[1])  # GPU-only fields are absent on CPU, not zero
    assert a[3]["samples_seen"] == 3 * 32
    ck = full / "checkpoints"
    assert json.loads((ck / "latest.json").read_text())["tag"] == "step0000012"
    done = sorted(p.name for p in ck.iterdir() if (p / "COMPLETE").exists())
    assert "step0000004" in done and "step0000008" in done  # stage boundaries are kept
    marker = json.loads((ck / "step0000008" / "COMPLETE").read_text())
    assert marker["stage_boundary"] and marker["consumed_samples"] == 8 * 32 and len(marker["config_sha256"]) == 64
    assert (full / "config.yaml").exists() and json.loads((full / "deepspeed.json").read_text())[
        "train_batch_size"
    ] == 32
    assert [r["step"] for r in records(full / "eval.jsonl")] == [4, 8, 12]
    assert list((full / "tensorboard").iterdir())
    deepspeeds_own_tools_read_it(full, tmp_path)

    # killed at step 7 (after the boundary at 4, before the one at 8), resumed from step 6; tracked by W&B offline
    tracked = base(data64, "run.wandb.mode=offline")
    run_until_step_then_kill(launch(killed, tracked), killed / "metrics.jsonl", 7)
    latest = json.loads((killed / "checkpoints" / "latest.json").read_text())["step"]
    assert latest in (4, 6)
    p = run(launch(killed, tracked), WANDB_SILENT="true")
    assert "resumed from" in p.stdout + p.stderr
    b = by_step(killed / "metrics.jsonl")
    assert sorted(b) == list(range(1, 13))
    for s in range(1, 13):
        assert b[s]["loss"] == a[s]["loss"], (s, b[s]["loss"], a[s]["loss"])
        assert b[s]["lr"] == a[s]["lr"]
    (id1, _), (id2, after) = wandb_offline_runs(killed)  # the killed run's and the rerun's: one W&B run
    assert id1 == id2
    # the SIGKILL took W&B's process too, before it wrote its buffer: the rerun sends its kept records again
    logged = {r["step"]: r["train/loss"] for r in wandb_history(after) if "train/loss" in r}
    assert logged == {s: b[s]["loss"] for s in range(1, 13)}

    # rerunning a finished run changes nothing; a breaking config change is refused
    run(launch(full, base(data64)))
    assert by_step(full / "metrics.jsonl")[12]["loss"] == a[12]["loss"]
    p = run(launch(full, base(data64, "deepspeed.global_batch_size=64")), check=False)
    assert p.returncode != 0
    assert "global batch" in p.stderr and "checkpoint has 32, now 64" in p.stderr
    # DeepSpeed's CPU all-reduce buffers (66 MB of /dev/shm per rank) are gone, after the SIGKILL too
    for port in map(master_port, launched):  # each launch had its own port, which names its buffers
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")), port


def deepspeeds_own_tools_read_it(run_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed's zero_to_fp32.py (written into the checkpoint directory) and ds_to_universal work on a dwmtrain
    checkpoint directory without a tag: its ``latest`` names the newest complete checkpoint."""
    from safetensors.torch import load_file

    ck = run_dir / "checkpoints"
    assert (ck / "latest").read_text() == "step0000012"
    out = tmp_path / "fp32"
    run([sys.executable, str(ck / "zero_to_fp32.py"), str(ck), str(out), "--safe_serialization"])
    theirs = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    ours = load_file(ck / "step0000012" / "lm_fp32.safetensors")
    assert set(ours) <= set(theirs) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    uni = tmp_path / "universal" / "step0000012"
    src = ck / (ck / "latest").read_text()
    run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
         "--output_folder", str(uni), "--num_extract_workers", "2", "--num_merge_workers", "2"])  # fmt: skip
    assert (uni / "zero" / "optimizer_state.pt").is_file()


def test_sigkill_resume_across_stage_boundary(tmp_path, data64):
    """Killed right after a boundary checkpoint: the resumed run must match step by step."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = base(data64, "run.checkpoint_every=100")  # only the stage boundaries checkpoint
    run(pretrain_cmd(full, args))
    # the killed run recomputes every layer's activations (model.activation_checkpointing): the same losses
    ckpt = [*args, "model.activation_checkpointing=1"]
    run_until_step_then_kill(pretrain_cmd(killed, ckpt), killed / "metrics.jsonl", 6)
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] == 4
    run(pretrain_cmd(killed, ckpt))
    a, b = by_step(full / "metrics.jsonl"), by_step(killed / "metrics.jsonl")
    assert [b[s]["loss"] for s in range(1, 13)] == [a[s]["loss"] for s in range(1, 13)]


def test_static_dwm_for_the_whole_run(tmp_path, data64):
    arch = DWMArch("tiny", 4096, 64)
    torch.manual_seed(0)
    dwm = DataWeightingModel(arch)
    torch.nn.init.normal_(dwm.fc2.weight, std=1.0)
    meta = save_dwm(dwm, tmp_path / "w1.safetensors", stage=2, lm_step=0)
    fixed = (
        "meta.mode=fixed",
        f"meta.fixed.dwm_path={tmp_path / 'w1.safetensors'}",
        "model.activation_checkpointing=2",
    )
    run(pretrain_cmd(tmp_path / "r", base(data64, *fixed)))
    recs = records(tmp_path / "r" / "metrics.jsonl")
    assert len(recs) == 12
    assert {r["dwm"] for r in recs} == {f"stage2:{meta['sha256'][:12]}"}
    assert all(r["w_min"] < 1.0 < r["w_max"] and r["loss"] != r["loss_unweighted"] for r in recs)
    marker = json.loads((tmp_path / "r" / "checkpoints" / "step0000012" / "COMPLETE").read_text())
    assert marker["dwm"]["sha256"] == meta["sha256"]

    # a corrupted DWM file is refused with a clear message
    raw = bytearray((tmp_path / "w1.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "w1.safetensors").write_bytes(bytes(raw))
    p = run(
        pretrain_cmd(
            tmp_path / "r2", base(data64, "meta.mode=fixed", f"meta.fixed.dwm_path={tmp_path / 'w1.safetensors'}")
        ),
        check=False,
    )
    assert p.returncode != 0 and "sha256" in p.stderr and "corrupted or replaced" in p.stderr


def test_a_nonfinite_loss_on_one_rank_is_skipped_everywhere_counted_and_stops_the_run(tmp_path, data64):
    """NaN weights on rank 1 at step 5, then at steps 9-10 with run.stop_after_nonfinite=2."""
    rd = tmp_path / "nan"
    args = base(data64, "run.keep_last=1", "run.keep_stage_checkpoints=false", "run.stop_after_nonfinite=2")
    p = run(pretrain_cmd(rd, args), check=False, DWMTRAIN_FAULT="nonfinite-loss:rank=1:step=5,9-10")
    assert p.returncode == 2, p.stderr[-3000:]
    # one line, the same on every rank (rank 0's progress bar may share the terminal line)
    err = {x[x.index("[dwmtrain] error") :] for x in p.stderr.splitlines() if "NonFiniteError" in x}
    assert len(err) == 1, err
    (err,) = err
    assert "2 consecutive steps" in err and "steps 9-10, stage 3, DWM uniform" in err and "step0000008" in err
    m = by_step(rd / "metrics.jsonl")
    assert max(m) == 10 and [s for s in m if m[s]["nonfinite"]] == [5, 9, 10]
    assert m[5]["grad_norm"] is None and m[4]["grad_norm"] > 0 and m[6]["grad_norm"] > 0
    assert m[6]["lr"] == m[5]["lr"] != m[4]["lr"]  # the skipped step did not advance the LR schedule
    assert m[6]["loss"] == m[6]["loss"] and m[10]["nonfinite_steps"] == 3  # finite again after the skip
    ck = rd / "checkpoints"
    # keep_last=1 and no stage checkpoints kept, yet step 4 stays: the newest before the first non-finite step
    assert sorted(q.name for q in ck.iterdir() if (q / "COMPLETE").exists()) == ["step0000004", "step0000008"]
    marker = json.loads((ck / "step0000008" / "COMPLETE").read_text())
    assert (marker["skipped_steps"], marker["nonfinite_steps"], marker["nonfinite_streak"]) == (1, 1, 0)
    with safe_torch_load():  # every rank's engine skipped that step: DeepSpeed's count in each rank's shard
        shards = [torch.load(f) for f in sorted((ck / "step0000008").glob("zero_pp_rank_*_model_states.pt"))]
    assert [s["skipped_steps"] for s in shards] == [1, 1]
    assert "non-finite steps: 3" in summarize(rd)
    p = run(pretrain_cmd(rd, args))  # the same command, the fault gone: resumes from step 8 and finishes
    assert "resumed from" in p.stdout + p.stderr and f"{ck}/step0000008" in p.stdout + p.stderr
    assert max(by_step(rd / "metrics.jsonl")) == 12
