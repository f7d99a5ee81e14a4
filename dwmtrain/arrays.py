"""The job-array protocol every command that splits its work over N jobs follows (``prepare-data``, ``select``,
``score`` with ``--part I/N`` and ``--merge``): one owner for naming the parts, where they are, their markers,
their status and the merge's refusals. The commands keep only their payloads.

    OUT.parts/part-000I-of-000N/   part I of N: its payload files, and its marker (a JSON object written last, saying
                                   what the part is made from: its inputs, tokenizer, settings)

A part is complete when its marker is there and says what this run would make it from; a part killed midway has
no marker (it is written inside a temporary directory renamed into place: ``fileio.atomic_dir``) and is redone. A
merge refuses, naming it, a part that is missing, unfinished, or made from something else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_dir, atomic_write_text, read_json_object

#: what an output's name may end in; the parts sit beside it under its name without these
OUTPUT_SUFFIXES = (".jsonl.zst", ".jsonl", ".parquet")


def parse_part(spec: str) -> tuple[int, int]:
    """``I/N`` (I from 0, as ``$SLURM_ARRAY_TASK_ID`` counts) -> (I, N); a bad one is a DataError naming it."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise DataError(f"--part {spec}: expected I/N, e.g. 0/4 ($SLURM_ARRAY_TASK_ID/N)") from None
    if not (n >= 1 and 0 <= i < n):
        raise DataError(f"--part {spec}: I must be in 0..{n - 1} (and N >= 1)")
    return i, n


def part_name(i: int, n: int) -> str:
    return f"part-{i:04d}-of-{n:04d}"


def parts_dir(out: str | os.PathLike) -> Path:
    """``NAME.parts`` beside the output ``NAME`` (a directory, or a file ending in one of ``OUTPUT_SUFFIXES``)."""
    name = str(out).rstrip("/")
    suffix = next((s for s in OUTPUT_SUFFIXES if name.endswith(s)), "")
    return Path(name[: len(name) - len(suffix)] + ".parts")


@dataclass(frozen=True)
class JobArray:
    """The parts of one command's array: ``command`` (``prepare-data``, ``select dsir``) is what makes a part, in
    every message; ``marker`` the name of its marker file."""

    out: str  #: the output the array makes (its parts sit beside it)
    command: str
    marker: str = "part.json"
    made_from: str = "inputs or settings"  #: what a marker records, in the message refusing a foreign part

    @property
    def root(self) -> Path:
        return parts_dir(self.out)

    def part(self, i: int, n: int) -> Path:
        return self.root / part_name(i, n)

    def count(self) -> int | None:
        """N of the ``part-I-of-N`` directories (None: none yet); parts of two different N (a rerun with another N
        over an old array's parts) are a DataError naming both."""
        ns = sorted({int(p.name.rsplit("-", 1)[1]) for p in self.root.glob("part-*-of-*")
                     if p.name.rsplit("-", 1)[1].isdigit()})  # fmt: skip
        if len(ns) > 1:
            raise DataError(f"{self.root}: parts of {ns[0]} and of {ns[-1]} ({self.command} --part); remove the old "
                            "array's parts")  # fmt: skip
        return ns[0] if ns else None

    def read(self, i: int, n: int, marker: str | None = None) -> dict | None:
        """Part I's marker (or another of its JSON files), None if there is none that reads as an object."""
        return read_json_object(self.part(i, n) / (marker or self.marker))

    def holds(self, i: int, n: int, want: dict, marker: str | None = None) -> bool:
        """Whether part I's marker says it is made from ``want`` (every field of ``want``; it may say more)."""
        got = self.read(i, n, marker)
        return got is not None and {k: got.get(k) for k in want} == want

    def started(self, i: int, n: int) -> bool:
        """The part's directory exists, or ``atomic_dir``'s temporary one beside it: running, or failed."""
        d = self.part(i, n)
        return d.is_dir() or any(d.parent.glob(f".{d.name}*"))

    @contextmanager
    def writing(self, i: int, n: int, marker: dict) -> Iterator[Path]:
        """``with array.writing(i, n, marker) as tmp:`` the payload goes into ``tmp`` (and the block may complete the
        ``marker`` dict with what it found: counts, timings); the marker is written last and the part renamed into
        place (an earlier attempt at it replaced) only if the block ends without an error."""
        with atomic_dir(self.part(i, n), overwrite=True) as tmp:
            yield tmp
            atomic_write_text(tmp / self.marker, _json(marker))

    def require(self, want_of: Callable[[int, int], dict], marker: str | None = None) -> int:
        """N, once every part is complete and made from ``want_of(i, n)``; else a DataError naming the first part
        that is missing, unfinished or foreign, and the command that makes it."""
        n = self.count()
        if n is None:
            raise DataError(f"{self.root}: no parts (run {self.command} --part I/N for I in 0..N-1 first)")
        for i in range(n):
            if self.read(i, n, marker) is None:
                raise DataError(f"{self.part(i, n)}: part {i}/{n} is missing or unfinished; run {self.command} "
                                f"--part {i}/{n} with the merge's arguments, then the merge")  # fmt: skip
            if not self.holds(i, n, want_of(i, n), marker):
                raise DataError(f"{self.part(i, n) / (marker or self.marker)}: part {i}/{n} was made from other "
                                f"{self.made_from} than this merge's; rerun {self.command} --part {i}/{n} with "
                                "these")  # fmt: skip
        return n

    def status(self, describe: Callable[[int, int, dict], str] | None = None) -> list[str]:
        """One line per part: complete (``describe(i, n, marker)`` says more), started (running, or failed), or
        not started."""
        n = self.count()
        if n is None:
            return [f"{self.root}: no parts yet (no {self.command} --part has run for {self.out})"]
        lines = []
        for i in range(n):
            got = self.read(i, n)
            if got is not None:
                lines.append(f"part {i}/{n}: " + (describe(i, n, got) if describe else "complete"))
            else:
                lines.append(f"part {i}/{n}: " + ("started, not finished" if self.started(i, n) else "not started"))
        return lines


def assign_files(files: list[str], n: int) -> list[list[int]]:
    """Indices of ``files`` per part, whole files: largest first, each to the lightest part (ties: the lower part);
    every part keeps its files in the inputs' order."""
    return [sorted(f for f, _, _ in part) for part in _balance(files, n, split=False)]


def assign_slices(files: list[str], n: int) -> list[list[tuple[int, int, int]]]:
    """(file index, k, K) per part: row range k of K of a file. A file larger than a part's share of the bytes
    (a few large files) is cut into that many row ranges; the slices are then balanced as ``assign_files`` does
    whole files. Every part keeps its slices in the inputs' order."""
    return [sorted(part) for part in _balance(files, n, split=True)]


def _balance(files: list[str], n: int, split: bool) -> list[list[tuple[int, int, int]]]:
    size = [os.path.getsize(f) if os.path.isfile(f) else _dir_bytes(f) for f in files]
    share = max(sum(size) / n, 1)
    cuts = [min(n, max(1, math.ceil(b / share))) if split else 1 for b in size]
    slices = [(f, k, cuts[f]) for f in range(len(files)) for k in range(cuts[f])]
    load, out = [0.0] * n, [[] for _ in range(n)]
    for f, k, K in sorted(slices, key=lambda s: (-size[s[0]] / s[2], s[0], s[1])):
        j = min(range(n), key=lambda j: (load[j], j))
        load[j] += size[f] / K
        out[j].append((f, k, K))
    return out


def _dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if os.path.isdir(path) else 0


def _json(obj: dict) -> str:
    import json

    return json.dumps(obj, indent=1)
