"""Reading documents: the one module everything that reads text records goes through (``prepare-data``,
``select``, ``score``, tokenizer training, the noise probe).

A reader knows one input format: how to check a file before it is read, how to load it as a ``datasets`` table
(``prepare-data``'s fast path: memory-mapped Arrow, never all in memory), how to walk its records one by one with
their positions (``select`` writes them back), and how to name the first bad record when the fast path fails.
Formats: JSON lines (``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``), Parquet (``.parquet``), Arrow files
(``.arrow``) and a directory ``datasets.save_to_disk`` wrote. A record's position is its line in a JSON-lines
file and its row (1-based) in the others; every message names ``file:position``.

``Fields`` says where the text and the domain are (``data.text_field``, ``data.domain_field``; defaults:
SlimPajama's ``text`` and ``meta.redpajama_set_name``). Every record without text is a counted skip with one of
``SKIP_REASONS``, never a silent drop; every unreadable record is a ``DataError`` naming where it is.
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
DEFAULT_DOMAIN_FIELD = "meta.redpajama_set_name"


# ----------------------------------------------------------------------------- what a record holds


@dataclass(frozen=True)
class Fields:
    """Where a record keeps its text and its domain (dotted paths into the record)."""

    text: str = "text"
    domain: str = DEFAULT_DOMAIN_FIELD
    fixed: str = ""  #: every record's domain, whatever it holds (a source's name: prepare-data --sources)

    def text_of(self, rec: dict):
        return _lookup(rec, self.text)

    def domain_of(self, rec: dict) -> str:
        if self.fixed:
            return self.fixed
        v = _lookup(rec, self.domain)
        return "unknown" if v is None or v == "" else str(v)

    def columns(self) -> tuple[str, str]:
        """The top-level columns the two fields live in."""
        return self.text.split(".")[0], self.domain.split(".")[0]

    def check_columns(self, columns: list[str], where: str) -> None:
        """A missing text column is an error; so is a missing domain column the user named (the default one may
        be absent: every record's domain is then ``unknown``)."""
        text_col, dom_col = self.columns()
        if text_col not in columns:
            raise DataError(f"{where}: no column {self.text!r} (columns: {', '.join(columns)}; data.text_field)")
        if dom_col not in columns and self.domain != DEFAULT_DOMAIN_FIELD and not self.fixed:
            raise DataError(f"{where}: no column {self.domain!r} (columns: {', '.join(columns)}; data.domain_field)")


SLIMPAJAMA = Fields()


def add_field_options(p) -> None:
    """``--text-field`` and ``--domain-field`` on a command that reads documents."""
    p.add_argument("--text-field", default=SLIMPAJAMA.text, help="the record's text (a dotted path; default: text)")
    why = f"the record's domain (a dotted path; default: {SLIMPAJAMA.domain}; absent: unknown)"
    p.add_argument("--domain-field", default=SLIMPAJAMA.domain, help=why)


def fields_of(a) -> Fields:
    """The ``Fields`` of parsed ``--text-field`` / ``--domain-field`` options."""
    return Fields(a.text_field, a.domain_field)


@dataclass(frozen=True)
class InputSource:
    """Inputs whose records keep their text and domain in their own fields (one entry of prepare-data --sources)."""

    inputs: tuple[str, ...]
    fields: Fields


def read_sources_file(path: str) -> list[InputSource]:
    """prepare-data --sources FILE: a YAML (or JSON) list of {input: path or [paths], text_field, domain_field,
    domain}, ``domain`` a name every record of that entry gets; a bad entry is a DataError naming it."""
    import yaml

    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DataError(f"{path}: cannot be read as a sources list ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a list of sources ({{input: ..., text_field: ..., domain: ...}})")
    out = []
    keys = {"input", "text_field", "domain_field", "domain"}
    for i, e in enumerate(entries):
        where = f"{path}: source {i + 1}"
        if not isinstance(e, dict) or "input" not in e:
            raise DataError(f"{where}: expected a mapping with an input")
        if unknown := sorted(set(e) - keys):
            raise DataError(f"{where}: field {unknown[0]!r} is not one of {sorted(keys)}")
        inputs = e["input"] if isinstance(e["input"], list) else [e["input"]]
        if not inputs or not all(isinstance(x, str) and x for x in inputs):
            raise DataError(f"{where}: field input must be a path or a list of paths")
        vals = {k: e.get(k, d) for k, d in (("text_field", "text"), ("domain_field", DEFAULT_DOMAIN_FIELD),
                                            ("domain", ""))}  # fmt: skip
        if bad := [k for k, v in vals.items() if not isinstance(v, str)]:
            raise DataError(f"{where}: field {bad[0]} must be a string")
        base = Path(path).parent  # relative inputs are relative to the sources file
        files = tuple(str(base / x) if not os.path.isabs(x) else x for x in inputs)
        out.append(InputSource(files, Fields(vals["text_field"], vals["domain_field"], vals["domain"])))
    return out


def expand_sources(inputs: list, fields: Fields = SLIMPAJAMA) -> tuple[list[str], list[Fields]]:
    """Files (``expand_inputs``) and each one's fields: ``fields`` for a plain input, its own for an
    ``InputSource``."""
    files, per = [], []
    for x in inputs:
        got = [f for p in (x.inputs if isinstance(x, InputSource) else [x]) for f in _inputs_of(p)]
        files += got
        per += [x.fields if isinstance(x, InputSource) else fields] * len(got)
    if not files:
        raise DataError(
            f"no input files in {[str(x) if not isinstance(x, InputSource) else list(x.inputs) for x in inputs]}"
        )
    return files, per


def _lookup(rec, dotted: str):
    node = rec
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def text_skip_reason(text) -> str:
    """Why a record's text cannot be used ('' if it can): missing, or empty (whitespace only)."""
    if text is None:
        return SKIP_MISSING_TEXT
    return "" if text.strip() else SKIP_EMPTY_TEXT


def domain_of(meta) -> str:
    """The SlimPajama domain of a record's ``meta`` (``redpajama_set_name``), ``unknown`` if it has none."""
    return SLIMPAJAMA.domain_of({"meta": meta})


def record_problem(rec, fields: Fields = SLIMPAJAMA) -> str | None:
    """Why a parsed value is not a usable record (None if it is): the message a DataError carries."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    text = fields.text_of(rec)
    if text is not None and not isinstance(text, str):
        return f"field {fields.text!r} must be a string, got {type(text).__name__}"
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
    line: int  #: 1-based line (JSON lines) or row (the other formats): what messages name
    crc: int  #: crc32 of the record as read: a second read checks the file did not change meanwhile
    rec: dict


# ----------------------------------------------------------------------------- the readers


class Reader(abc.ABC):
    """One input format."""

    patterns: tuple[str, ...]  #: the file names a directory of inputs contributes (glob patterns)

    @abc.abstractmethod
    def accepts(self, path: str) -> bool:
        """Whether ``path`` is an input of this format."""

    @abc.abstractmethod
    def check(self, path: str) -> None:
        """Refuse, before any reading, an input that cannot be whole: empty, cut short, corrupt."""

    @abc.abstractmethod
    def dataset(self, path: str, cache_dir: str):
        """The input as a ``datasets.Dataset`` (memory-mapped Arrow)."""

    @abc.abstractmethod
    def rows(self, path: str) -> Iterator[tuple[int, int, dict]]:
        """(position, crc, record) of every record, in order; a record that cannot be parsed raises naming it."""

    def records(self, path: str, file_index: int = 0, fields: Fields = SLIMPAJAMA) -> Iterator[Record]:
        """Every record, checked against ``fields``; a bad one raises naming ``path:position``."""
        for pos, crc, rec in self.rows(path):
            if problem := record_problem(rec, fields):
                raise DataError(f"{path}:{pos}: {problem}")
            yield Record(file_index, pos, crc, rec)

    def record_lines(self, path: str, indices: list[int]) -> dict[int, int]:
        """{0-based record index (as ``dataset`` counts them): position}."""
        return {i: i + 1 for i in indices}

    def diagnose(self, path: str, fields: Fields = SLIMPAJAMA) -> None:
        """Raise a DataError naming the first record that cannot be read (after the fast path failed)."""
        if not sum(1 for _ in self.records(path, 0, fields)):
            raise DataError(f"{path}: no records")
        raise DataError(f"{path}: could not be read (no single bad record found)")


class JsonlReader(Reader):
    """JSON lines, plain or compressed with zstd or gzip; blank lines are not records."""

    patterns = ("*.jsonl*",)

    def accepts(self, path: str) -> bool:
        return ".jsonl" in Path(path).name and not os.path.isdir(path)

    def check(self, path: str) -> None:
        """An empty file; a compressed one whose stream ends early (a partial download or copy: ``datasets`` would
        read what decompresses and silently drop the rest); a line that is not a JSON object (pyarrow's JSON
        reader, under ``datasets``, crashes the process on a file of ``null`` lines). One streaming pass
        (about a second per GB of text)."""
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no records)")
        chunks = _zstd_chunks(path) if path.endswith(".zst") else _gzip_chunks(path) if path.endswith(".gz") else \
            _plain_chunks(path)  # fmt: skip
        read: list[int] = []  # bytes of text per chunk
        lines = 0
        for lineno, start in _line_starts(read.append(len(c)) or c for c in chunks):
            lines += 1
            if start != b"{":
                raise DataError(f"{path}:{lineno}: expected a JSON object (a line starting with '{{'), got a line "
                                f"starting with {start!r}")  # fmt: skip
        if lines == 0:
            raise DataError(f"{path}: " + ("empty file (no records once decompressed)" if not sum(read) else
                                           "no records (only blank lines)"))  # fmt: skip

    def dataset(self, path: str, cache_dir: str):
        import datasets

        return datasets.load_dataset("json", data_files=[path], split="train", cache_dir=cache_dir)

    def _lines(self, path: str) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw line) of every non-blank line: the records, as ``datasets`` counts them."""
        with open_bytes(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw), 1):
                if line.strip():
                    yield lineno, line

    def rows(self, path: str) -> Iterator[tuple[int, int, dict]]:
        for lineno, line in self._lines(path):
            try:
                rec = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
            yield lineno, zlib.crc32(line), rec

    def record_lines(self, path: str, indices: list[int]) -> dict[int, int]:
        want, found = set(indices), {}
        for rec, (lineno, _) in enumerate(self._lines(path)):
            if rec in want:
                found[rec] = lineno
                if len(found) == len(want):
                    break
        return found

    def diagnose(self, path: str, fields: Fields = SLIMPAJAMA) -> None:
        n = sum(1 for _ in self.records(path, 0, fields))
        if n == 0:
            raise DataError(f"{path}: no records (only blank lines)")
        raise DataError(f"{path}: could not be read as JSON lines (no single bad line found)")


