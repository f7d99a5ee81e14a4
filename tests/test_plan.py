"""The planner (``dwmtrain plan``): its arithmetic, its verdicts, and its memory figures against measured peaks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dwmtrain.config import load_config
from dwmtrain.plan import make_plan, parse_device
from dwmtrain.plan import memory as mem
from dwmtrain.plan.planner import Fix, first_fix

from .spawn import run_distributed

SHAPE = {"tiny": ["data.seq_len=64"], "small": ["data.seq_len=256"]}
TP2 = ["deepspeed.tensor_parallel_size=2", "deepspeed.zero_stage=1"]


def _activations(micro: int, every: int = 0) -> int:
    from dwmtrain.models.spec import ModelSpec

    spec = ModelSpec.from_preset("small", 0, 256)
    return mem.activations(spec, micro, 256, mem.Layout(1, 2, "fp32"), "sdpa", 1024, every, True).nbytes


def test_traced_activations_scale_with_the_batch_and_fall_with_checkpointing():
    two, four, eight = _activations(2), _activations(4), _activations(8)
    assert eight - four == pytest.approx(2 * (four - two), rel=1e-3)  # linear in the batch (+ the head's gradient)
    full, half = _activations(8, every=1), _activations(8, every=2)
    assert full < half < eight and full < 0.5 * eight


def test_model_states_are_deepspeeds_estimate_in_mixed_precision():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    n, largest = 8_030_261_248, 525_336_576
    lay = mem.Layout(4, 8, "bf16")
    _, gpu, big = estimate_zero3_model_states_mem_needs(n, largest, 8, 4, False, False, True, 1.0)
    assert mem.model_states(n, largest, lay).nbytes == gpu - big
    assert mem.model_states(n, largest, mem.Layout(4, 8, "bf16", offload_optimizer=True)).nbytes < gpu / 8


def test_checkpoint_disk_counts_kept_periodic_boundary_and_final_saves():
    cfg = load_config("tiny", ["stages.total_steps=100", "stages.num_stages=5", "run.checkpoint_every=10",
                               "run.keep_last=3", "deepspeed.global_batch_size=16"])  # fmt: skip
    p = make_plan(cfg, 1, 2, parse_device("h100"))
    per, weights = p.checkpoint_bytes
    assert (per, weights) == (12 * p.n_params, 4 * p.n_params)
    assert p.disk_bytes == (3 + 4 + 1) * per + (4 + 1) * weights
    assert p.steps_per_stage == [20] * 5 and p.tokens_per_step == 16 * cfg.data.seq_len


def test_the_8b_run_fits_4x8_h100_and_its_meta_job_fits_too():
    cfg = load_config("experiments/scale/llama3.1-8b_4x8h100")
    p = make_plan(cfg, 4, 8, parse_device("h100"))
    assert p.n_params == 8_030_261_248 and p.fits and p.meta_peak <= p.budget
    secs = p.stage_seconds()
    assert len(secs) == 5 and all(s > 0 for s in secs)


def test_the_adamw_lookahead_counts_the_moments_and_the_derivative_in_the_meta_job():
    cfg = load_config("experiments/scale/llama3.1-8b_4x8h100")
    sgd = make_plan(cfg, 4, 8, parse_device("h100"))
    adam = make_plan(load_config("experiments/scale/llama3.1-8b_4x8h100", ["meta.lookahead=adam"]), 4, 8,
                     parse_device("h100"))  # fmt: skip
    lm_bytes = 4 if cfg.meta.lm_dtype == "fp32" else 2
    assert adam.meta_peak - sgd.meta_peak == sgd.n_params * (8 + lm_bytes)  # m, v in fp32 and J
    assert "AdamW moments (meta.lookahead=adam or meta.strength)" in {i.name for i in adam.meta_items}
    both_cfg = load_config("experiments/scale/llama3.1-8b_4x8h100", ["meta.lookahead=adam", "meta.strength=[0,1]"])
    both = make_plan(both_cfg, 4, 8, parse_device("h100"))
    assert both.meta_peak - adam.meta_peak == 4 * sgd.n_params * lm_bytes  # the rollout's copies; m, v counted once


def test_a_run_that_does_not_fit_names_the_first_change_that_does():
    cfg = load_config("experiments/scale/llama3.1-8b_4x8h100", ["model.activation_checkpointing=0"])
    dev = parse_device("h100")
    p = make_plan(cfg, 4, 8, dev)
    assert p.fits and p.meta_over  # training fits; the meta job's lookahead does not
    fix = first_fix(cfg, 4, 8, dev)
    assert fix.label == "model.activation_checkpointing=1" and fix.plan.fits and not fix.plan.meta_over
    assert not fix.alters


def test_the_planner_keeps_the_method_first_and_says_when_only_a_change_of_it_fits():
    """Activation checkpointing, the meta job's dtype, offload and more nodes come before a smaller micro-batch,
    which for a weighted run changes what the DWM weighs (never down to 1: every weight would be 1); the verdict
    says so. The bundled llama3.2-1b config fits 8 x H100 as shipped."""
    from dwmtrain.plan import verdict
    from dwmtrain.plan.planner import _candidates

    h100 = parse_device("h100")
    p = make_plan(load_config("llama3.2-1b"), 1, 8, h100)
    assert p.fits and not p.meta_over and verdict(p).startswith("plan: FITS on 1 x 8 H100 80GB")
    off = load_config("llama3.2-1b", ["model.activation_checkpointing=0"])
    said = verdict(make_plan(off, 1, 8, h100), first_fix(off, 1, 8, h100))
    assert "first change that fits: model.activation_checkpointing=1" in said
    labels = [label for label, _, _, alters in _candidates(off, 1)]
    assert labels.index("model.activation_checkpointing=1") < labels.index("--nodes 2")
    mb = [(label, alters) for label, _, _, alters in _candidates(off, 1) if "micro_batch" in label]
    assert [label for label, _ in mb] == ["deepspeed.micro_batch_size=4", "deepspeed.micro_batch_size=2"]
    assert labels.index("--nodes 16") < labels.index(mb[0][0]) and "weighs 4 samples" in mb[0][1]
    small = make_plan(load_config("llama3.2-1b", ["deepspeed.micro_batch_size=4"]), 1, 8, h100)
    assert "and it CHANGES THE METHOD: the DWM then weighs 4" in verdict(make_plan(off, 1, 8, h100),
                                                                        Fix(*mb[0][:1], small, mb[0][1]))  # fmt: skip


def test_a_device_the_planner_does_not_know_is_a_clear_error():
    from dwmtrain.errors import ConfigError

    assert parse_device("48GiB").memory_bytes == 48 * 2**30
    with pytest.raises(ConfigError, match="--gpu v100: not h100, h100-pcie, h200, a100, cpu or a memory size"):
        parse_device("v100")


def _peak_rss(d, preset: str, overrides: list[str]) -> float:
    """Three training steps with a co-located frozen DWM on 2 CPU ranks, as the trainer runs them: this rank's
    peak resident set (bytes)."""
    import deepspeed

    from dwmtrain.config import build_deepspeed_config
    from dwmtrain.distributed import skip_cpu_inference_op
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch
    from dwmtrain.models.spec import lm_spec
    from dwmtrain.train.engine import build_engine

    skip_cpu_inference_op()  # as every dwmtrain rank does
    deepspeed.init_distributed()
    cfg = load_config(preset, overrides)
    d = dataclasses.replace(d, tp=cfg.deepspeed.tensor_parallel_size)
    engine = build_engine(cfg, build_deepspeed_config(cfg, d.world, "cpu"), lm_spec(cfg.model), d)
    V, mb, T = engine.module.config.vocab_size, cfg.deepspeed.micro_batch_size, cfg.data.seq_len
    dwm = DataWeightingModel(DWMArch.from_config(cfg, V)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(d.dp_rank)  # a tensor-parallel group trains on the same micro-batches
    for _ in range(3):
        x = torch.randint(0, V, (mb, T), generator=g)
        with torch.inference_mode():
            w = dwm(x)
        loss, _ = engine(input_ids=x, sample_weights=w.clone())
        engine.backward(loss)
        engine.step()
    for ln in open("/proc/self/status"):
        if ln.startswith("VmHWM:"):
            return int(ln.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.parametrize(
    "preset,layout", [("tiny", []), ("small", []), ("small", TP2)], ids=["tiny", "small", "small-tp2"]
)
def test_the_plans_memory_is_within_a_quarter_of_the_measured_peak(preset, layout, monkeypatch):
    """The planner's per-process total on CPU ranks (fp32) against the measured peak RSS of each of 2 ranks
    (ZeRO-3, or tensor parallel over both with ZeRO-1), started with the allocator setting `dwmtrain train` gives
    CPU ranks."""
    from dwmtrain.launch.cli import CPU_MALLOC_ENV

    for k, v in CPU_MALLOC_ENV.items():
        monkeypatch.setenv(k, v)  # the spawned ranks start with it
    over = [*SHAPE[preset], "deepspeed.global_batch_size=16", "deepspeed.micro_batch_size=8", *layout]
    plan = make_plan(load_config(preset, over), 1, 2, parse_device("cpu", 2))
    for peak in run_distributed(_peak_rss, preset, over, timeout=300):
        assert abs(plan.peak - peak) <= 0.25 * peak, (preset, plan.peak / 2**20, peak / 2**20)


def test_dry_run_ends_with_the_plans_verdict(monkeypatch, capsys):
    """--dry-run of the 8B multi-node config as a login node without GPUs runs it for 4 x 8 H100 (its inputs,
    /data and /models on the cluster, are not checked here)."""
    import dwmtrain.launch.pretrain as pretrain

    monkeypatch.setattr(pretrain, "check_inputs", lambda cfg, **_: None)
    hw = ["--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100"]
    assert pretrain.main(["--config", "experiments/scale/llama3.1-8b_4x8h100", "--dry-run", *hw]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("# plan: FITS on 4 x 8 H100 80GB: peak ")
    text = "\n".join(out)
    assert '"gradient_accumulation_steps": 16,' in text and '"bf16": {\n    "enabled": true' in text


def test_plan_command_prints_the_table_and_the_verdict(capsys):
    from dwmtrain.launch.cli import main

    assert main(["plan", "--config", "paper_370m", "--nodes", "1", "--gpus-per-node", "8", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    for part in ("per device (training):", "meta job per process", "checkpoints: ", "time per stage at 40% MFU"):
        assert part in out
    assert out.strip().splitlines()[-1].startswith("plan: FITS on 1 x 8 H100 80GB")
    assert main(["plan", "--config", "paper_370m", "--gpus-per-node", "3"]) == 2  # 4096 sequences over 3 ranks
    assert "not divisible" in capsys.readouterr().err


def test_a_dwm_on_the_lms_states_costs_its_head_only():
    cfg = load_config("experiments/scale/llama3.1-8b_4x8h100")
    paper = make_plan(cfg, 4, 8, parse_device("h100"))
    lm = make_plan(load_config("experiments/scale/llama3.1-8b_4x8h100", ["dwm.features=lm", "dwm.backbone=lm"]), 4, 8,
                   parse_device("h100"))  # fmt: skip
    assert lm.dwm_params < paper.dwm_params / 4  # attention across the micro-batch (4 H^2) and 2 linears only
    assert {i.name: i.nbytes for i in lm.items}[
        "DWM (frozen weights + forward)"
    ] == lm.dwm_params * 2  # bf16 weights, no backbone forward
    assert lm.flops_per_token < paper.flops_per_token
