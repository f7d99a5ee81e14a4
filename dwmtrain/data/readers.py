"""Reading documents: the one module everything that reads text records goes through (``prepare-data``,
``select``, ``score``, tokenizer training, the noise probe).

A reader knows one input format: how to check a file before it is read, how to load it as a ``datasets``
table (``prepare-data``'s fast path), how to walk its records one by one with their line numbers (``select``
writes them back unchanged), and how to name the first bad line when the fast path fails. Today there is one,
JSON lines (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``) in SlimPajama's layout: ``text``, and the domain in
``meta.redpajama_set_name``. A second format (parquet, a saved ``datasets`` directory) is one more ``Reader``.

Every record without text is a counted skip with one of ``SKIP_REASONS``, never a silent drop; every unreadable
record is a ``DataError`` naming ``file:line``.
"""

from __future__ import annotations

import abc
import io
import json
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dwmtrain.errors import DataError

SKIP_MISSING_TEXT = "missing text"
SKIP_EMPTY_TEXT = "empty text"
SKIP_REASONS = (SKIP_MISSING_TEXT, SKIP_EMPTY_TEXT)


# ----------------------------------------------------------------------------- what a record holds


def text_skip_reason(text) -> str:
    """Why a record's text cannot be used ('' if it can): missing, or empty (whitespace only)."""
    if text is None:
        return SKIP_MISSING_TEXT
    return "" if text.strip() else SKIP_EMPTY_TEXT


def domain_of(meta) -> str:
    """The SlimPajama domain of a record's ``meta`` (``redpajama_set_name``), ``unknown`` if it has none."""
    return str((meta or {}).get("redpajama_set_name") or "unknown")


def record_problem(rec) -> str | None:
    """Why a parsed JSON value is not a usable record (None if it is): the message a DataError carries."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if rec.get("text") is not None and not isinstance(rec["text"], str):
        return f"field 'text' must be a string, got {type(rec['text']).__name__}"
    if rec.get("meta") is not None and not isinstance(rec["meta"], dict):
        return f"field 'meta' must be an object, got {type(rec['meta']).__name__}"
    return None


def get_field(rec: dict, dotted: str):
    """The value at a dotted path (``meta.quality.educational_value``) of a record; KeyError if absent."""
    node = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@dataclass(frozen=True)
class Record:
    """One input record and where it came from."""

    file_index: int  #: position of its file in the inputs
    line: int  #: 1-based line number (what messages name)
    crc: int  #: crc32 of the raw line: a second read checks the file did not change meanwhile
    rec: dict


# ----------------------------------------------------------------------------- the readers


class Reader(abc.ABC):
    """One input format."""

    patterns: tuple[str, ...]  #: the file names a directory of inputs contributes (glob patterns)

    @abc.abstractmethod
    def accepts(self, path: str) -> bool:
        """Whether ``path`` is a file of this format (by its name)."""

    @abc.abstractmethod
    def check(self, path: str) -> None:
        """Refuse, before any reading, a file that cannot be whole: empty, or cut short."""

    @abc.abstractmethod
    def dataset(self, path: str, cache_dir: str):
        """The file as a ``datasets.Dataset`` with a ``text`` column (and ``meta`` where present)."""

    @abc.abstractmethod
    def records(self, path: str, file_index: int = 0) -> Iterator[Record]:
        """Every record of the file, parsed and checked, with its line; a bad one raises naming it."""

    @abc.abstractmethod
    def record_lines(self, path: str, indices: list[int]) -> dict[int, int]:
        """{0-based record index (as ``dataset`` counts them): 1-based line number}."""

    @abc.abstractmethod
    def diagnose(self, path: str) -> None:
        """Raise a DataError naming the first record that cannot be read (after the fast path failed)."""


class JsonlReader(Reader):
    """JSON lines, plain or compressed with zstd or gzip; blank lines are not records."""

    patterns = ("*.jsonl*",)

    def accepts(self, path: str) -> bool:
        return ".jsonl" in Path(path).name

    def check(self, path: str) -> None:
        """An empty file, and a compressed one whose stream ends early (a partial download or copy): ``datasets``
        would otherwise read what decompresses and silently drop the rest. One streaming pass over a .zst or
        .gz file (about a second per GB of text); plain files cost a stat."""
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no records)")
        if path.endswith(".zst"):
            total = _check_zstd(path)
        elif path.endswith(".gz"):
            total = _check_gzip(path)
        else:
            return
        if total == 0:
            raise DataError(f"{path}: empty file (no records once decompressed)")

    def dataset(self, path: str, cache_dir: str):
        import datasets

        return datasets.load_dataset("json", data_files=[path], split="train", cache_dir=cache_dir)

    def _lines(self, path: str) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw line) of every non-blank line: the records, as ``datasets`` counts them."""
        with open_bytes(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw), 1):
                if line.strip():
                    yield lineno, line

    def records(self, path: str, file_index: int = 0) -> Iterator[Record]:
        for lineno, line in self._lines(path):
            try:
                rec = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                rec = None
            if rec is None or record_problem(rec):
                self.diagnose(path)  # raises naming the first bad line, which is this one
                raise DataError(f"{path}:{lineno}: not a SlimPajama record")
            yield Record(file_index, lineno, zlib.crc32(line), rec)

    def raw_lines(self, path: str) -> Iterator[tuple[int, bytes]]:
        """(line number, raw bytes) of every line, blank ones included (a second pass that copies records)."""
        with open_bytes(path) as raw:
            yield from enumerate(io.BufferedReader(raw), 1)

    def record_lines(self, path: str, indices: list[int]) -> dict[int, int]:
        want, found = set(indices), {}
        for rec, (lineno, _) in enumerate(self._lines(path)):
            if rec in want:
                found[rec] = lineno
                if len(found) == len(want):
                    break
        return found

    def diagnose(self, path: str) -> None:
        records = 0
        for lineno, line in self._lines(path):
            records += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            if problem := record_problem(rec):
                raise DataError(f"{path}:{lineno}: {problem}")
        if records == 0:
            raise DataError(f"{path}: no records (only blank lines)")
        raise DataError(f"{path}: could not be read as JSON lines (no single bad line found)")


