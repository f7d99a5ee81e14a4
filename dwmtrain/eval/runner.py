"""Run lm-evaluation-harness on a Hugging Face model directory, fully offline, on the paper's tasks.

lm-eval does the work (its task runner, prompts and metrics); this module points its tasks at local JSONL files
(``dwmtrain.eval.tasks``), keeps every hub client offline for the call, and returns a plain JSON-able dict.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dwmtrain.errors import DWMTrainError
from dwmtrain.eval.tasks import (
    check_data,
    spec,
    write_task_dir,
)
from dwmtrain.fileio import sha256_file

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class LMEvalError(DWMTrainError):
    """lm-eval cannot run: not installed, or the model directory is not a Hugging Face model."""


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Keep huggingface_hub, datasets and transformers offline inside the block; restore everything after."""
    import datasets.config
    import huggingface_hub.constants

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    # The libraries read these variables once, at import, into module constants; the environment alone would
    # not reach an already imported huggingface_hub or datasets, so the constants are set too.
    saved = [
        (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_HUB_OFFLINE"),
        (datasets.config, "HF_DATASETS_OFFLINE"),
    ]
    saved_values = [(mod, name, getattr(mod, name)) for mod, name in saved if hasattr(mod, name)]
    try:
        for k in _OFFLINE_ENV:
            os.environ[k] = "1"
        for mod, name, _ in saved_values:
            setattr(mod, name, True)
        yield
    finally:
        for mod, name, value in saved_values:
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _number(v: Any) -> float | None:
    """A metric value as a JSON-able float; lm-eval's "N/A" (no stderr) and NaN become None."""
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def _task_result(raw: dict[str, Any], n: int, k: int) -> dict[str, Any]:
    """``{metric: value, metric_stderr: value, n, num_fewshot}`` from lm-eval's ``{"metric,filter": value}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key:  # "alias", "name", "sample_len"
            continue
        metric, _, filt = key.partition(",")
        out[metric if filt == "none" else key] = _number(value)
    out["n"] = n
    out["num_fewshot"] = k
    return out


def _samples(logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """lm-eval's logged samples reduced to what the prompts were: doc id, target and each request's arguments."""
    return [
        {
            "doc_id": int(s["doc_id"]),
            "target": str(s.get("target")),
            # loglikelihood requests are (context, continuation); winogrande varies the context per choice
            "arguments": [[str(a) for a in args] for args in s["arguments"]],
        }
        for s in logged
    ]


def run_lm_eval(
    model_dir: str | os.PathLike,
    tasks: list[str] | tuple[str, ...],
    num_fewshot: int,
    data_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
    limit: int | float | None = None,
    seed: int = 1234,
    cache_dir: str | os.PathLike | None = None,
    bootstrap_iters: int = 100000,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Evaluate the HF model in ``model_dir`` on ``tasks`` with lm-eval, offline, from ``data_dir``'s JSONL files."""
    tasks = list(dict.fromkeys([tasks] if isinstance(tasks, str) else tasks))
    if not tasks:
        raise LMEvalError("no lm-eval tasks given")
    for t in tasks:
        spec(t)  # unknown names fail here, before anything is loaded
    files = check_data(tasks, data_dir)  # missing data fails before lm-eval starts
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise LMEvalError(f"lm-eval model {model_dir}: no config.json (expected a Hugging Face model directory)")
    lm_eval = _import_lm_eval()
    settings = dict(num_fewshot=num_fewshot, batch_size=batch_size, device=device, limit=limit,
                    bootstrap_iters=bootstrap_iters, log_samples=log_samples)  # fmt: skip
    raw = _simple_evaluate(lm_eval, model_dir, dtype, tasks, data_dir, cache_dir, seed, settings)
    if raw is None:  # only on a non-zero rank of a distributed run
        return {}
    results = {
        t: _task_result(raw["results"][t], int(raw["n-samples"][t]["effective"]), int(raw["n-shot"][t])) for t in tasks
    }
    out: dict[str, Any] = {
        "results": results,
        "lm_eval_version": lm_eval.__version__,
        "config": {
            "model_dir": str(model_dir),
            "tasks": tasks,
            "data_dir": str(Path(data_dir).resolve()),
            "dtype": dtype,
            "seed": seed,
            **{k: v for k, v in settings.items() if k != "log_samples"},
            "task_versions": {t: raw["versions"].get(t) for t in tasks},
            "data_files": {
                t: {s: {"path": str(p), "sha256": sha256_file(p)} for s, p in splits.items()}
                for t, splits in files.items()
            },
        },
    }
    if log_samples:
        out["samples"] = {t: _samples(raw["samples"][t]) for t in tasks}
    return out


def _import_lm_eval():
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (its "hf" model needs accelerate: lm-eval's [hf] extra)
    except ImportError as e:
        raise LMEvalError(f"lm-eval cannot run ({e}); install it with: pip install 'lm-eval[hf]'") from e
    return lm_eval


def _simple_evaluate(lm_eval, model_dir: Path, dtype, tasks, data_dir, cache_dir, seed: int, settings: dict):
    """lm-eval's ``simple_evaluate`` on task YAMLs written for this call only, with every hub client offline."""
    from lm_eval.tasks import TaskManager

    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dwm-lmeval-", dir=cache_dir))
    # The Arrow cache of the JSON files is worth keeping between calls when the caller gives a cache_dir;
    # the task YAMLs are per call (a private directory), so concurrent calls never see each other's.
    ds_cache = Path(cache_dir) / "datasets" if cache_dir is not None else work / "datasets"
    try:
        task_dir = write_task_dir(tasks, data_dir, work / "tasks", ds_cache)
        with offline():
            # only the generated directory is indexed: the tasks keep lm-eval's names with nothing to shadow,
            # and the ~14k built-in YAMLs (8 s here) are not parsed at all
            manager = TaskManager(include_path=str(task_dir), include_defaults=False)
            return lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": str(model_dir), "dtype": dtype},
                tasks=tasks,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                **settings,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
