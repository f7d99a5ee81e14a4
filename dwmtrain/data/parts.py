"""``prepare-data --part I/N`` and ``--merge``: the tokenizing of a large pool split over N jobs (a SLURM job
array: ``dwmtrain/launch/slurm/prepare.sbatch``), each writing its own tokenized part, and one merge that packs every
part's documents in the inputs' order: the same dataset, token for token, as one ``prepare-data`` of the inputs.

    OUT.parts/part-000I-of-000N/        part I: its files' tokenized documents (Arrow) and ``part.json``, the
                                        marker written last (the inputs, the files, the tokenizer's sha256);
                                        the array's protocol is ``dwmtrain.arrays``

Files are assigned deterministically (largest first, each to the part with the fewest bytes so far), so every job
of the array computes the same assignment; a file larger than a part's share of the bytes (a pool of a few large
files) is cut into row ranges, each part reading the file and tokenizing only its rows. A part whose marker
matches is skipped when the array is rerun; a part that failed or was killed has no marker and is redone. The
merge refuses a missing or foreign part with one line naming it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from dwmtrain.arrays import JobArray, assign_slices, parse_part
from dwmtrain.data.prepare import PrepareReport, prepare_data, read_tokenized
from dwmtrain.data.readers import SLIMPAJAMA, Fields, expand_sources
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.fileio import read_json_object


def job_array(out_dir: str | os.PathLike) -> JobArray:
    return JobArray(str(out_dir), "prepare-data", made_from="inputs, tokenizer or fields")


def _marker(files: list[str], mine: list, i: int, n: int, tok_sha: str, per: list[Fields]) -> dict:
    fields = sorted({(f.text, f.domain, f.fixed) for f in per})  # what the fields are, per file where they differ
    one = len(fields) == 1
    return {"part": i, "of": n, "inputs": [os.path.abspath(f) for f in files], "slices": [list(x) for x in mine],
            "tokenizer_sha256": tok_sha, "text_field": per[0].text, "domain_field": per[0].domain,
            **({} if one and not per[0].fixed else {"fields": [[f.text, f.domain, f.fixed] for f in per]})}  # fmt: skip


def _slice_name(f: int, k: int, K: int) -> str:
    return f"file-{f:06d}" if K == 1 else f"file-{f:06d}-rows-{k:03d}-of-{K:03d}"


def prepare_part(inputs: list, tokenizer_path: str, out_dir: str, part: str, workers: int = 0,
                 fields: Fields = SLIMPAJAMA) -> str:  # fmt: skip
    """Tokenize part I of N of the inputs into its directory (skipped if it is complete); returns what was done."""
    i, n = parse_part(part)
    (files, per), arr = expand_sources(inputs, fields), job_array(out_dir)
    mine = assign_slices(files, n)[i]
    want = _marker(files, mine, i, n, load_tokenizer(tokenizer_path).sha256, per)
    if arr.read(i, n) == want:
        return f"part {i}/{n} is complete ({arr.part(i, n)}): skipped"
    t0 = time.time()
    with arr.writing(i, n, want) as tmp:
        rows = [(k, K) if K > 1 else None for _, k, K in mine]
        tokenized = read_tokenized([files[f] for f, _, _ in mine], tokenizer_path, workers, str(tmp / "cache"),
                                   [per[f] for f, _, _ in mine], rows=rows)  # fmt: skip
        docs = tokens = 0
        for (f, k, K), (_, ds) in zip(mine, tokenized):
            ds.save_to_disk(str(tmp / _slice_name(f, k, K)))
            docs, tokens = docs + len(ds), tokens + _tokens(ds)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    dt = time.time() - t0
    rate = f"{docs / max(dt, 1e-9):,.0f} docs/s, {tokens / max(dt, 1e-9):,.0f} tokens/s"
    whole = sum(K == 1 for _, _, K in mine)
    what = f"{len(mine)} files" + (f" ({len(mine) - whole} of them row ranges)" if whole < len(mine) else "")
    return f"part {i}/{n}: {what}, {docs:,} documents, {tokens:,} tokens in {dt:.1f} s ({rate}) -> {arr.part(i, n)}"


def _tokens(ds) -> int:
    """Tokens in a tokenized dataset (its ``ids`` lists), from the Arrow lengths (no rows read)."""
    import pyarrow.compute as pc

    if "ids" not in ds.column_names:  # an empty row range: datasets' map leaves its columns as they were
        return 0
    return int(pc.sum(pc.list_value_length(ds.data.table.column("ids"))).as_py() or 0)


def merge_parts(inputs: list, tokenizer_path: str, out_dir: str, fields: Fields = SLIMPAJAMA,
                **options) -> PrepareReport:  # fmt: skip
    """Pack every part's documents into ``out_dir`` (``prepare_data``'s packing, its ``options``); the parts are
    removed once the dataset is in place."""
    report = prepare_data(inputs, tokenizer_path, out_dir, fields=fields, **options,
                          documents=lambda: merged_tokenized(inputs, tokenizer_path, out_dir, fields))  # fmt: skip
    shutil.rmtree(job_array(out_dir).root, ignore_errors=True)
    return report


def merged_tokenized(inputs: list, tokenizer_path: str, out_dir: str, fields: Fields = SLIMPAJAMA):
    """Every part's tokenized documents, file by file in the inputs' order (what ``prepare_data`` packs): a
    missing, unfinished or foreign part is a DataError naming it and the command that makes it."""
    import datasets

    (files, per), arr = expand_sources(inputs, fields), job_array(out_dir)
    tok_sha = load_tokenizer(tokenizer_path).sha256
    n = arr.count() or 0
    assigned = assign_slices(files, n) if n else []
    n = arr.require(lambda i, n: _marker(files, assigned[i], i, n, tok_sha, per))
    slices: dict[int, list] = {}  # file index -> [(k, directory of slice k)]
    for i, mine in enumerate(assigned):
        for f, k, K in mine:
            slices.setdefault(f, []).append((k, arr.part(i, n) / _slice_name(f, k, K)))
    out = []
    for f in range(len(files)):
        parts = [datasets.load_from_disk(str(d)) for _, d in sorted(slices[f])]
        parts = [p for p in parts if len(p)] or parts[:1]  # an empty row range has no tokenized columns
        out.append((files[f], parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)))
    return out


def part_status(out_dir: str) -> list[str]:
    """The dataset itself if it is complete (the merge removes the parts), else one line per part of the array:
    complete, started (running, or failed), or not started."""
    index = read_json_object(Path(out_dir) / "index.json")
    arr = job_array(out_dir)
    if index is None or arr.count() is not None:
        return arr.status()
    splits = index.get("splits") or {}
    sizes = ", ".join(f"{s.get('num_sequences', '?'):,} {name}" for name, s in splits.items() if isinstance(s, dict))
    return [f"{out_dir}: complete ({sizes} sequences of {index.get('seq_len')} tokens); no parts left"]
