"""What every checkpoint records about the run that wrote it, and which changes a resume refuses."""

from __future__ import annotations

import hashlib
import json

from dwmtrain.data.mixture import data_identity
from dwmtrain.errors import ResumeError

# Changing any of these makes the saved state unusable for this run.
BREAKING = {
    "model_preset": "model.preset",
    "model_shape": "the model's shape (model.preset / model.hf_config / model.init_from)",
    "vocab_size": "model.vocab_size",
    "max_seq_len": "model.max_seq_len",
    "seq_len": "data.seq_len",
    "tokenizer_sha256": "data.tokenizer (its sha256)",
    "global_batch_size": "the global batch (deepspeed.global_batch_size/_tokens)",
    "dwm_backbone": "dwm.backbone",
    "meta_mode": "meta.mode",
    "data_sha": "the training data (data.train_data's index, or data.sources: a source's path, weight, name or index)",
    "seed": "run.seed (the data order)",
    "zero_stage": "deepspeed.zero_stage (what each rank's shards hold)",
    "tensor_parallel": "deepspeed.tensor_parallel_size (how each matrix is split)",
}


def compat_fields(cfg, world: int, global_batch: int, spec, tok_sha: str, starts: list[int]) -> dict:
    """What every checkpoint records and a resume compares (``BREAKING`` says which changes break it); ``spec``
    is the LM's ``ModelSpec``."""
    shape = spec.shape()
    external = cfg.model.hf_config or cfg.model.init_from  # (a run from init_from names its kept config as hf_config)
    return {
        "model_preset": "hf-config" if external else cfg.model.preset,
        "model_shape": hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16],
        "vocab_size": spec.vocab_size,
        "max_seq_len": cfg.model.max_seq_len,
        "seq_len": cfg.data.seq_len,
        "tokenizer_sha256": tok_sha,
        "global_batch_size": global_batch,
        "world_size": world,
        "zero_stage": cfg.deepspeed.zero_stage,
        "tensor_parallel": cfg.deepspeed.tensor_parallel_size,
        "dwm_backbone": cfg.dwm.backbone,
        "meta_mode": cfg.meta.mode,
        "data_sha": data_identity(cfg.data),
        "data_kind": "blend" if cfg.data.sources else "prepared",
        "change_mixture": cfg.data.change_mixture,
        "seed": cfg.run.seed,
        "total_steps": cfg.stages.total_steps,
        "init_from": cfg.model.init_from,
        "stage_starts": starts,
        "config_sha256": cfg.hash(),
    }


def check_compatible(saved: dict, current: dict) -> list[str]:
    """Raise ResumeError listing breaking changes; return notes for harmless ones."""
    # data.change_mixture: a blend may become another blend (not a prepared directory, nor one a blend)
    blends = saved.get("data_kind") == current.get("data_kind") == "blend"
    allowed = {"data_sha"} if current.get("change_mixture") and blends else set()
    broken = [
        f"{BREAKING[k]}: checkpoint has {saved.get(k)!r}, now {current.get(k)!r}"
        + (
            " (data.change_mixture=true lets a resume change a blend's sources or weights)"
            if k == "data_sha" and blends
            else ""
        )
        for k in BREAKING
        if k in saved and saved.get(k) != current.get(k) and k not in allowed
    ]
    if broken:
        raise ResumeError("the config changed in a way that breaks this run: " + "; ".join(broken))
    return [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in current
        if (k not in BREAKING or k in allowed) and saved.get(k) != current.get(k)
    ]
