"""``dwmtrain score ... --part I/N`` and ``--merge``: the samples' micro-batches split over N jobs (a SLURM job
array, one GPU each: ``dwmtrain/launch/slurm/score.sbatch``), each scoring a contiguous run of micro-batches, and one
merge that writes every part's records in order: the records one ``dwmtrain score`` writes (each micro-batch is
weighed alone, so its weights do not depend on the split).

    FILE.parts/part-000I-of-000N/   records.jsonl (its micro-batches) and part.json, the marker written last
                                    (the array's protocol: ``dwmtrain.arrays``)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dwmtrain.arrays import JobArray
from dwmtrain.fileio import sha256_file


def job_array(out: str | os.PathLike) -> JobArray:
    return JobArray(str(out), "dwmtrain score", made_from="DWM, data, samples or options")


def micro_batch_range(samples: int, micro_batch: int, i: int, n: int) -> tuple[int, int]:
    """Sample positions [start, stop) of part I of N: a contiguous, near-equal share of whole micro-batches."""
    mbs = samples // micro_batch
    return i * mbs // n * micro_batch, (i + 1) * mbs // n * micro_batch


@dataclass(frozen=True)
class Scoring:
    """What a part's records are made from: the DWM's bytes, the data, the samples and how they are scored."""

    dwm_sha256: str
    data: str
    split: str
    samples_sha256: str
    micro_batch: int
    device: str
    rater: str | None
    rater_labels: str
    rater_max_length: int

    @classmethod
    def of(cls, *, dwm: str, data: str, split: str, samples: np.ndarray, micro_batch: int, device: str,
           rater: str = "", rater_labels: str = "", rater_max_length: int = 0) -> Scoring:  # fmt: skip
        """From the files and options themselves (the DWM and the samples hashed)."""
        idx = np.ascontiguousarray(samples, dtype=np.int64).tobytes()
        return cls(sha256_file(dwm), os.path.abspath(data), split, hashlib.sha256(idx).hexdigest(), micro_batch,
                   device, os.path.abspath(rater) if rater else None, rater_labels, rater_max_length)  # fmt: skip

    def marker(self, i: int, n: int) -> dict:
        return dict(asdict(self), part=i, of=n)


def write_part(out, i: int, n: int, scoring: Scoring, records: list[dict]) -> Path:
    """Part I's records and its marker (written last; a killed part leaves none and is redone)."""
    arr = job_array(out)
    with arr.writing(i, n, scoring.marker(i, n)) as tmp:
        (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return arr.part(i, n)


def merged_records(out, scoring: Scoring) -> list[dict]:
    """Every part's records in order; a missing, unfinished or foreign part is a DataError naming it."""
    arr = job_array(out)
    n = arr.require(scoring.marker)
    recs = []
    for i in range(n):
        with open(arr.part(i, n) / "records.jsonl", encoding="utf-8") as f:
            recs.extend(json.loads(line) for line in f)
    return recs
