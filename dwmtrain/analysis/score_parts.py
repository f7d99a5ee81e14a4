"""``dwmtrain score ... --part I/N`` and ``--merge``: the samples' micro-batches split over N jobs (a SLURM job
array, one GPU each: ``launchers/slurm/score.sbatch``), each scoring a contiguous run of micro-batches, and one
merge that writes every part's records in order: the records one ``dwmtrain score`` writes (each micro-batch is
weighed alone, so its weights do not depend on the split).

    FILE.parts/part-000I-of-000N/   records.jsonl (its micro-batches) and part.json, the marker written last
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dwmtrain.data.parts import part_name, parts_count
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_dir, atomic_write_text, sha256_file

MARKER = "part.json"


def parts_dir(out: str | os.PathLike) -> Path:
    """``DIR/FILE.parts`` of ``--out DIR/FILE.jsonl|.parquet``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.parts")


def part_dir(out, i: int, n: int) -> Path:
    return parts_dir(out) / part_name(i, n)


def micro_batch_range(samples: int, micro_batch: int, i: int, n: int) -> tuple[int, int]:
    """Sample positions [start, stop) of part I of N: a contiguous, near-equal share of whole micro-batches."""
    mbs = samples // micro_batch
    return i * mbs // n * micro_batch, (i + 1) * mbs // n * micro_batch


def scoring_marker(a, idx: np.ndarray) -> dict:
    """What a part's records are made from: the DWM's bytes, the data, the samples and how they are scored."""
    return {"dwm_sha256": sha256_file(a.dwm), "data": os.path.abspath(a.data), "split": a.split,
            "samples_sha256": _sha(idx), "micro_batch": a.micro_batch, "device": a.device,
            "rater": os.path.abspath(a.rater) if a.rater else None, "rater_labels": a.rater_labels,
            "rater_max_length": a.rater_max_length}  # fmt: skip


def _sha(idx: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()


def done_part(out, i: int, n: int, want: dict) -> bool:
    m = part_dir(out, i, n) / MARKER
    return m.is_file() and json.loads(m.read_text()) == dict(want, part=i, of=n)


def write_part(out, i: int, n: int, want: dict, records: list[dict]) -> Path:
    """Part I's records and its marker (written last; a killed part leaves none and is redone)."""
    dest = part_dir(out, i, n)
    with atomic_dir(dest, overwrite=True) as tmp:
        atomic_write_text(tmp / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        atomic_write_text(tmp / MARKER, json.dumps(dict(want, part=i, of=n), indent=1))
    return dest


def merged_records(out, want: dict) -> list[dict]:
    """Every part's records in order; a missing, unfinished or foreign part is a DataError naming it."""
    n = parts_count(parts_dir(out), "dwmtrain score --part")
    if n is None:
        raise DataError(f"{parts_dir(out)}: no parts (run dwmtrain score --part I/N for I in 0..N-1 first)")
    recs = []
    for i in range(n):
        m = part_dir(out, i, n) / MARKER
        if not m.is_file():
            raise DataError(f"{part_dir(out, i, n)}: part {i}/{n} is missing or unfinished; run dwmtrain score "
                            f"--part {i}/{n} with the merge's arguments, then the merge")  # fmt: skip
        if json.loads(m.read_text()) != dict(want, part=i, of=n):
            raise DataError(f"{m}: part {i}/{n} was scored with another DWM, data, samples or options than this "
                            f"merge's; rerun dwmtrain score --part {i}/{n} with these")  # fmt: skip
        with open(part_dir(out, i, n) / "records.jsonl", encoding="utf-8") as f:
            recs.extend(json.loads(line) for line in f)
    return recs
