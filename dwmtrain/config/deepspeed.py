"""The DeepSpeed JSON, generated from the config tree plus a ZeRO template (``ds_configs/`` at the top of the
checkout, where DeepSpeed users look for them; the wheel ships the same files as ``dwmtrain/ds_configs/``): batch
sizes, precision, clipping and the optimizer come from the tree, never from the template."""

from __future__ import annotations

import json
from pathlib import Path

from dwmtrain.config.batch import batch_plan
from dwmtrain.config.schema import PACKAGE_DIR
from dwmtrain.errors import ConfigError

#: an installed wheel's templates (pyproject's package-dir maps ds_configs/ there), else the checkout's
DS_TEMPLATE_DIR = next((d for d in (PACKAGE_DIR / "ds_configs", PACKAGE_DIR.parent / "ds_configs") if d.is_dir()),
                       PACKAGE_DIR.parent / "ds_configs")  # fmt: skip


#: zero_optimization key -> the deepspeed.* field that sets it
ZERO_KNOBS = {
    "stage": "zero_stage",
    "stage3_prefetch_bucket_size": "prefetch_bucket_size",
    "stage3_param_persistence_threshold": "param_persistence_threshold",
    "reduce_bucket_size": "reduce_bucket_size",
    "stage3_max_live_parameters": "max_live_parameters",
    "offload_optimizer": "offload_optimizer",
    "offload_param": "offload_params",
}


#: AutoTP's split of a Llama-family decoder layer (Llama, Mistral, Qwen2/3 name them alike): q/k/v and the MLP's
#: gate/up split by output rows (column-parallel), o_proj and down_proj by input columns (row-parallel, one
#: all-reduce each). Everything else stays whole on every rank: the embedding, the norms and the LM head, whose
#: full-vocabulary output the fused per-sample loss needs (models.lm.LossHead)
TP_LAYER_SPECS = [
    {"patterns": [r".*\.o_proj\.weight$", r".*\.down_proj\.weight$"], "partition_type": "row"},
    {"patterns": [r".*\.[qkv]_proj\.(weight|bias)$", r".*\.(gate|up)_proj\.weight$"], "partition_type": "column"},
]


def zero_knobs(ds) -> dict:
    """The zero_optimization entries the config tree owns (ZeRO-3's own only at stage 3)."""
    out = {key: getattr(ds, name) for key, name in ZERO_KNOBS.items()
           if not key.startswith("offload") and (ds.zero_stage == 3 or not key.startswith("stage3_"))}  # fmt: skip
    if ds.offload_optimizer == "cpu":
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_params == "cpu":
        out["offload_param"] = {"device": "cpu", "pin_memory": True}
    return out


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision == "auto":
        return "fp32" if accelerator == "cpu" else "bf16"
    if accelerator == "cpu" and precision == "fp16":  # DeepSpeed's CPU accelerator has bf16, not fp16
        raise ConfigError("deepspeed.precision=fp16: the CPU accelerator trains in fp32 or bf16 (GPUs: fp16 too)")
    return precision


def build_deepspeed_config(cfg, world: int, accelerator: str) -> dict:
    """Generate the DeepSpeed JSON from the config tree plus a ZeRO template."""
    ds = cfg.deepspeed
    tpath = DS_TEMPLATE_DIR / f"{ds.template}.json" if "/" not in ds.template else Path(ds.template)
    if not tpath.is_file() and Path(ds.template).is_file():
        tpath = Path(ds.template)
    try:
        template = json.loads(tpath.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.template={ds.template!r}: {tpath} not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed template {tpath}: invalid JSON at line {e.lineno}: {e.msg}") from None
    for forbidden in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if forbidden in template:
            raise ConfigError(
                f"deepspeed template {tpath}: {forbidden} belongs in the run config (deepspeed.*), not the template"
            )
    for key, field_name in ZERO_KNOBS.items():
        if key in template.get("zero_optimization", {}):
            raise ConfigError(f"deepspeed template {tpath}: zero_optimization.{key} belongs in the run config "
                              f"(deepspeed.{field_name}), not the template")  # fmt: skip
    plan = batch_plan(cfg, world)
    prec = resolve_precision(ds.precision, accelerator)
    out = dict(template)
    zero = {k: v for k, v in template.get("zero_optimization", {}).items()
            if ds.zero_stage == 3 or not k.startswith("stage3_")}  # fmt: skip
    out["zero_optimization"] = {**zero, **zero_knobs(ds)}
    if ds.tensor_parallel_size > 1:
        out["tensor_parallel"] = {
            "autotp_size": ds.tensor_parallel_size,
            "partition_config": {"use_default_specs": False, "layer_specs": TP_LAYER_SPECS},
        }
    out.update(
        train_batch_size=plan.global_batch_size,
        train_micro_batch_size_per_gpu=plan.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        gradient_clipping=cfg.optimizer.grad_clip,
        bf16={"enabled": prec == "bf16"},
        fp16={"enabled": prec == "fp16"},
        steps_per_print=10**9,  # we log ourselves
        wall_clock_breakdown=False,
    )
    opt = cfg.optimizer
    out["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": opt.lr,
            "betas": list(opt.betas),
            "eps": opt.eps,
            "weight_decay": opt.weight_decay,
        },
    }
    if ds.offload_optimizer == "none" and (accelerator == "cpu" or opt.implementation == "torch"):
        # The fused CUDA Adam does not exist on the CPU accelerator; torch's AdamW does the same math.
        out["optimizer"]["params"]["torch_adam"] = True
    return out
