"""``prepare-data --part I/N`` and ``--merge``: the tokenizing of a large pool split over N jobs (a SLURM job
array: ``launchers/slurm/prepare.sbatch``), each writing its own tokenized part, and one merge that packs every
part's documents in the inputs' order: the same dataset, token for token, as one ``prepare-data`` of the inputs.

    OUT.parts/part-000I-of-000N/        part I: its files' tokenized documents (Arrow) and ``part.json``, the
                                        marker written last (the inputs, the files, the tokenizer's sha256)

Files are assigned deterministically (largest first, each to the part with the fewest bytes so far), so every job
of the array computes the same assignment; a file larger than a part's share of the bytes (a pool of a few large
files) is cut into row ranges, each part reading the file and tokenizing only its rows. A part whose marker
matches is skipped when the array is rerun; a part that failed or was killed has no marker and is redone. The
merge refuses a missing or foreign part with one line naming it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from dwmtrain.data.prepare import PrepareReport, prepare_data, read_tokenized
from dwmtrain.data.readers import SLIMPAJAMA, Fields, expand_inputs
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_dir, atomic_write_text, read_json_object

MARKER = "part.json"


def parse_part(spec: str) -> tuple[int, int]:
    """``I/N`` (I from 0, as ``$SLURM_ARRAY_TASK_ID`` counts) -> (I, N); a bad one is a DataError naming it."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise DataError(f"--part {spec}: expected I/N, e.g. 0/4 ($SLURM_ARRAY_TASK_ID/N)") from None
    if not (n >= 1 and 0 <= i < n):
        raise DataError(f"--part {spec}: I must be in 0..{n - 1} (and N >= 1)")
    return i, n


def parts_count(parts: Path, what: str) -> int | None:
    """N of the ``part-I-of-N`` directories under ``parts`` (None: none yet); parts of two different N (a rerun
    with another N over an old array's parts) are a DataError naming both."""
    ns = sorted(
        {int(p.name.rsplit("-", 1)[1]) for p in parts.glob("part-*-of-*") if p.name.rsplit("-", 1)[1].isdigit()}
    )
    if len(ns) > 1:
        raise DataError(f"{parts}: parts of {ns[0]} and of {ns[-1]} ({what}); remove the old array's parts")
    return ns[0] if ns else None


def part_name(i: int, n: int) -> str:
    return f"part-{i:04d}-of-{n:04d}"


def part_started(d: Path) -> bool:
    """A part's directory exists, or atomic_dir's temporary one beside it: the part is running, or failed."""
    return d.is_dir() or any(d.parent.glob(f".{d.name}*"))


def parts_dir(out_dir: str | os.PathLike) -> Path:
    return Path(str(out_dir).rstrip("/") + ".parts")


def part_path(out_dir, i: int, n: int) -> Path:
    return parts_dir(out_dir) / part_name(i, n)


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


def _marker(files: list[str], mine: list, i: int, n: int, tok_sha: str, fields: Fields) -> dict:
    return {"part": i, "of": n, "inputs": [os.path.abspath(f) for f in files], "slices": [list(x) for x in mine],
            "tokenizer_sha256": tok_sha, "text_field": fields.text, "domain_field": fields.domain}  # fmt: skip


def _slice_name(f: int, k: int, K: int) -> str:
    return f"file-{f:06d}" if K == 1 else f"file-{f:06d}-rows-{k:03d}-of-{K:03d}"


