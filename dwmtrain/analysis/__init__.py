"""Analysis of trained runs: per-sample DWM scores and how each stage's data preference differs.

Names are imported on first use, so ``dwmtrain.analysis.cli`` (imported by every ``dwmtrain`` command) loads
neither torch nor matplotlib.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnalysisError": "preferences",
    "StageScores": "preferences",
    "analyze_preferences": "preferences",
    "choose_samples": "preferences",
    "compute_preferences": "preferences",
    "quality_scores": "preferences",
    "rankdata": "preferences",
    "score_dataset": "preferences",
    "score_records": "preferences",
    "spearman": "preferences",
    "summary_text": "preferences",
    "write_outputs": "preferences",
    "write_records": "preferences",
    "save_png": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
