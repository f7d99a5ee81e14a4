"""Check what a config points at before any process group, GPU or hour is spent (``--dry-run`` and the
start of every run): each problem is one line naming the field and the path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from dwmtrain.config import Config
from dwmtrain.errors import ConfigError


def check_inputs(cfg: Config) -> None:
    """Raise ConfigError listing every missing or unusable input the config names."""
    from dwmtrain.rundir import RunDir

    pinned = RunDir(cfg.run.run_dir).model_config  # a model.init_from run's own copy of the model's config
    if cfg.model.init_from and not cfg.model.hf_config and pinned.is_file():
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=str(pinned)))
    problems = data_problems(cfg) + dwm_problems(cfg) + backbone_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))


def data_problems(cfg: Config) -> list[str]:
    """The prepared data (or the raw documents to prepare it from), the tokenizer and the validation source."""
    problems = []
    d = cfg.data
    train_index = Path(d.train_data) / "index.json"
    if not train_index.is_file():
        missing_raw = [r for r in d.raw if not Path(r).exists()]
        if not d.raw:
            problems.append(f"data.train_data={d.train_data}: no prepared data there ({train_index} not found)")
        elif missing_raw:
            problems.append(f"data.raw: {', '.join(missing_raw)} not found (and data.train_data is not prepared)")
    if not Path(d.tokenizer).exists():
        problems.append(f"data.tokenizer={d.tokenizer}: not found")
    else:
        from dwmtrain.data.tokenizer import check_vocab, load_tokenizer
        from dwmtrain.errors import DWMTrainError
        from dwmtrain.models.spec import lm_spec

        try:
            vocab = lm_spec(cfg.model).vocab_size
            padded = bool(cfg.model.hf_config or cfg.model.init_from)
            check_vocab(load_tokenizer(d.tokenizer).vocab_size, vocab, d.tokenizer, padded=padded)
        except DWMTrainError as e:
            problems.append(f"data.tokenizer: {e}")
    if d.val_source == "lambada" and not Path(d.lambada_path).is_file():
        problems.append(f"data.lambada_path={d.lambada_path}: not found (data.val_source=lambada)")
    if d.val_source == "heldout":
        held = Path(d.heldout_data or d.train_data) / "index.json"
        field = "data.heldout_data" if d.heldout_data else "data.train_data"
        if held.is_file() and "heldout" not in json.loads(held.read_text()).get("splits", {}):
            problems.append(f"{field}: {held.parent} has no heldout split (data.val_source=heldout)")
        elif not held.is_file() and (d.heldout_data or not d.raw):
            problems.append(f"{field}={held.parent}: no prepared data there (data.val_source=heldout)")
    return problems


def dwm_problems(cfg: Config) -> list[str]:
    """The DWM files a fixed or transfer run reads: present, readable and of the architecture this run builds."""
    from dwmtrain.models.dwm import DWMArch, DWMFileError, arch_from_meta, arch_mismatch, meta_path, read_dwm_meta

    if cfg.meta.mode == "fixed":
        try:
            read_dwm_meta(cfg.meta.dwm_path)
        except DWMFileError as e:
            return [f"meta.dwm_path: {e}"]
    if cfg.meta.init_dwm:
        return init_dwm_problems(cfg)
    if cfg.meta.mode != "transfer":
        return []
    from dwmtrain.models.spec import lm_spec
    from dwmtrain.rundir import RunDir

    problems = []
    want = DWMArch.from_config(cfg, lm_spec(cfg.model).vocab_size)
    for k in range(2, cfg.stages.num_stages + 1):
        path = RunDir(cfg.meta.dwm_run).dwm(k)
        try:  # the sidecar only: the tensors are verified when the stage starts
            arch = arch_from_meta(read_dwm_meta(path).get("arch"), f"DWM metadata {meta_path(path)}")
        except DWMFileError as e:
            problems.append(f"meta.dwm_run={cfg.meta.dwm_run}: stage {k}: {e}")
            continue
        if diff := arch_mismatch(arch, want):  # found now, not after a whole first stage
            problems.append(f"meta.dwm_run={cfg.meta.dwm_run}: stage {k}: another DWM architecture: " + "; ".join(diff))
    return problems


def init_dwm_problems(cfg: Config) -> list[str]:
    """A warm start's DWM (meta.init_dwm): found, readable, of the architecture this run builds (its tokenizer is
    checked against the data's when the run starts)."""
    from dwmtrain.models.dwm import DWMArch, DWMFileError, arch_from_meta, arch_mismatch, meta_path, read_dwm_meta
    from dwmtrain.models.spec import lm_spec
    from dwmtrain.rundir import dwm_source

    try:
        path = dwm_source(cfg.meta.init_dwm)
        arch = arch_from_meta(read_dwm_meta(path).get("arch"), f"DWM metadata {meta_path(path)}")
    except (DWMFileError, FileNotFoundError) as e:
        return [f"meta.init_dwm: {e}" if "meta.init_dwm" not in str(e) else str(e)]
    if diff := arch_mismatch(arch, DWMArch.from_config(cfg, lm_spec(cfg.model).vocab_size)):
        return [f"meta.init_dwm={cfg.meta.init_dwm}: {path} is another DWM architecture: " + "; ".join(diff)]
    return []


def backbone_problems(cfg: Config) -> list[str]:
    """A bilevel run whose first meta job would copy the LM into a backbone of another shape: said now, not at the
    first stage boundary."""
    if cfg.meta.mode != "bilevel" or not cfg.dwm.init_backbone_from_lm:
        return []
    from dwmtrain.models.dwm import DWMArch
    from dwmtrain.models.spec import lm_spec

    lm = lm_spec(cfg.model)
    lm_shape, bb_shape = lm.shape(), DWMArch.from_config(cfg, lm.vocab_size).backbone_spec().shape()
    diff = [f"{k} {bb_shape[k]} vs the LM's {lm_shape[k]}" for k in lm_shape if lm_shape[k] != bb_shape.get(k)]
    if not diff:
        return []
    return [f"dwm.backbone={cfg.dwm.backbone}: dwm.init_backbone_from_lm copies the LM into the DWM's backbone, which "
            f"needs the LM's shape ({', '.join(diff[:3])}); set dwm.backbone=lm (or the LM's preset), or "
            "dwm.init_backbone_from_lm=false"]  # fmt: skip
