import json

import pytest

from dwmtrain.config import (
    Config,
    ConfigError,
    build_deepspeed_config,
    load_config,
    resolve_batch,
)


def test_defaults_validate_and_roundtrip(tmp_path):
    cfg = Config()
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert load_config(p).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "override, field",
    [
        ("model.preset=13b", "model.preset"),
        ("run.keep_last=0", "run.keep_last"),
        ("data.val_source=wiki", "data.val_source"),
        ("dwm.uniform_mix=1.5", "dwm.uniform_mix"),
        ("stages.num_stages=0", "stages.num_stages"),
        ("stages.boundaries=[5,3,8,9]", "stages.boundaries"),
        ("meta.grad_mode=magic", "meta.grad_mode"),
        ("meta.v=sometimes", "meta.v"),
        ("dwm.dtype=fp8", "dwm.dtype"),
        ("dwm.features=tokens", "dwm.features"),
        ("optimizer.betas=[0.9]", "optimizer.betas"),
        ("deepspeed.precision=fp8", "deepspeed.precision"),
        ("deepspeed.micro_batch_size=0", "deepspeed.micro_batch_size"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("model.hiden=3", "model.hiden"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_a_dwm_on_the_lms_states_takes_no_backbone_of_its_own():
    assert load_config(None, ["dwm.features=lm"]).dwm.backbone == "lm"
    with pytest.raises(ConfigError, match="dwm.backbone='tiny': dwm.features=lm reads the LM's own hidden states"):
        load_config(None, ["dwm.features=lm", "dwm.backbone=tiny"])
    with pytest.raises(ConfigError, match="dwm.refresh_backbone=True: dwm.features=lm has no backbone"):
        load_config(None, ["dwm.features=lm", "dwm.refresh_backbone=true"])


def test_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  preset: small\nstages:\n  total_steps: 50\n  num_stages: 5\n")
    cfg = load_config(p, ["stages.num_stages=2", "optimizer.lr=1e-3", "stages.boundaries=[30]"])
    assert cfg.model.preset == "small" and cfg.stages.num_stages == 2
    assert cfg.optimizer.lr == 1e-3 and cfg.stages.boundaries == [30]


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_batch_arithmetic():
    p = resolve_batch(micro=8, world=4, seq_len=1024, global_tokens=4 * 1024 * 1024)
    assert p.global_batch_size == 4096 and p.gradient_accumulation_steps == 128
    assert resolve_batch(8, 2, 64, accum=3).global_batch_size == 48
    with pytest.raises(ConfigError, match="global_batch_size=100"):
        resolve_batch(8, 2, 64, global_batch=100)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=3"):
        resolve_batch(8, 2, 64, global_batch=64, accum=3)
    with pytest.raises(ConfigError, match="contradicts"):
        resolve_batch(8, 2, 64, global_batch=32, global_tokens=64 * 64)


def test_contradictory_batch_in_config_names_fields():
    with pytest.raises(ConfigError, match="deepspeed.global_batch_size"):
        load_config(None, ["data.seq_len=64", "deepspeed.global_batch_tokens=4096", "deepspeed.global_batch_size=32"])


def test_deepspeed_json_generated_from_one_place():
    cfg = load_config(None, ["data.seq_len=64", "deepspeed.global_batch_size=64", "optimizer.lr=3e-4"])
    ds = build_deepspeed_config(cfg, world=2, accelerator="cpu")
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is False and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["optimizer"]["params"]["torch_adam"] is True
    gpu = build_deepspeed_config(cfg, world=8, accelerator="cuda")
    assert gpu["bf16"]["enabled"] is True and "torch_adam" not in gpu["optimizer"]["params"]  # FusedAdam
    torch_adam = load_config(None, ["data.seq_len=64", "optimizer.implementation=torch"])
    assert build_deepspeed_config(torch_adam, world=8, accelerator="cuda")["optimizer"]["params"]["torch_adam"] is True
    with pytest.raises(ConfigError, match=r"optimizer.implementation"):
        load_config(None, ["optimizer.implementation=apex"])
    z = ds["zero_optimization"]
    assert (z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) == (50_000_000, 100_000)
    assert "offload_optimizer" not in z and "offload_param" not in z
    knobs = ["deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu", "deepspeed.reduce_bucket_size=1000000"]
    off = build_deepspeed_config(load_config(None, knobs), 1, "cuda")["zero_optimization"]
    assert off["offload_optimizer"]["device"] == off["offload_param"]["device"] == "cpu"
    assert off["reduce_bucket_size"] == 1_000_000
    json.dumps(ds)
    with pytest.raises(ConfigError, match="world_size|not divisible"):
        build_deepspeed_config(cfg, world=3, accelerator="cpu")


def test_template_may_not_hold_batch_sizes(tmp_path):
    t = tmp_path / "t.json"
    t.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 3}}')
    cfg = load_config(None, [f"deepspeed.template={t}"])
    with pytest.raises(ConfigError, match="train_batch_size belongs in the run config"):
        build_deepspeed_config(cfg, 1, "cpu")


def test_zero_knobs_are_validated_and_never_set_twice(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed.offload_params='cpu': needs deepspeed.offload_optimizer=cpu"):
        load_config(None, ["deepspeed.offload_params=cpu"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=3: with deepspeed.tensor_parallel_size=2: DeepSp"):
        load_config(None, ["deepspeed.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="deepspeed.offload_params='cpu': needs deepspeed.zero_stage=3"):
        load_config(None, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"])
    with pytest.raises(ConfigError, match="deepspeed.prefetch_bucket_size=0"):
        load_config(None, ["deepspeed.prefetch_bucket_size=0"])
    with pytest.raises(ConfigError, match="deepspeed.template='zero3_offload': is gone: set deepspeed.offload_opt"):
        load_config(None, ["deepspeed.template=zero3_offload"])
    t = tmp_path / "t.json"
    t.write_text('{"zero_optimization": {"reduce_bucket_size": 5}}')
    with pytest.raises(ConfigError, match=r"reduce_bucket_size belongs in the run config \(deepspeed.reduce_buc"):
        build_deepspeed_config(load_config(None, [f"deepspeed.template={t}"]), 1, "cpu")
    t.write_text('{"zero_optimization": {"stage": 2}}')
    with pytest.raises(ConfigError, match=r"zero_optimization.stage belongs in the run config \(deepspeed.zero_st"):
        build_deepspeed_config(load_config(None, [f"deepspeed.template={t}"]), 1, "cpu")


def test_tensor_parallel_layout_in_the_deepspeed_json_and_the_batch():
    """TP=2 on 4 ranks: 2 data-parallel ranks carry the batch; ZeRO-1 without ZeRO-3's knobs; AutoTP splits the
    attention and MLP matrices and nothing else (the embedding, norms and LM head stay whole)."""
    import re

    from dwmtrain.config import batch_plan

    cfg = load_config("tiny", ["deepspeed.tensor_parallel_size=2", "deepspeed.zero_stage=1",
                               "deepspeed.global_batch_size=32"])  # fmt: skip
    plan = batch_plan(cfg, 4)
    assert (plan.world_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (2, 2, 32)
    ds = build_deepspeed_config(cfg, 4, "cpu")
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2
    z = ds["zero_optimization"]
    assert z["stage"] == 1 and not [k for k in z if k.startswith("stage3_")], z
    tp = ds["tensor_parallel"]
    assert tp["autotp_size"] == 2 and tp["partition_config"]["use_default_specs"] is False
    specs = tp["partition_config"]["layer_specs"]

    def split(name):
        kinds = [s["partition_type"] for s in specs if any(re.match(p, name) for p in s["patterns"])]
        assert len(kinds) <= 1, (name, kinds)
        return kinds[0] if kinds else "whole"

    layer = "model.layers.3."
    assert [split(layer + m + ".weight") for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
            "mlp.gate_proj", "mlp.up_proj")] == ["column"] * 5  # fmt: skip
    assert split(layer + "self_attn.q_proj.bias") == "column"  # Qwen2's q/k/v bias follows its rows
    assert [split(layer + m + ".weight") for m in ("self_attn.o_proj", "mlp.down_proj")] == ["row"] * 2
    for whole in ("model.embed_tokens.weight", "lm_head.weight", layer + "input_layernorm.weight",
                  layer + "self_attn.q_norm.weight", "model.norm.weight"):  # fmt: skip
        assert split(whole) == "whole", whole
    with pytest.raises(ConfigError, match="deepspeed.tensor_parallel_size=2: does not divide the world of 3 ranks"):
        batch_plan(cfg, 3)
    assert "tensor_parallel" not in build_deepspeed_config(load_config("tiny", []), 2, "cpu")


def test_stage_schedule():
    from dwmtrain.config.stages import is_boundary, stage_of, stage_starts

    assert stage_starts(100, 5) == [0, 20, 40, 60, 80]
    assert stage_starts(11, 3) == [0, 4, 8]
    assert stage_starts(100, 3, [10, 50]) == [0, 10, 50]
    s = stage_starts(10, 2)
    assert [stage_of(i, s) for i in range(10)] == [1] * 5 + [2] * 5
    assert is_boundary(5, s) and not is_boundary(0, s)
    with pytest.raises(ValueError):
        stage_starts(10, 3, [5])


def _dry_run(*args, world="1"):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "dwmtrain", "train", "--dry-run", "--gpus-per-node", world, *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_dry_run_checks_what_the_config_points_at(tmp_path, prepared, sp_model):
    p = _dry_run("--config", "tiny", f"data.train_data={tmp_path / 'nope'}", "data.raw=[]",
                 f"data.tokenizer={tmp_path / 'tok.model'}", f"data.lambada_path={tmp_path / 'l.jsonl'}")  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr and "model:" not in p.stdout
    for field in ("data.train_data=", "data.tokenizer=", "data.lambada_path="):
        assert field in p.stderr
    p = _dry_run(
        "--config", "tiny", f"data.train_data={prepared}", "meta.mode=fixed", f"meta.fixed.dwm_path={tmp_path}/w"
    )
    assert p.returncode == 2 and "meta.fixed.dwm_path: DWM file" in p.stderr and "not found" in p.stderr
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", "model.vocab_size=512")
    assert p.returncode == 2 and "4096 pieces but model.vocab_size=512" in p.stderr
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", "data.seq_len=64")
    assert p.returncode == 0 and "train_batch_size" in p.stdout
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", "data.seq_len=128")  # prepared at 64
    assert p.returncode == 2 and "prepared with seq_len=64, but data.seq_len=128" in p.stderr
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", "data.lambada_path=/nowhere/l.jsonl")
    assert p.returncode == 2 and "tools/fetch_eval_data.py" in p.stderr and "data.val_source=heldout" in p.stderr
    assert p.stderr.count("error (") == 1  # one process: said once


def test_train_refuses_a_mistyped_flag_before_anything_is_launched(capsys):
    from dwmtrain.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--nprocs", "2", "--config", "tiny"])
    assert e.value.code == 2 and "unrecognized arguments: --nprocs" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--config", "tiny", "stages.num_stages"]) == 2  # not key=value
    assert "stages.num_stages: not an option of a training run nor a key=value override" in capsys.readouterr().err
    assert main(["train", "--nproc", "2", "--config", "tiny", "--run-dir", "/tmp/x", "--print-only"]) == 0
    cmd = capsys.readouterr().out
    assert "--num_gpus 2 --module dwmtrain.launch.pretrain --config tiny --run-dir /tmp/x" in cmd


def test_config_errors_come_before_the_resolved_config_and_name_the_field_set(prepared):
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", world="3")  # 32 sequences over 3 ranks
    assert p.returncode == 2 and "model:" not in p.stdout and "deepspeed.global_batch_size=32" in p.stderr
    p = _dry_run("--config", "tiny", f"data.train_data={prepared}", "stages.num_stages=30")
    assert p.returncode == 2 and "stages.num_stages=30" in p.stderr and "boundaries" not in p.stderr


def test_the_boundarys_v_refuses_the_unrolled_reference():
    with pytest.raises(ConfigError, match=r"meta.v.*unrolled reference takes a lookahead"):
        load_config(None, ["meta.v=boundary", "meta.grad_mode=unrolled"])
    with pytest.raises(ConfigError, match=r"meta.lookahead.*unrolled reference is the SGD lookahead's"):
        load_config(None, ["meta.lookahead=adam", "meta.grad_mode=unrolled"])
    with pytest.raises(ConfigError, match=r"meta.lookahead"):
        load_config(None, ["meta.lookahead=lion"])
