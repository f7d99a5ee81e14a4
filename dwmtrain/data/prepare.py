"""``dwmtrain prepare-data``: SlimPajama JSONL(.zst) -> packed, memory-mapped token shards.

Layout of an output directory::

    index.json              format, seq_len, dtype, vocab, tokenizer sha256, domains, shards, stats
    train-00000.bin ...     uint16/uint32 tokens, shape [num_sequences, seq_len], C order
    train.domains.bin       uint16 domain id of every train sequence (majority of its tokens)
    heldout-00000.bin ...   the held-out split (the paper's DWM_VAL ablation), same format
    report.json             skipped records by reason, dropped tail tokens

The directory is written under a temporary name and renamed into place at the end, so a failed
run never leaves a half-written (or half-overwritten) output.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dwmtrain.data.tokenizer import EOS_ID, Tokenizer
from dwmtrain.errors import DataError  # noqa: F401  (re-exported: raised by the readers here)
from dwmtrain.fileio import sha256_file

FORMAT = "dwmtrain-tokens-v1"


# ----------------------------------------------------------------------------- diagnosis


def _open_text_bytes(path: str):
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def check_input_file(path: str, chunk: int = 1 << 20) -> None:
    """Refuse an empty file, and a compressed one whose stream ends early (a partial download or copy):
    ``datasets`` would otherwise read what decompresses and silently drop the rest.

    One streaming pass over a .zst / .gz file (about a second per GB of text); plain files cost a stat."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (no records)")
    total = 0
    if path.endswith(".zst"):
        import zstandard

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
    elif path.endswith(".gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as fh:
                while block := fh.read(chunk):
                    total += len(block)
        except EOFError:
            raise _truncated(path, total) from None
        except (OSError, zlib.error) as e:
            raise DataError(f"{path}: corrupted gzip stream after {total:,} bytes of text ({e})") from None
    else:
        return
    if total == 0:
        raise DataError(f"{path}: empty file (no records once decompressed)")


def _truncated(path: str, total: int) -> DataError:
    return DataError(
        f"{path}: compressed stream is truncated (ends after {total:,} bytes of text); "
        "re-download or re-compress the file"
    )


def _records(path: str):
    """(1-based line number, raw line) of every non-blank line: the records, as ``datasets`` counts them."""
    with _open_text_bytes(path) as raw:
        for lineno, line in enumerate(io.BufferedReader(raw), 1):
            if line.strip():
                yield lineno, line


def record_lines(path: str, records: list[int]) -> dict[int, int]:
    """{0-based record index: 1-based line number}: ``datasets`` drops blank lines, so they differ."""
    want, found = set(records), {}
    for rec, (lineno, _) in enumerate(_records(path)):
        if rec in want:
            found[rec] = lineno
            if len(found) == len(want):
                break
    return found


def diagnose_jsonl(path: str) -> None:
    """Find the first line ``datasets`` could not read and raise a DataError naming it.

    Only runs after the fast reader failed, to turn a pyarrow error into ``file:line: reason``.
    """
    records = 0
    for lineno, line in _records(path):
        records += 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if "text" in rec and rec["text"] is not None and not isinstance(rec["text"], str):
            raise DataError(f"{path}:{lineno}: field 'text' must be a string, got {type(rec['text']).__name__}")
        meta = rec.get("meta")
        if meta is not None and not isinstance(meta, dict):
            raise DataError(f"{path}:{lineno}: field 'meta' must be an object, got {type(meta).__name__}")
    if records == 0:
        raise DataError(f"{path}: no records (only blank lines)")
    raise DataError(f"{path}: could not be read as JSON lines (no single bad line found)")


# ----------------------------------------------------------------------------- reading + tokenizing

_SP_CACHE: dict[str, Tokenizer] = {}


def _tokenize_batch(batch: dict, tokenizer_path: str) -> dict:
    """datasets.map worker: text -> ids (+EOS), domain name, skip reason ('' if kept).

    The ids go back as one Arrow list array built from numpy: converting a Python list per record
    would cost about a tenth of the encoding itself."""
    import pyarrow as pa

    tok = _SP_CACHE.get(tokenizer_path)
    if tok is None:
        tok = _SP_CACHE[tokenizer_path] = Tokenizer(tokenizer_path)
    texts = batch.get("text") or [None] * len(next(iter(batch.values())))
    metas = batch.get("meta") or [None] * len(texts)
    domains, skip = [], []
    for i, t in enumerate(texts):
        if metas[i] is not None and not isinstance(metas[i], dict):  # diagnose_jsonl names the line
            raise TypeError(f"field 'meta' must be an object, got {type(metas[i]).__name__}")
        domains.append(str((metas[i] or {}).get("redpajama_set_name") or "unknown"))
        if t is not None and not isinstance(t, str):
            raise TypeError(f"'text' must be a string, got {type(t).__name__}")
        skip.append("missing text" if t is None else "" if t.strip() else "empty text")
    kept = [i for i, why in enumerate(skip) if not why]
    enc = tok.encode_batch([texts[i] for i in kept], num_threads=1) if kept else []  # a worker is one core
    n = np.array([len(e) for e in enc], np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(enc), np.int32, int(n.sum()))
    flat = np.insert(flat, np.cumsum(n), EOS_ID)  # EOS after each record
    lengths = np.zeros(len(texts), np.int64)
    lengths[kept] = n + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(offsets, flat)
    return pa.table({"ids": ids, "domain": pa.array(domains, pa.string()), "skip": pa.array(skip, pa.string())})


def load_jsonl(f: str, cache_dir: str):
    """One SlimPajama-format file (JSONL, JSONL.zst, JSONL.gz) or hub dataset name via ``datasets``."""
    import datasets

    if os.path.exists(f):
        check_input_file(f)
    try:
        if os.path.exists(f):
            ds = datasets.load_dataset("json", data_files=[f], split="train", cache_dir=cache_dir)
        else:  # a hub dataset name, where a network exists
            ds = datasets.load_dataset(f, split="train", cache_dir=cache_dir)
    except Exception as e:  # pyarrow / datasets errors carry no line number: find it ourselves
        if not os.path.exists(f):
            raise DataError(f"{f}: no such file, and not loadable as a dataset name ({e})") from None
        diagnose_jsonl(f)
        raise DataError(f"{f}: {e}") from None
    if "text" not in ds.column_names:
        raise DataError(f"{f}: no 'text' field in any record (columns: {ds.column_names})")
    return ds


def read_tokenized(files: list[str], tokenizer_path: str, workers: int, cache_dir: str):
    """Load each file with ``datasets`` and tokenize it in parallel worker processes."""
    out = []
    for f in files:
        ds = load_jsonl(f, cache_dir)
        cols = [c for c in ds.column_names if c not in ("text", "meta")]
        try:
            tok = _map_tokenize(ds, tokenizer_path, workers, cols, f)
        except (UnicodeDecodeError, ValueError, TypeError) as e:  # pyarrow reads bad UTF-8 lazily
            diagnose_jsonl(f)
            raise DataError(f"{f}: {e}") from None
        out.append((f, tok))
    return out


def _map_tokenize(ds, tokenizer_path, workers, cols, f):
    return ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=max(1, workers) if len(ds) > 512 and workers > 1 else None,
        fn_kwargs={"tokenizer_path": tokenizer_path},
        remove_columns=cols + [c for c in ("text", "meta") if c in ds.column_names],
        desc=f"tokenize {os.path.basename(f)}",
    )


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files as given; a directory means its ``*.jsonl*`` files, sorted."""
    files = []
    for p in inputs:
        files += sorted(str(x) for x in Path(p).glob("*.jsonl*")) if Path(p).is_dir() else [p]
    if not files:
        raise DataError(f"no input files in {inputs}")
    return files


def iter_texts(inputs: list[str], cache_dir: str, report: Counter | None = None):
    """Non-empty ``text`` of every record (for tokenizer training); empty/missing ones are counted."""
    for f in expand_inputs(inputs):
        for t in load_jsonl(f, cache_dir)["text"]:
            if isinstance(t, str) and t.strip():
                yield t
            elif report is not None:
                report["missing text" if t is None else "empty text"] += 1


# ----------------------------------------------------------------------------- packing


class _ShardWriter:
    """Append fixed-length sequences to numbered shard files."""

    def __init__(self, out: Path, split: str, seq_len: int, dtype, shard_sequences: int):
        self.out, self.split, self.seq_len, self.dtype = out, split, seq_len, dtype
        self.shard_sequences = shard_sequences
        self.shards: list[dict] = []
        self.domains: list[int] = []
        self._f = None
        self._n = 0

    def add(self, seq: np.ndarray, domain: int) -> None:
        if self._f is None or self._n == self.shard_sequences:
            self._close()
            name = f"{self.split}-{len(self.shards):05d}.bin"
            self._f = open(self.out / name, "wb")
            self.shards.append({"file": name, "num_sequences": 0})
            self._n = 0
        self._f.write(seq.astype(self.dtype, copy=False).tobytes())
        self._n += 1
        self.shards[-1]["num_sequences"] = self._n
        self.domains.append(domain)

    def _close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def finish(self) -> dict:
        self._close()
        for s in self.shards:
            s["sha256"] = sha256_file(self.out / s["file"])
        dfile = f"{self.split}.domains.bin"
        np.asarray(self.domains, dtype=np.uint16).tofile(self.out / dfile)
        return {"shards": self.shards, "num_sequences": len(self.domains), "domain_file": dfile}


@dataclass
class PrepareReport:
    """What happened to every input record."""

    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: list[str] = field(default_factory=list)
    tail_tokens_dropped: int = 0
    sequences: dict = field(default_factory=dict)
    seconds: float = 0.0  #: end to end: reading, tokenizing, packing, writing

    def summary(self) -> str:
        rate = f" in {self.seconds:.1f} s ({self.tokens / max(self.seconds, 1e-9):,.0f} tokens/s end to end)"
        lines = [f"documents kept: {self.documents}", f"tokens: {self.tokens}" + (rate if self.seconds else "")]
        for split, n in self.sequences.items():
            lines.append(f"{split} sequences: {n}")
        if self.skipped:
            lines.append("skipped records: " + ", ".join(f"{r}: {n}" for r, n in sorted(self.skipped.items())))
            lines += [f"  e.g. {e}" for e in self.skipped_examples[:5]]
        else:
            lines.append("skipped records: 0")
        lines.append(f"tail tokens dropped (last partial sequence): {self.tail_tokens_dropped}")
        return "\n".join(lines)


def _arrow_batches(ds):
    """For each Arrow record batch of a tokenized dataset: (records, the kept records' token ids concatenated,
    ids per record (0 for a skipped one), [(record index, skip reason)], domain of each kept record), as
    numpy arrays where it counts: no per-row Python dicts."""
    if getattr(ds, "_indices", None) is not None:
        ds = ds.flatten_indices()
    start = 0
    for rb in ds.data.table.to_batches():
        ids_col, skip = rb.column("ids"), rb.column("skip").to_pylist()
        lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False)
        ids = ids_col.flatten().to_numpy(zero_copy_only=False)
        skips = [(start + i, why) for i, why in enumerate(skip) if why]
        doms = [d for d, why in zip(rb.column("domain").to_pylist(), skip) if not why]
        yield len(skip), ids, lengths, skips, doms
        start += len(skip)


def _majority(dseqs: np.ndarray, num_domains: int) -> np.ndarray:
    """Each row's most frequent domain id (ties: the smallest id, as ``np.bincount(...).argmax()``)."""
    n = dseqs.shape[0]
    idx = dseqs.astype(np.int64) + num_domains * np.arange(n)[:, None]
    return np.bincount(idx.ravel(), minlength=n * num_domains).reshape(n, num_domains).argmax(1)


