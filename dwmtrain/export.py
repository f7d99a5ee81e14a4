"""A checkpoint of a run as a Hugging Face model directory (``dwmtrain export``).

The directory holds ``model.safetensors``, ``config.json``, ``generation_config.json`` and the run's
tokenizer exported so it tokenizes exactly like its sentencepiece model; ``AutoModelForCausalLM`` and
``AutoTokenizer`` load it without ``trust_remote_code``, so lm-eval and any HF tool can read it.
``dwmtrain_export.json`` records where it came from (run, checkpoint, step, stage, config hash).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dwmtrain.checkpoint.state import read_marker
from dwmtrain.config import Config, load_config
from dwmtrain.errors import DWMTrainError
from dwmtrain.fileio import atomic_dir
from dwmtrain.rundir import RunDir

FORMAT = "dwmtrain-hf-export-v1"


class ExportError(DWMTrainError):
    """The run or checkpoint cannot be exported (missing, incomplete, or the output exists)."""


def run_config(run_dir: str | os.PathLike) -> Config:
    """The resolved config a run was trained with (``RUN_DIR/config.yaml``)."""
    rd = RunDir(run_dir)
    if not rd.config.is_file():
        raise ExportError(f"{rd.root}: not a dwmtrain run directory (no {rd.config.name})")
    return load_config(rd.config)


def resolve_tag(rd: RunDir, checkpoint: str | None) -> str:
    """``checkpoint`` (a tag like step0000100, or a step number), else the newest complete checkpoint."""
    tags = rd.complete_tags()
    if checkpoint:
        tag = RunDir.tag(int(checkpoint)) if checkpoint.isdigit() else checkpoint
        if tag not in tags:
            raise ExportError(
                f"{rd.checkpoint(tag)}: no complete checkpoint (complete ones: {', '.join(tags) or 'none'})"
            )
        return tag
    if not tags:
        raise ExportError(f"{rd.checkpoints}: no complete checkpoint to export")
    return tags[-1]


def hf_model(cfg: Config, state: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """The architecture's plain HF causal LM (standard attention, KV cache on) holding the checkpoint's weights."""
    from transformers import AutoModelForCausalLM

    from dwmtrain.models.lm import load_lm_state
    from dwmtrain.models.spec import lm_spec

    spec = lm_spec(cfg.model)
    hf_cfg = spec.hf_config("sdpa")  # as trained
    hf_cfg.use_cache = True  # generation and lm-eval; training turned it off
    model = AutoModelForCausalLM.from_config(hf_cfg)
    if bad := load_lm_state(model, state):
        raise ExportError(f"checkpoint weights do not fit the model {spec.name}: {bad[:3]}")
    return model.to(dtype).eval()


def export_checkpoint(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    checkpoint: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Write checkpoint ``checkpoint`` (default: the newest) of ``run_dir`` as an HF directory ``out``."""
    from dwmtrain.checkpoint import consolidated_lm_state

    rd, out = RunDir(run_dir), Path(out)
    cfg = run_config(rd.root)
    tag = resolve_tag(rd, checkpoint)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --overwrite to replace it (only once the new export is complete)")
    if out.exists() and not (out.is_dir() and not out.is_symlink() and (out / "dwmtrain_export.json").is_file()):
        raise ExportError(f"{out}: --overwrite replaces only an earlier dwmtrain export, and this is not one")
    marker = read_marker(rd.marker(tag))
    tokenizer_sha = check_tokenizer(cfg, marker.get("compat", {}).get("tokenizer_sha256"), tag)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = hf_model(cfg, consolidated_lm_state(rd, tag), torch_dtype)
    info = {
        "format": FORMAT,
        "run_dir": str(rd.root.resolve()),
        "checkpoint": tag,
        "step": marker["step"],
        "stage": marker["stage"],
        "stage_boundary": marker.get("stage_boundary", False),
        "config_sha256": marker.get("config_sha256", ""),
        "dtype": dtype,
        "tokenizer_sha256": tokenizer_sha,
    }
    with atomic_dir(out, overwrite=True) as tmp:  # the old export goes only once the new one is complete
        write_export(tmp, model, cfg, info)
    return info


def check_tokenizer(cfg: Config, want: str | None, tag: str) -> str:
    """The sha256 of the run's tokenizer, refused unless it is the one checkpoint ``tag`` was trained with."""
    from dwmtrain.data.tokenizer import load_tokenizer

    if not os.path.exists(cfg.data.tokenizer):
        raise ExportError(f"data.tokenizer={cfg.data.tokenizer}: not found (the run's tokenizer is exported with it)")
    sha = load_tokenizer(cfg.data.tokenizer).sha256
    if want and sha != want:
        raise ExportError(
            f"data.tokenizer={cfg.data.tokenizer} is not the tokenizer checkpoint {tag} was trained with "
            f"(sha256 {want[:12]}...): restore that file"
        )
    return sha


def write_export(tmp: Path, model, cfg: Config, info: dict) -> None:
    """The model, its generation config and the tokenizer's files side by side, as HF expects, and the record."""
    from transformers import GenerationConfig

    from dwmtrain.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.data.tokenizer)
    model.save_pretrained(tmp, safe_serialization=True)
    GenerationConfig(
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id, max_length=cfg.data.seq_len
    ).save_pretrained(tmp)
    tok_dir = tok.export_hf(tmp / "tokenizer")
    for f in tok_dir.iterdir():
        f.rename(tmp / f.name)
    tok_dir.rmdir()
    (tmp / "dwmtrain_export.json").write_text(json.dumps(info, indent=1))