class ParquetReader(Reader):
    """Parquet files (FineWeb, FineWeb-Edu, DCLM ship so), read a row group at a time."""

    patterns = ("*.parquet",)

    def accepts(self, path: str) -> bool:
        return path.endswith(".parquet") and not os.path.isdir(path)

    def _file(self, path: str):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors for a cut or foreign file vary; all are the file's
            raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None

    def check(self, path: str) -> None:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no records)")
        if self._file(path).metadata.num_rows == 0:
            raise DataError(f"{path}: no rows")

    def dataset(self, path: str, cache_dir: str):
        import datasets

        return datasets.load_dataset("parquet", data_files=[path], split="train", cache_dir=cache_dir)

    def rows(self, path: str) -> Iterator[tuple[int, int, dict]]:
        pos = 0
        try:
            for batch in self._file(path).iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    pos += 1
                    yield pos, _crc(rec), rec
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt page deep in the file
            raise DataError(f"{path}: row {pos + 1}: cannot be read ({' '.join(str(e).split())[:200]})") from None


class ArrowReader(Reader):
    """Arrow IPC files, as ``datasets`` writes them (``data-00000-of-00001.arrow``)."""

    patterns = ("*.arrow",)

    def accepts(self, path: str) -> bool:
        return path.endswith(".arrow") and not os.path.isdir(path)

    def _batches(self, path: str):
        import pyarrow as pa

        try:
            return pa.ipc.open_stream(pa.memory_map(path)).__iter__()
        except Exception:  # noqa: BLE001 - the file format rather than the stream format
            try:
                f = pa.ipc.open_file(pa.memory_map(path))
                return (f.get_batch(i) for i in range(f.num_record_batches))
            except Exception as e:  # noqa: BLE001 - neither: not an Arrow file
                raise DataError(f"{path}: not a readable Arrow file ({' '.join(str(e).split())[:200]})") from None

    def check(self, path: str) -> None:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty file (no records)")
        self._batches(path)

    def dataset(self, path: str, cache_dir: str):
        import datasets

        return datasets.load_dataset("arrow", data_files=[path], split="train", cache_dir=cache_dir)

    def rows(self, path: str) -> Iterator[tuple[int, int, dict]]:
        pos = 0
        try:
            for batch in self._batches(path):
                for rec in batch.to_pylist():
                    pos += 1
                    yield pos, _crc(rec), rec
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a file cut short or corrupt after its schema
            raise DataError(f"{path}: row {pos + 1}: cannot be read ({' '.join(str(e).split())[:200]})") from None