def _name_lines(skipped_at: list[tuple[str, int, str]]) -> list[str]:
    """``file:line: reason`` for skipped records (record indices mapped to the file's line numbers)."""
    lines = {
        f: record_lines(f, [i for g, i, _ in skipped_at if g == f]) if os.path.isfile(f) else {}
        for f in {f for f, _, _ in skipped_at}
    }
    return [f"{f}:{lines[f].get(i, f'record {i + 1}')}: {why}" for f, i, why in skipped_at]


def prepare_data(
    inputs: list[str],
    tokenizer_path: str,
    out_dir: str,
    seq_len: int = 1024,
    workers: int = os.cpu_count() or 1,
    heldout_fraction: float = 0.01,
    shard_sequences: int = 65536,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Tokenize, append EOS, pack into ``seq_len`` sequences and write shards + index atomically."""
    from tqdm import tqdm

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it (only after a successful run)")
    if not 0 <= heldout_fraction < 1:
        raise DataError(f"heldout_fraction={heldout_fraction}: must be in [0, 1)")
    files = expand_inputs(inputs)
    tok = Tokenizer(tokenizer_path)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t_start = time.time()  # the rate shown counts tokenizing (before the packing loop) too
    try:
        report = PrepareReport()
        tokenized = read_tokenized(files, tokenizer_path, workers, str(tmp / "cache"))
        writers = {
            "train": _ShardWriter(tmp, "train", seq_len, dtype, shard_sequences),
            "heldout": _ShardWriter(tmp, "heldout", seq_len, dtype, shard_sequences),
        }
        rng = np.random.default_rng(seed)
        domains: dict[str, int] = {}
        buf: list[np.ndarray] = []
        dom_buf: list[np.ndarray] = []
        buffered = 0
        skipped_at: list[tuple[str, int, str]] = []  # (file, record index, reason): lines named at the end
        total_docs = sum(len(ds) for _, ds in tokenized)
        bar = tqdm(total=total_docs, unit="doc", disable=not progress, desc="pack", smoothing=0.1)
        for f, ds in tokenized:
            for docs, ids, lengths, skips, doms in _arrow_batches(ds):  # whole Arrow chunks, no per-row dicts
                bar.update(docs)
                for i, why in skips:
                    report.skipped[why] += 1
                    if len(skipped_at) < 20:
                        skipped_at.append((f, i, why))
                kept = lengths[lengths > 0]  # a skipped record has no ids; a kept one at least its EOS
                doc_dom = np.fromiter((domains.setdefault(d, len(domains)) for d in doms), np.int32, len(doms))
                buf.append(ids.astype(np.int64, copy=False))
                dom_buf.append(np.repeat(doc_dom, kept))
                buffered += len(ids)
                report.documents += len(kept)
                report.tokens += len(ids)
                if buffered >= seq_len:
                    flat, dflat = np.concatenate(buf), np.concatenate(dom_buf)
                    n = len(flat) // seq_len
                    seqs, dseqs = flat[: n * seq_len].reshape(n, seq_len), dflat[: n * seq_len].reshape(n, seq_len)
                    held = rng.random(n) < heldout_fraction  # one draw per sequence, in order, as always
                    for seq, dom, h in zip(seqs, _majority(dseqs, len(domains)), held):
                        writers["heldout" if h else "train"].add(seq, int(dom))
                    buf, dom_buf = [flat[n * seq_len :]], [dflat[n * seq_len :]]
                    buffered = len(buf[0])
                dt = max(time.time() - t_start, 1e-9)
                bar.set_postfix(docs_s=f"{report.documents / dt:.0f}", tok_s=f"{report.tokens / dt:.0f}")
        bar.close()
        report.skipped_examples = _name_lines(skipped_at)
        report.tail_tokens_dropped = buffered
        splits = {name: w.finish() for name, w in writers.items()}
        report.sequences = {k: v["num_sequences"] for k, v in splits.items()}
        if report.sequences["train"] == 0:
            raise DataError(f"{inputs}: not enough text for one sequence of {seq_len} tokens")
        index = {
            "format": FORMAT,
            "seq_len": seq_len,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "tokenizer": os.path.abspath(tokenizer_path),
            "tokenizer_sha256": sha256_file(tokenizer_path),
            "domains": sorted(domains, key=domains.get),
            "splits": splits,
            "inputs": [os.path.abspath(f) if os.path.exists(f) else f for f in files],
            "seed": seed,
            "heldout_fraction": heldout_fraction,
        }
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        report.seconds = time.time() - t_start
        (tmp / "report.json").write_text(
            json.dumps(
                {
                    "documents": report.documents,
                    "tokens": report.tokens,
                    "skipped": dict(report.skipped),
                    "skipped_examples": report.skipped_examples,
                    "tail_tokens_dropped": report.tail_tokens_dropped,
                    "sequences": report.sequences,
                    "seconds": round(report.seconds, 3),
                    "tokens_per_s": round(report.tokens / max(report.seconds, 1e-9)),
                },
                indent=1,
            )
        )
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        if out.exists():  # overwrite only now that the new output is complete
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