READERS: tuple[Reader, ...] = (JsonlReader(),)


def reader_for(path: str) -> Reader:
    """The reader of ``path``'s format, or a DataError naming the formats there are."""
    for r in READERS:
        if r.accepts(path):
            return r
    raise DataError(f"{path}: not an input format dwmtrain reads (JSON lines: .jsonl, .jsonl.zst, .jsonl.gz)")


def open_bytes(path: str):
    """A binary stream of a file's text, decompressing ``.zst`` and ``.gz``."""
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _check_zstd(path: str, chunk: int = 1 << 20) -> int:
    """Bytes of text in a (multi-frame) zstd file; DataError if corrupted or cut short."""
    import zstandard

    total = 0
    with open(path, "rb") as fh:
        d = zstandard.ZstdDecompressor().decompressobj()
        while block := fh.read(chunk):
            while block:  # a file may hold several frames, one after another
                if d.eof:
                    d = zstandard.ZstdDecompressor().decompressobj()
                try:
                    total += len(d.decompress(block))
                except zstandard.ZstdError as e:
                    raise DataError(f"{path}: corrupted zstd stream after {total:,} bytes of text ({e})") from None
                block = d.unused_data if d.eof else b""
        if not d.eof:
            raise _truncated(path, total)
    return total


def _check_gzip(path: str, chunk: int = 1 << 20) -> int:
    """Bytes of text in a gzip file; DataError if corrupted or cut short."""
    import gzip
    import zlib as _zlib

    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(chunk):
                total += len(block)
    except EOFError:
        raise _truncated(path, total) from None
    except (OSError, _zlib.error) as e:
        raise DataError(f"{path}: corrupted gzip stream after {total:,} bytes of text ({e})") from None
    return total


def _truncated(path: str, total: int) -> DataError:
    return DataError(
        f"{path}: compressed stream is truncated (ends after {total:,} bytes of text); "
        "re-download or re-compress the file"
    )


# ----------------------------------------------------------------------------- inputs as a whole


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; a directory means its files of any known format, sorted."""
    files = []
    for p in inputs:
        if Path(p).is_dir():
            files += sorted({str(x) for r in READERS for pat in r.patterns for x in Path(p).glob(pat)})
        else:
            files.append(p)
    if not files:
        raise DataError(f"no input files in {inputs}")
    return files


def load_dataset(f: str, cache_dir: str):
    """One input file (checked first) or a hub dataset name, as a ``datasets.Dataset`` with a ``text`` column."""
    import datasets

    if not os.path.exists(f):
        try:  # a hub dataset name, where a network exists
            ds = datasets.load_dataset(f, split="train", cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - whatever the hub says, the user's input is what is wrong
            raise DataError(f"{f}: no such file, and not loadable as a dataset name ({e})") from None
    else:
        reader = reader_for(f)
        reader.check(f)
        try:
            ds = reader.dataset(f, cache_dir)
        except Exception as e:  # pyarrow / datasets errors carry no line number: find it ourselves
            reader.diagnose(f)
            raise DataError(f"{f}: {e}") from None
    if "text" not in ds.column_names:
        raise DataError(f"{f}: no 'text' field in any record (columns: {ds.column_names})")
    return ds


def iter_records(files: list[str]) -> Iterator[Record]:
    """Every record of every file in order, each with its file index, line and checksum."""
    for fi, path in enumerate(files):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        yield from reader_for(path).records(path, fi)


def iter_texts(inputs: list[str], cache_dir: str, report: Counter | None = None) -> Iterator[str]:
    """Non-empty ``text`` of every record (tokenizer training); the records without are counted in ``report``."""
    for f in expand_inputs(inputs):
        for t in load_dataset(f, cache_dir)["text"]:
            if isinstance(t, str) and t.strip():
                yield t
            elif report is not None:
                report[SKIP_MISSING_TEXT if t is None else SKIP_EMPTY_TEXT] += 1


def name_lines(skipped_at: list[tuple[str, int, str]]) -> list[str]:
    """``file:line: reason`` for skipped records given as (file, 0-based record index, reason)."""
    lines = {
        f: reader_for(f).record_lines(f, [i for g, i, _ in skipped_at if g == f]) if os.path.isfile(f) else {}
        for f in {f for f, _, _ in skipped_at}
    }
    return [f"{f}:{lines[f].get(i, f'record {i + 1}')}: {why}" for f, i, why in skipped_at]
