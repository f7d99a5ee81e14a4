"""Scoring samples with a DWM exactly as training does: device and dtype, the samples chosen, their weights and
logits per micro-batch, the records ``dwmtrain score`` writes (JSONL or Parquet), and the optional quality
ratings of a local rater model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dwmtrain.errors import AnalysisError, DataError, DWMTrainError
from dwmtrain.fileio import atomic_file, atomic_write_text


def resolve_device(device: str = "auto", precision: str = "auto") -> tuple[str, torch.dtype]:
    """(device, DWM dtype) as training picks them: bf16 on GPU unless the run trains in fp32, fp32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AnalysisError(f"--device {device}: no CUDA device available")
    if device == "cpu" or precision == "fp32":
        return device, torch.float32
    return device, torch.bfloat16


def choose_samples(
    available: int, samples: int = 0, seed: int = 0, micro_batch: int = 8, shuffle: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Sample indices to score, a multiple of ``micro_batch`` long, and notes for the user.

    ``samples`` > 0: a seeded random choice of that many (all of them if fewer exist); 0: all, in order
    (shuffled with ``shuffle``).
    """
    notes = []
    if samples < 0:
        raise AnalysisError(f"--samples {samples}: must be >= 0")
    n = available if samples == 0 else min(samples, available)
    if samples > available:
        notes.append(f"asked for {samples} samples, the split has {available}: using all of them")
    rng = np.random.default_rng(seed)
    if samples > 0:
        idx = rng.choice(available, size=n, replace=False)
    else:
        idx = rng.permutation(available) if shuffle else np.arange(available)
    keep = n // micro_batch * micro_batch
    if keep == 0:
        raise DataError(f"{n} samples: need at least one micro-batch of {micro_batch}")
    if keep < n:
        notes.append(f"{n} samples rounded down to {keep} ({keep // micro_batch} micro-batches of {micro_batch})")
    if samples == 0 and not shuffle:
        notes.append(
            "samples in file order: a micro-batch holds neighbouring sequences (often one document), "
            "unlike training's shuffled micro-batches (use --samples or --shuffle for a random choice)"
        )
    return idx[:keep].astype(np.int64), notes


@torch.no_grad()
def score_dataset(
    dwm,
    dataset,
    indices: Sequence[int],
    micro_batch: int = 8,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    with_logits: bool = False,
    progress: bool = False,
):
    """Weights [n] of ``dataset[indices]`` in consecutive micro-batches, as training computes them.

    ``n`` is len(indices) rounded down to a multiple of ``micro_batch``. The DWM is moved to ``device``/``dtype``
    and put in eval mode. With ``with_logits``, returns (weights, logits): z before the softmax, read from the
    output layer during the same forward, so the weights are exactly ``dwm(x).float()``.
    """
    from tqdm import tqdm

    if getattr(dwm, "reads_lm", False):
        raise AnalysisError("this DWM weighs by its LM's forward (dwm.loss_feature or dwm.features=lm): scoring a DWM "
                            "alone cannot weigh it (tools/meta_diagnostic.py scores it with its LM)")  # fmt: skip
    idx = np.asarray(indices, dtype=np.int64)
    n = len(idx) // micro_batch * micro_batch
    dwm = dwm.to(device=device, dtype=dtype).eval()
    weights = np.empty(n, dtype=np.float64)
    logits = np.full(n, np.nan, dtype=np.float64)
    seen: list[torch.Tensor] = []
    out_layer = getattr(dwm, "fc2", None)
    hook = out_layer.register_forward_hook(lambda m, i, o: seen.append(o)) if out_layer is not None else None
    try:
        for s in tqdm(range(0, n, micro_batch), disable=not progress, unit="mb", leave=False, mininterval=2):
            x = dataset.batch(idx[s : s + micro_batch].tolist()).to(device)
            w = dwm(x).float()  # as training weighs (stages.weighting.FrozenDWM)
            if w.shape != (micro_batch,):
                raise DWMTrainError(
                    f"DWM returned weights of shape {tuple(w.shape)} for a micro-batch of {micro_batch}"
                )
            weights[s : s + micro_batch] = w.cpu().double().numpy()
            if seen:
                logits[s : s + micro_batch] = seen.pop().reshape(-1).float().cpu().double().numpy()
                seen.clear()
    finally:
        if hook is not None:
            hook.remove()
    return (weights, logits) if with_logits else weights


def sample_texts(ds, indices: np.ndarray, tokenizer: str | os.PathLike | None = None) -> list[str]:
    """The text of each sample, decoded with ``tokenizer`` (default: the one the data was prepared with,
    recorded in its index.json; its sha256 is checked when recorded)."""
    from dwmtrain.data.tokenizer import load_tokenizer

    path = tokenizer or ds.index.get("tokenizer")
    if not path or not Path(path).exists():
        raise DataError(f"{ds.path}: tokenizer {path!r} to decode its samples not found (pass --tokenizer FILE)")
    tok = load_tokenizer(path)
    want = ds.index.get("tokenizer_sha256")
    if want and tok.sha256 != want:
        raise DataError(f"tokenizer {path}: not the one {ds.path} was prepared with (sha256 differs)")
    return [tok.decode(ds[int(i)].tolist()) for i in indices]


def quality_scores(
    texts: list[str], rater: str, device: str = "cpu", names: list[str] | None = None, max_length: int = 512
) -> dict[str, np.ndarray]:
    """Per-sample quality scores of ``texts`` (Figure 3's dimensions: QuRater-1.3B's writing style, required
    expertise, facts and trivia, educational value), one field per label of a local rater model."""
    from dwmtrain.select.qurating import load_rater, rater_label_names, rater_logits

    tok, model = load_rater(rater, device)
    labels = rater_label_names(model, names)
    logits = rater_logits(texts, tok, model, max_length)
    return {name: logits[:, k] for k, name in enumerate(labels)}


def score_records(
    indices: np.ndarray,
    weights: np.ndarray,
    logits: np.ndarray,
    dataset,
    micro_batch: int = 8,
    quality: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """One record per scored sample: index, micro_batch, weight, logit, domain (+ quality fields)."""
    quality = quality or {}
    recs = []
    for j in range(len(weights)):
        r = {
            "index": int(indices[j]),
            "micro_batch": j // micro_batch,
            "weight": float(weights[j]),
            "logit": None if math.isnan(logits[j]) else float(logits[j]),
            "domain": dataset.domain(int(indices[j])),
        }
        r.update({k: float(v[j]) for k, v in quality.items()})
        recs.append(r)
    return recs


def check_out_suffix(path: str | os.PathLike) -> str:
    """'jsonl' or 'parquet' from the file name, else an error naming it."""
    suffix = Path(path).suffix.lower()
    if suffix not in (".jsonl", ".parquet"):
        raise AnalysisError(f"--out {path}: name it .jsonl or .parquet (the suffix picks the format)")
    return suffix[1:]


def write_records(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as JSONL or Parquet (by suffix), atomically."""
    path = Path(path)
    kind = check_out_suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(records), str(tmp))
    return path


def score_summary(records: list[dict]) -> str:
    """Samples, mean/min/max weight, and the mean weight per domain (highest first)."""
    w = np.array([r["weight"] for r in records])
    lines = [f"samples: {len(w)}   weight mean {w.mean():.4f}  min {w.min():.4f}  max {w.max():.4f}"]
    by: dict[str, list[float]] = {}
    for r in records:
        by.setdefault(r["domain"], []).append(r["weight"])
    width = max(len(d) for d in by)
    lines.append("mean weight per domain:")
    for d, ws in sorted(by.items(), key=lambda kv: -np.mean(kv[1])):
        lines.append(f"  {d:<{width}}  {np.mean(ws):.4f}  ({len(ws)} samples)")
    return "\n".join(lines)
