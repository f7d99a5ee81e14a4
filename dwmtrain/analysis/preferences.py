"""Which data does each stage's DWM prefer? (the paper's Section 5.3, Figures 3 and 5): the analysis of one run.

The same samples, cut into the same micro-batches, are scored by every stage's DWM of a run
(``analysis.scoring``); the numbers (``analysis.stats``), the summary (``analysis.summary``) and the figures
(``analysis.figures``) are written into one directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.analysis.figures import plot_domains, plot_quality, plot_rank_correlation, plot_weights_hist
from dwmtrain.analysis.scoring import choose_samples, quality_scores, resolve_device, sample_texts, score_dataset
from dwmtrain.analysis.stats import StageScores, compute_preferences
from dwmtrain.analysis.summary import summary_text
from dwmtrain.errors import AnalysisError, DataError
from dwmtrain.fileio import atomic_write_text


def write_outputs(report: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Figures, preferences.json and summary.txt into ``out``; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "domains.png": plot_domains(report, out / "domains.png"),
        "weights_hist.png": plot_weights_hist(report, out / "weights_hist.png"),
        "rank_correlation.png": plot_rank_correlation(report, out / "rank_correlation.png"),
    }
    if report["quality_fields"]:
        files["quality.png"] = plot_quality(report, out / "quality.png")
    atomic_write_text(out / "preferences.json", json.dumps(_finite(report), indent=1) + "\n")
    atomic_write_text(out / "summary.txt", summary_text(report) + "\n")
    files["preferences.json"], files["summary.txt"] = out / "preferences.json", out / "summary.txt"
    return files


def _finite(x):
    """NaN/inf -> None, so the JSON is strict."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def load_run(run_dir: str | os.PathLike):
    """(RunDir, Config) of a run directory, with errors naming the path."""
    from dwmtrain.config import load_config
    from dwmtrain.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.root.is_dir():
        raise AnalysisError(f"run directory {rd.root}: not found")
    if not rd.config.is_file():
        raise AnalysisError(f"{rd.config}: not found (not a dwmtrain run directory?)")
    return rd, load_config(rd.config)


def stage_dwm_files(rd, num_stages: int) -> tuple[list[tuple[int, Path]], list[tuple[int, Path]]]:
    """([(stage, path)] present, [(stage, path)] missing) for stages 2..num_stages (stage 1 is uniform)."""
    present, missing = [], []
    for k in range(2, num_stages + 1):
        (present if rd.dwm(k).is_file() else missing).append((k, rd.dwm(k)))
    return present, missing


def open_split(data: str | os.PathLike, split: str, origin: str = ""):
    """TokenDataset of ``data``/``split``; a missing directory is named with where the path came from."""
    from dwmtrain.data.dataset import TokenDataset

    if not Path(data).is_dir():
        raise DataError(f"data directory {data}{origin}: not found")
    return TokenDataset(data, split)


@dataclass(frozen=True)
class PreferenceRequest:
    """What ``analyze-preferences`` analyses: a run's stage DWMs on the same samples of a split."""

    run_dir: str
    samples: int = 4096
    split: str = "heldout"
    data: str | None = None  #: prepared data whose split is scored (default: the run's data.train_data)
    out: str | None = None  #: where the figures and numbers go (default: RUN/analysis)
    seed: int = 0
    device: str = "auto"
    split_by: str = "weight"  #: weight | logit: how the high/low halves of a micro-batch are told apart
    #: a local Hugging Face sequence-classification model (e.g. a QuRater): each sample's text, decoded with the
    #: run's tokenizer, is also rated on every label (the quality panels of Figure 3)
    rater: str | None = None
    rater_labels: list[str] | None = None
    rater_max_length: int = 512


def analyze_preferences(req: PreferenceRequest, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    """Score the same samples with every stage's DWM of a run; write figures, JSON and summary; return the report."""
    from dwmtrain.checkpoint.dwm_file import DWMFileError

    rd, cfg = load_run(req.run_dir)
    present, missing = stage_dwm_files(rd, cfg.stages.num_stages)
    for k, p in missing:
        log(f"stage {k}: no DWM file {p}: skipped")
    if not present:
        raise DWMFileError(
            f"{rd.dwm_dir}: no stage DWM files (looked for stage2..stage{cfg.stages.num_stages}.safetensors; "
            "stage 1 is uniform)"
        )
    if req.split_by not in ("weight", "logit"):
        raise AnalysisError(f"split rule {req.split_by!r}: must be weight or logit")
    if not req.data and cfg.data.sources and req.split == "train":  # the run's blend, every source
        from dwmtrain.data.mixture import open_training_data
        from dwmtrain.models.spec import lm_spec

        ds = open_training_data(cfg.data, lm_spec(cfg.model).vocab_size)
    else:
        data = Path(req.data) if req.data else Path(cfg.data.train_data)
        where = "" if data != Path(cfg.data.train_data) else f" (data.train_data of {rd.config})"
        ds = open_split(data, req.split, where)
    micro = cfg.deepspeed.micro_batch_size
    dev, dtype = resolve_device(req.device, cfg.deepspeed.precision)
    idx, notes = choose_samples(len(ds), req.samples, req.seed, micro)
    for note in notes:
        log(note)
    dt_name = str(dtype).split(".")[-1]
    log(f"scoring {len(idx)} {req.split} samples with {len(present)} stage DWM(s) on {dev} ({dt_name})")
    scored = score_stages(rd, cfg, present, ds, idx, (dev, dtype), progress)
    quality = {}
    if req.rater:
        log(f"rating {len(idx)} samples with {req.rater}")
        texts = sample_texts(ds, idx, cfg.data.tokenizer)
        quality = quality_scores(texts, req.rater, dev, req.rater_labels, req.rater_max_length)
    report = compute_preferences(scored, ds.domains[idx], ds.domain_names, micro, quality, req.split_by)
    missing_rel = [{"stage": k, "path": os.path.relpath(p, rd.root)} for k, p in missing]
    report.update(run_dir=str(rd.root), data=str(data), split=req.split, seed=req.seed, device=dev, dtype=dt_name,
                  stages_missing=missing_rel)  # fmt: skip
    out = Path(req.out) if req.out else rd.analysis_dir
    report["files"] = {name: str(p) for name, p in write_outputs(report, out).items()}
    return report


def score_stages(rd, cfg, present: list[tuple[int, Path]], ds, idx, device, progress: bool) -> list[StageScores]:
    """Every stage DWM's weights and logits of the same samples, each DWM rebuilt with the run's architecture
    (temperature, uniform_mix from the config, as training rebuilds it: not the file's)."""
    from dwmtrain.checkpoint.dwm_file import load_dwm_state
    from dwmtrain.models.dwm import DWMArch, dwm_from_state
    from dwmtrain.models.spec import lm_spec

    vocab = lm_spec(cfg.model).vocab_size
    if ds.vocab_size != vocab:
        raise DataError(f"{ds.path}: prepared with a {ds.vocab_size}-piece vocabulary, the run's model has {vocab}")
    arch, micro, scored = DWMArch.from_config(cfg, vocab), cfg.deepspeed.micro_batch_size, []
    for k, p in present:
        _, state, meta = load_dwm_state(p, arch)
        model = dwm_from_state(arch, state).requires_grad_(False)
        w, z = score_dataset(model, ds, idx, micro, *device, with_logits=True, progress=progress)
        scored.append(StageScores(k, os.path.relpath(p, rd.root), w, z, meta))
        del model
    return scored