def prepare_part(inputs: list[str], tokenizer_path: str, out_dir: str, part: str, workers: int = 0,
                 fields: Fields = SLIMPAJAMA) -> str:  # fmt: skip
    """Tokenize part I of N of the inputs into its directory (skipped if it is complete); returns what was done."""
    i, n = parse_part(part)
    files = expand_inputs(inputs)
    mine = assign_slices(files, n)[i]
    want = _marker(files, mine, i, n, load_tokenizer(tokenizer_path).sha256, fields)
    dest = part_path(out_dir, i, n)
    if read_json_object(dest / MARKER) == want:
        return f"part {i}/{n} is complete ({dest}): skipped"
    t0 = time.time()
    with atomic_dir(dest, overwrite=True) as tmp:  # a killed part leaves no marker: a rerun redoes it
        tokenized = read_tokenized([files[f] for f, _, _ in mine], tokenizer_path, workers, str(tmp / "cache"), fields,
                                   rows=[(k, K) if K > 1 else None for _, k, K in mine])  # fmt: skip
        docs = tokens = 0
        for (f, k, K), (_, ds) in zip(mine, tokenized):
            ds.save_to_disk(str(tmp / _slice_name(f, k, K)))
            docs, tokens = docs + len(ds), tokens + _tokens(ds)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        atomic_write_text(tmp / MARKER, json.dumps(want, indent=1))
    dt = time.time() - t0
    rate = f"{docs / max(dt, 1e-9):,.0f} docs/s, {tokens / max(dt, 1e-9):,.0f} tokens/s"
    whole = sum(K == 1 for _, _, K in mine)
    what = f"{len(mine)} files" + (f" ({len(mine) - whole} of them row ranges)" if whole < len(mine) else "")
    return f"part {i}/{n}: {what}, {docs:,} documents, {tokens:,} tokens in {dt:.1f} s ({rate}) -> {dest}"


def _tokens(ds) -> int:
    """Tokens in a tokenized dataset (its ``ids`` lists), from the Arrow lengths (no rows read)."""
    import pyarrow.compute as pc

    if "ids" not in ds.column_names:  # an empty row range: datasets' map leaves its columns as they were
        return 0
    return int(pc.sum(pc.list_value_length(ds.data.table.column("ids"))).as_py() or 0)


def merge_parts(inputs: list[str], tokenizer_path: str, out_dir: str, fields: Fields = SLIMPAJAMA,
                **options) -> PrepareReport:  # fmt: skip
    """Pack every part's documents into ``out_dir`` (``prepare_data``'s packing, its ``options``); the parts are
    removed once the dataset is in place."""
    report = prepare_data(inputs, tokenizer_path, out_dir, fields=fields, **options,
                          documents=lambda: merged_tokenized(inputs, tokenizer_path, out_dir, fields))  # fmt: skip
    shutil.rmtree(parts_dir(out_dir), ignore_errors=True)
    return report


def merged_tokenized(inputs: list[str], tokenizer_path: str, out_dir: str, fields: Fields = SLIMPAJAMA):
    """Every part's tokenized documents, file by file in the inputs' order (what ``prepare_data`` packs): a
    missing, unfinished or foreign part is a DataError naming it and the command that makes it."""
    import datasets

    files = expand_inputs(inputs)
    n = parts_count(parts_dir(out_dir), "prepare-data --part")
    if n is None:
        raise DataError(f"{parts_dir(out_dir)}: no parts (run prepare-data --part I/N for I in 0..N-1 first)")
    tok_sha = load_tokenizer(tokenizer_path).sha256
    slices: dict[int, list] = {}  # file index -> [(k, directory of slice k)]
    for i, mine in enumerate(assign_slices(files, n)):
        dest = part_path(out_dir, i, n)
        if not (dest / MARKER).is_file():
            raise DataError(f"{dest}: part {i}/{n} is missing or unfinished (no {MARKER}); rerun prepare-data "
                            f"--part {i}/{n} with the same inputs, then the merge")  # fmt: skip
        if read_json_object(dest / MARKER) != _marker(files, mine, i, n, tok_sha, fields):
            raise DataError(f"{dest / MARKER}: part {i}/{n} was made from other inputs, tokenizer or fields than "
                            f"this merge's; rerun prepare-data --part {i}/{n} with these")  # fmt: skip
        for f, k, K in mine:
            slices.setdefault(f, []).append((k, dest / _slice_name(f, k, K)))
    out = []
    for f in range(len(files)):
        parts = [datasets.load_from_disk(str(d)) for _, d in sorted(slices[f])]
        parts = [p for p in parts if len(p)] or parts[:1]  # an empty row range has no tokenized columns
        out.append((files[f], parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)))
    return out


def part_status(out_dir: str) -> list[str]:
    """One line per part of the array: complete (its marker), started (a directory, no marker: running, or
    failed), or not started."""
    n = parts_count(parts_dir(out_dir), "prepare-data --part")
    if n is None:
        return [f"{parts_dir(out_dir)}: no parts yet"]
    lines = []
    for i in range(n):
        d = part_path(out_dir, i, n)
        state = "complete" if (d / MARKER).is_file() else "started, not finished" if part_started(d) else "not started"
        lines.append(f"part {i}/{n}: {state}")
    return lines
