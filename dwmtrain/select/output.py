"""A selection's output: where it goes (one JSON-lines file, or shards), the refusal of an output that exists or is an
input, and the selected records written in rank order through bucket files on disk (the memory never holds the
selected text)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from pathlib import Path

from dwmtrain.data.readers import SLIMPAJAMA, Fields, reader_for
from dwmtrain.errors import DataError, OutputExistsError
from dwmtrain.fileio import atomic_file

OUT_SUFFIXES = (".jsonl", ".jsonl.zst")


def report_path(out: str | os.PathLike) -> Path:
    """``DIR/NAME.report.json`` for ``DIR/NAME.jsonl[.zst]``.

    Not ``OUT.report.json``: that name matches ``*.jsonl*``, so ``prepare-data --input DIR`` would read it.
    """
    return out_stem(out).with_name(f"{out_stem(out).name}.report.json")


def out_stem(out: str | os.PathLike) -> Path:
    """``DIR/NAME`` of ``DIR/NAME.jsonl[.zst]``: the report's and the parts' (``NAME.parts/``) name."""
    out = Path(out)
    suffix = next((s for s in (".jsonl.zst", ".jsonl") if out.name.endswith(s)), "")
    return out.with_name(out.name[: len(out.name) - len(suffix)])


def check_output(out: str, files: list[str], overwrite: bool) -> None:
    """Refuse an output with the wrong suffix, one that is also an input, or one that exists without overwrite."""
    if not out.endswith(OUT_SUFFIXES):
        raise DataError(f"--out {out}: must end in .jsonl or .jsonl.zst")
    if os.path.abspath(out) in {os.path.abspath(f) for f in files}:
        raise DataError(f"--out {out} is also an input")
    if not overwrite:
        for p in (Path(out), report_path(out), *_shards(out)):
            if p.exists():
                raise OutputExistsError(f"{p} exists; pass --overwrite to replace it (only after a successful run)")


def shard_path(out: str, k: int) -> str:
    """Shard ``k`` of a sharded output: ``DIR/NAME-0000k.jsonl[.zst]`` for ``--out DIR/NAME.jsonl[.zst]`` (the
    names sort in rank order, so ``prepare-data --input DIR`` reads them in it)."""
    suffix = next(s for s in OUT_SUFFIXES[::-1] if out.endswith(s))
    return f"{out[: -len(suffix)]}-{k:05d}{suffix}"


def _shards(out: str) -> list[Path]:
    """The shards of ``out`` on disk (this run's or a previous one's)."""
    first = Path(shard_path(out, 0))
    return sorted(first.parent.glob(first.name.replace("00000", "[0-9]" * 5)))


def write_records(out: str, lines, shard_docs: int = 0) -> list[str]:
    """Write JSON lines to ``out`` (zstd if ``.zst``) atomically, or, with ``shard_docs``, that many per shard
    (``shard_path``; a previous run's extra shards are removed once these are written). Returns the files."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not shard_docs:
        _write_lines(out, lines)
        return [out]
    lines, written = iter(lines), []
    while chunk := list(itertools.islice(lines, shard_docs)):
        written.append(shard_path(out, len(written)))
        _write_lines(written[-1], chunk)
    for stale in _shards(out)[len(written) :]:
        stale.unlink()
    return written


def _write_lines(out: str, lines) -> None:
    with atomic_file(out) as tmp, open(tmp, "wb") as fh:
        if out.endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=10).stream_writer(fh, closefd=False) as w:
                for line in lines:
                    w.write(line.encode("utf-8"))
        else:
            for line in lines:
                fh.write(line.encode("utf-8"))


def write_selected(out: str, files: list[str], picked: dict, method: str, scores, fields: Fields = SLIMPAJAMA,
                   bucket: int = 20_000, shard_docs: int = 0) -> list[str]:  # fmt: skip
    """Second pass, in bounded memory: the selected records in rank order, each with ``meta.selection`` added.

    ``picked`` maps (file index, position) to (rank, crc32 of the record when it was scored). As the inputs are
    read again, each selected record goes to the temporary file of its rank's bucket (``bucket`` ranks, or more
    so that at most 256 are open); the buckets are then sorted one at a time and appended to ``out`` (or its
    shards of ``shard_docs``). So the memory holds one bucket's records, whatever the budget. Returns the files."""
    k = len(picked)
    size = max(bucket, -(-k // 256))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=".select-", dir=os.path.dirname(os.path.abspath(out))))
    try:
        handles, seen = {}, 0
        for fi in sorted({fi for fi, _ in picked}):
            path = files[fi]
            for r in reader_for(path).records(path, fi, fields):
                if (hit := picked.get((fi, r.line))) is None:
                    continue
                rank, crc = hit
                if r.crc != crc:
                    raise DataError(f"{path}:{r.line}: changed while selecting; run again")
                rec = r.rec
                meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
                s = scores[rank]
                meta["selection"] = {"method": method, "score": None if s is None else float(s), "rank": rank}
                rec["meta"] = meta
                if rank // size not in handles:
                    handles[rank // size] = open(tmpdir / f"{rank // size:06d}", "w", encoding="utf-8")
                # one line per record: json.dumps escapes newlines (parquet may hold dates: default=str)
                handles[rank // size].write(f"{rank}\t{json.dumps(rec, ensure_ascii=False, default=str)}\n")
                seen += 1
        for h in handles.values():
            h.close()
        if seen != k:
            raise DataError(f"{k - seen} selected records vanished from the inputs while selecting; run again")
        return write_records(out, _in_rank_order(tmpdir, -(-k // size)), shard_docs)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _in_rank_order(tmpdir: Path, buckets: int):
    """The bucket files' records, each bucket sorted by rank in memory, bucket after bucket."""
    for b in range(buckets):
        if not (tmpdir / f"{b:06d}").is_file():
            continue
        with open(tmpdir / f"{b:06d}", encoding="utf-8") as f:
            rows = sorted((int(rank), line) for rank, _, line in (row.partition("\t") for row in f))
        for _, line in rows:
            yield line
        del rows
