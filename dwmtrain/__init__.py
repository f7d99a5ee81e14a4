"""dwmtrain: LLM pretraining with a Data Weighting Model (arXiv 2507.16178) on DeepSpeed ZeRO-3.

The public API (docs/api.md), for a DWM in any training loop::

    from dwmtrain import DWM, weighted_lm_loss, meta_update, DWMTrainer

Its names load on first use: ``import dwmtrain`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "DWM": "dwmtrain.api",
    "meta_update": "dwmtrain.api",
    "weighted_lm_loss": "dwmtrain.api",
    "tokenizer_identity": "dwmtrain.api",
    "TokenizerId": "dwmtrain.api",
    "per_sample_loss": "dwmtrain.models.loss",
    "weighted_loss": "dwmtrain.models.loss",
    "fused_weighted_loss": "dwmtrain.models.loss",
    "MetaConfig": "dwmtrain.config.schema",
    "DWMConfig": "dwmtrain.config.schema",
    "DWMTrainer": "dwmtrain.integrations.hf_trainer",
    "DWMTrainError": "dwmtrain.errors",
    "DWMInputError": "dwmtrain.errors",
    "ConfigError": "dwmtrain.errors",
    "DWMFileError": "dwmtrain.checkpoint.dwm_file",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'dwmtrain' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
