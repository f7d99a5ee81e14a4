"""Megatron-style tensor parallelism (DeepSpeed AutoTP, ZeRO-1) on 4 CPU ranks: TP 2 x DP 2 against the ZeRO-3
reference of 2 ranks over two stage boundaries with meta-updates, and a SIGKILL resume."""

import json

import pytest
import torch

from .helpers import by_step, pretrain_cmd, records, run, run_until_step_then_kill

pytestmark = pytest.mark.slow

TP = ("deepspeed.tensor_parallel_size=2", "deepspeed.zero_stage=1")
#: fp32 on CPU: the tensor-parallel matmuls sum their halves in another order than ZeRO-3's whole ones (and the
#: data-parallel gradient is averaged over 2 ranks either way): per-step losses agree to float32 rounding, which the
#: meta-updates (their DWMs differ in the last bits, so their sha256 differs) and Adam carry along
LOSS_RTOL = 5e-6


def test_tensor_parallel_matches_zero3_across_meta_updates_and_resumes_exactly(bilevel_reference, tmp_path):
    ref, args = bilevel_reference
    tp_args = [*args, *TP]
    full, killed = tmp_path / "tp", tmp_path / "tp-killed"
    run(pretrain_cmd(full, tp_args, world=4))
    a, t = by_step(ref / "metrics.jsonl"), by_step(full / "metrics.jsonl")
    assert sorted(t) == list(range(1, 13))
    for s in range(1, 13):
        assert t[s]["loss"] == pytest.approx(a[s]["loss"], rel=LOSS_RTOL), (s, t[s]["loss"], a[s]["loss"])
        assert t[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=1e-4), s
        assert t[s]["dwm"].split(":")[0] == a[s]["dwm"].split(":")[0]  # the same stage's DWM weighs each step
    assert {t[s]["dwm"] for s in (5, 9)} != {"uniform"} and t[9]["w_min"] < 1.0 < t[9]["w_max"]
    for ea, et in zip(records(ref / "eval.jsonl"), records(full / "eval.jsonl"), strict=True):
        assert et["val_examples"] == ea["val_examples"]  # a tensor-parallel group's examples count once
        assert et["val_loss"] == pytest.approx(ea["val_loss"], rel=LOSS_RTOL)

    ds = json.loads((full / "deepspeed.json").read_text())
    assert ds["tensor_parallel"]["autotp_size"] == 2 and ds["zero_optimization"]["stage"] == 1
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2  # 8 x 2 accum x 2 data ranks
    boundary = full / "checkpoints" / "step0000004"
    assert sorted(p.name for p in boundary.glob("*.pt")) == [
        "mp_rank_00_model_states.pt",
        "mp_rank_01_model_states.pt",
        *(f"zero_pp_rank_{dp}_mp_rank_{tp:02d}_optim_states.pt" for dp in (0, 1) for tp in (0, 1)),
    ]
    marker = json.loads((boundary / "COMPLETE").read_text())
    assert (marker["compat"]["zero_stage"], marker["compat"]["tensor_parallel"]) == (1, 2)
    _whole_weights_match(ref / "checkpoints" / "step0000004", boundary)

    # killed at step 7 (after the boundary at 4, before the one at 8): the rerun resumes from step 6 and repeats
    # the uninterrupted tensor-parallel run exactly, the meta-update at step 8 included
    run_until_step_then_kill(pretrain_cmd(killed, tp_args, world=4), killed / "metrics.jsonl", 7)
    assert json.loads((killed / "checkpoints" / "latest.json").read_text())["step"] in (4, 6)
    p = run(pretrain_cmd(killed, tp_args, world=4))
    assert "resumed from" in p.stdout + p.stderr
    k = by_step(killed / "metrics.jsonl")
    assert [(k[s]["loss"], k[s]["dwm"]) for s in range(1, 13)] == [(t[s]["loss"], t[s]["dwm"]) for s in range(1, 13)]


def _whole_weights_match(ref_ckpt, tp_ckpt) -> None:
    """The boundary's lm_fp32.safetensors (the meta job's input) is the whole LM: AutoTP's slices joined, the
    same names and shapes as ZeRO-3's, the same values to what 4 Adam steps make of float32 rounding."""
    from safetensors.torch import load_file

    want, got = load_file(ref_ckpt / "lm_fp32.safetensors"), load_file(tp_ckpt / "lm_fp32.safetensors")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=1e-4, rtol=0), (k, (got[k] - v).abs().max().item())