class SavedDatasetReader(Reader):
    """A directory ``datasets.Dataset.save_to_disk`` wrote (one split; a DatasetDict's ``train``)."""

    patterns = ()

    def accepts(self, path: str) -> bool:
        return os.path.isdir(path) and _is_saved_dataset(Path(path))

    def check(self, path: str) -> None:
        self.dataset(path, "")

    def dataset(self, path: str, cache_dir: str):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - a damaged save
            raise DataError(f"{path}: not a readable saved dataset ({' '.join(str(e).split())[:200]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: a saved DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        if len(ds) == 0:
            raise DataError(f"{path}: no rows")
        return ds

    def rows(self, path: str) -> Iterator[tuple[int, int, dict]]:
        for pos, rec in enumerate(self.dataset(path, ""), 1):
            yield pos, _crc(rec), rec


READERS: tuple[Reader, ...] = (JsonlReader(), ParquetReader(), ArrowReader(), SavedDatasetReader())


def _is_saved_dataset(d: Path) -> bool:
    return (d / "state.json").is_file() or (d / "dataset_dict.json").is_file()


def _crc(rec: dict) -> int:
    return zlib.crc32(json.dumps(rec, sort_keys=True, default=str).encode("utf-8"))


def reader_for(path: str) -> Reader:
    """The reader of ``path``'s format, or a DataError naming the formats there are."""
    for r in READERS:
        if r.accepts(path):
            return r
    raise DataError(
        f"{path}: not an input format dwmtrain reads (JSON lines .jsonl/.jsonl.zst/.jsonl.gz, .parquet, .arrow, "
        "or a directory datasets.save_to_disk wrote)"
    )


def open_bytes(path: str):
    """A binary stream of a file's text, decompressing ``.zst`` and ``.gz``."""
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _plain_chunks(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            yield block


def _zstd_chunks(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The text of a (multi-frame) zstd file; DataError if corrupted or cut short."""
    import zstandard

    total = 0
    with open(path, "rb") as fh:
        d = zstandard.ZstdDecompressor().decompressobj()
        while block := fh.read(chunk):
            while block:  # a file may hold several frames, one after another
                if d.eof:
                    d = zstandard.ZstdDecompressor().decompressobj()
                try:
                    text = d.decompress(block)
                except zstandard.ZstdError as e:
                    raise DataError(f"{path}: corrupted zstd stream after {total:,} bytes of text ({e})") from None
                total += len(text)
                yield text
                block = d.unused_data if d.eof else b""
        if not d.eof:
            raise _truncated(path, total)


def _gzip_chunks(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The text of a gzip file; DataError if corrupted or cut short."""
    import gzip

    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while block := fh.read(chunk):
                total += len(block)
                yield block
    except EOFError:
        raise _truncated(path, total) from None
    except (OSError, zlib.error) as e:
        raise DataError(f"{path}: corrupted gzip stream after {total:,} bytes of text ({e})") from None


def _line_starts(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, first non-blank byte) of every non-blank line of a text given in chunks (a UTF-8 BOM
    at the start is not part of the first line)."""
    lineno, at_start, first = 1, True, True
    for chunk in chunks:
        if first and chunk:
            chunk, first = chunk.removeprefix(b"\xef\xbb\xbf"), False
        i, n = 0, len(chunk)
        while i < n:
            if at_start:
                while i < n and chunk[i] in b" \t\r":
                    i += 1
                if i == n:
                    break
                if chunk[i] == 10:  # a blank line
                    lineno, i = lineno + 1, i + 1
                    continue
                yield lineno, chunk[i : i + 1]
                at_start = False
            j = chunk.find(b"\n", i)
            if j < 0:
                break
            lineno, i, at_start = lineno + 1, j + 1, True


def _truncated(path: str, total: int) -> DataError:
    return DataError(
        f"{path}: compressed stream is truncated (ends after {total:,} bytes of text); "
        "re-download or re-compress the file"
    )


# ----------------------------------------------------------------------------- inputs as a whole


def _walk(d: Path) -> list[str]:
    """Every input under directory ``d``, recursively (SlimPajama ships as train/chunk1..10/*.jsonl.zst); a saved
    dataset's directory is one input."""
    if _is_saved_dataset(d):
        return [str(d)]
    found: list[str] = []
    for entry in sorted(d.iterdir()):
        if entry.is_dir():
            found += _walk(entry)
        elif not entry.name.startswith(".") and any(entry.match(p) for r in READERS for p in r.patterns):
            found.append(str(entry))
    return found


def _inputs_of(p: str) -> list[str]:
    return _walk(Path(p)) if Path(p).is_dir() else [p]


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files (and saved datasets) as given; a directory means every input under it, recursively, sorted."""
    files = [f for p in inputs for f in _inputs_of(p)]
    if not files:
        raise DataError(f"no input files in {inputs}")
    return files


def load_dataset(f: str, cache_dir: str, fields: Fields = SLIMPAJAMA):
    """One input (checked first) as a ``datasets.Dataset`` holding the text column; nothing is fetched from a hub."""
    if not os.path.exists(f):
        raise DataError(f"{f}: no such file or directory (inputs are local files: nothing is fetched from a hub)")
    reader = reader_for(f)
    reader.check(f)
    try:
        ds = reader.dataset(f, cache_dir)
    except DataError:
        raise
    except Exception as e:  # pyarrow / datasets errors carry no line number: find it ourselves
        reader.diagnose(f, fields)
        raise DataError(f"{f}: {e}") from None
    fields.check_columns(ds.column_names, f)
    return ds


def iter_records(files: list[str], fields: Fields = SLIMPAJAMA) -> Iterator[Record]:
    """Every record of every input in order, each with its file index, position and checksum."""
    for fi, path in enumerate(files):
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file")
        yield from reader_for(path).records(path, fi, fields)


def iter_texts(inputs: list[str], cache_dir: str, report: Counter | None = None, fields: Fields = SLIMPAJAMA):
    """Non-empty text of every record (tokenizer training); the records without are counted in ``report``."""
    col = fields.columns()[0]
    for f in expand_inputs(inputs):
        for value in load_dataset(f, cache_dir, fields)[col]:
            t = _lookup({col: value}, fields.text)
            if isinstance(t, str) and t.strip():
                yield t
            elif report is not None:
                report[SKIP_MISSING_TEXT if t is None else SKIP_EMPTY_TEXT] += 1


def name_lines(skipped_at: list[tuple[str, int, str]]) -> list[str]:
    """``file:position: reason`` for skipped records given as (file, 0-based record index, reason)."""
    lines = {
        f: reader_for(f).record_lines(f, [i for g, i, _ in skipped_at if g == f]) if os.path.exists(f) else {}
        for f in {f for f, _, _ in skipped_at}
    }
    return [f"{f}:{lines[f].get(i, f'record {i + 1}')}: {why}" for f, i, why in skipped_at]
