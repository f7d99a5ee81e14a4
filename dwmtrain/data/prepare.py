"""``dwmtrain prepare-data``: documents (any format ``data.readers`` reads) -> packed, memory-mapped token shards.

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

import itertools
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dwmtrain.data.readers import (
    SLIMPAJAMA,
    Fields,
    InputSource,
    expand_sources,
    load_dataset,
    name_lines,
    reader_for,
    record_problem,
    text_skip_reason,
)
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.errors import DataError, OutputExistsError
from dwmtrain.fileio import atomic_dir, sha256_file
from dwmtrain.procs import usable_cpus

FORMAT = "dwmtrain-tokens-v1"


# ----------------------------------------------------------------------------- reading + tokenizing


def _tokenize_batch(batch: dict, tokenizer_path: str, fields: tuple[str, str, str]) -> dict:
    """datasets.map worker: text -> ids (BOS/EOS as the tokenizer's convention), domain name, skip reason ('' if
    kept); ``fields``: where the text and the domain are (``Fields``).

    The ids go back as one Arrow list array built from numpy: converting a Python list per record
    would cost about a tenth of the encoding itself."""
    import pyarrow as pa

    tok, fields = load_tokenizer(tokenizer_path), Fields(*fields)  # loaded once per worker process
    n_rows = len(next(iter(batch.values())))
    text_col, dom_col = fields.columns()
    texts, domains, skip = [], [], []
    for t, d in zip(batch.get(text_col) or [None] * n_rows, batch.get(dom_col) or [None] * n_rows):
        rec = {dom_col: d, text_col: t}
        if problem := record_problem(rec, fields):  # the reader's diagnosis names the record
            raise TypeError(problem)
        texts.append(fields.text_of(rec))
        domains.append(fields.domain_of(rec))
        skip.append(text_skip_reason(texts[-1]))
    kept = [i for i, why in enumerate(skip) if not why]
    enc = tok.encode_batch([texts[i] for i in kept], num_threads=1) if kept else []  # a worker is one core
    n = np.array([len(e) for e in enc], np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(enc), np.int32, int(n.sum()))
    flat = np.insert(flat, np.cumsum(n), tok.eos_id)  # EOS after each record
    if tok.bos_id is not None and kept:  # and BOS before it, where the tokenizer's convention has one (Llama's)
        flat = np.insert(flat, np.concatenate([[0], np.cumsum(n + 1)[:-1]]).astype(np.int64), tok.bos_id)
    lengths = np.zeros(len(texts), np.int64)
    lengths[kept] = n + tok.specials_per_document
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(offsets, flat)
    return pa.table({"ids": ids, "domain": pa.array(domains, pa.string()), "skip": pa.array(skip, pa.string())})


def row_range(rows: int, k: int, K: int) -> range:
    """Rows of slice k of K of a file of ``rows`` rows (``prepare-data --part``'s row ranges)."""
    return range(k * rows // K, (k + 1) * rows // K)


def read_tokenized(files: list[str], tokenizer_path: str, workers: int, cache_dir: str,
                   fields: Fields | list[Fields] = SLIMPAJAMA, rows: list | None = None):  # fmt: skip
    """Load each input (``data.readers``) and tokenize it in parallel worker processes; ``fields``: one for every
    file, or each file's own; ``rows``: per file, None (every row) or (k, K): only row range k of K
    (``row_range``)."""
    out = []
    per = fields if isinstance(fields, list) else [fields] * len(files)
    for f, r, fields in zip(files, rows or [None] * len(files), per):
        ds = load_dataset(f, cache_dir, fields)
        if r is not None:
            ds = ds.select(row_range(len(ds), *r))
        try:
            tok = _map_tokenize(ds, tokenizer_path, workers, f, fields)
        except (UnicodeDecodeError, ValueError, TypeError) as e:  # pyarrow reads bad UTF-8 lazily
            if os.path.exists(f):
                reader_for(f).diagnose(f, fields)
            raise DataError(f"{f}: {e}") from None
        out.append((f, tok))
    return out


def _map_tokenize(ds, tokenizer_path, workers, f, fields: Fields):
    return ds.map(
        _tokenize_batch,
        batched=True,
        batch_size=256,
        num_proc=max(1, workers) if len(ds) > 512 and workers > 1 else None,
        fn_kwargs={"tokenizer_path": tokenizer_path, "fields": (fields.text, fields.domain, fields.fixed)},
        remove_columns=ds.column_names,
        desc=f"tokenize {os.path.basename(f)}",
    )


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


class _Packer:
    """Token ids and their domains, cut into ``seq_len`` sequences as they come; each sequence goes to the
    train or held-out split by one seeded draw, in order, and takes the majority domain of its tokens."""

    def __init__(self, writers: dict, seq_len: int, heldout_fraction: float, seed: int, report: PrepareReport):
        self.writers, self.seq_len, self.heldout_fraction, self.report = writers, seq_len, heldout_fraction, report
        self.rng = np.random.default_rng(seed)
        self.domains: dict[str, int] = {}
        self.buf: list[np.ndarray] = []
        self.dom_buf: list[np.ndarray] = []
        self.buffered = 0

    def add(self, ids: np.ndarray, lengths: np.ndarray, doms: list[str]) -> None:
        """One Arrow batch: the kept records' ids concatenated, ids per record (0: skipped), their domains."""
        kept = lengths[lengths > 0]  # a skipped record has no ids; a kept one at least its EOS
        doc_dom = np.fromiter((self.domains.setdefault(d, len(self.domains)) for d in doms), np.int32, len(doms))
        self.buf.append(ids.astype(np.int64, copy=False))
        self.dom_buf.append(np.repeat(doc_dom, kept))
        self.buffered += len(ids)
        self.report.documents += len(kept)
        self.report.tokens += len(ids)
        if self.buffered >= self.seq_len:
            self._write_full()

    def _write_full(self) -> None:
        flat, dflat = np.concatenate(self.buf), np.concatenate(self.dom_buf)
        n, T = len(flat) // self.seq_len, self.seq_len
        seqs, dseqs = flat[: n * T].reshape(n, T), dflat[: n * T].reshape(n, T)
        held = self.rng.random(n) < self.heldout_fraction  # one draw per sequence, in order, as always
        for seq, dom, h in zip(seqs, _majority(dseqs, len(self.domains)), held):
            self.writers["heldout" if h else "train"].add(seq, int(dom))
        self.buf, self.dom_buf = [flat[n * T :]], [dflat[n * T :]]
        self.buffered = len(self.buf[0])

    def domain_names(self) -> list[str]:
        return sorted(self.domains, key=self.domains.get)


def _pack(tokenized, packer: _Packer, report: PrepareReport, progress: bool, t_start: float) -> None:
    """Every tokenized batch into the packer, whole Arrow chunks at a time (no per-row dicts); skips counted."""
    from tqdm import tqdm

    skipped_at: list[tuple[str, int, str]] = []  # (file, record index, reason): lines named at the end
    bar = tqdm(total=sum(len(ds) for _, ds in tokenized), unit="doc", disable=not progress, desc="pack", smoothing=0.1)
    for f, ds in tokenized:
        for docs, ids, lengths, skips, doms in _arrow_batches(ds):
            bar.update(docs)
            for i, why in skips:
                report.skipped[why] += 1
                if len(skipped_at) < 20:
                    skipped_at.append((f, i, why))
            packer.add(ids, lengths, doms)
            dt = max(time.time() - t_start, 1e-9)
            bar.set_postfix(docs_s=f"{report.documents / dt:.0f}", tok_s=f"{report.tokens / dt:.0f}")
    bar.close()
    report.skipped_examples = name_lines(skipped_at)
    report.tail_tokens_dropped = packer.buffered


def _index(seq_len, dtype, tok, tokenizer_path, domains, splits, files, inputs, fields: Fields) -> dict:
    """index.json: what the shards hold and what they were made from."""
    return {
        "format": FORMAT,
        "seq_len": seq_len,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "tokenizer": os.path.abspath(tokenizer_path),
        "tokenizer_sha256": tok.sha256,
        "bos_id": tok.bos_id,  # each document: [bos_id] + text + [eos_id] (no BOS when None)
        "eos_id": tok.eos_id,
        "domains": domains,
        "splits": splits,
        "inputs": [os.path.abspath(f) if os.path.exists(f) else f for f in files],
        "text_field": fields.text,
        "domain_field": fields.domain,
        **({"sources": _sources_record(inputs)} if any(isinstance(x, InputSource) for x in inputs) else {}),
    }


def _sources_record(inputs: list) -> list[dict]:
    """What index.json says of prepare-data --sources: each entry's files and fields."""
    return [{"inputs": [os.path.abspath(f) for f in x.inputs], "text_field": x.fields.text,
             "domain_field": x.fields.domain, "domain": x.fields.fixed}
            for x in inputs if isinstance(x, InputSource)]  # fmt: skip


def _report_json(report: PrepareReport) -> str:
    return json.dumps(
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


def prepare_data(
    inputs: list,
    tokenizer_path: str,
    out_dir: str,
    seq_len: int = 1024,
    workers: int = 0,  #: tokenizing processes (0: the CPUs the scheduler gave this process)
    heldout_fraction: float = 0.01,
    shard_sequences: int = 65536,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    fields: Fields = SLIMPAJAMA,
    documents=None,
) -> PrepareReport:
    """Tokenize (BOS and EOS as the tokenizer's convention), pack into ``seq_len`` sequences and write shards +
    index atomically; ``fields`` says where each record's text and domain are (an ``InputSource`` among the
    ``inputs`` says it for its own files: prepare-data --sources). ``documents()``: the inputs'
    documents already tokenized, (file, dataset) in their order, instead (``data.parts.merge_parts``)."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it (only after a successful run)")
    if not 0 <= heldout_fraction < 1:
        raise DataError(f"heldout_fraction={heldout_fraction}: must be in [0, 1)")
    files, per_file = expand_sources(inputs, fields)
    tok = load_tokenizer(tokenizer_path)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    t_start = time.time()  # the rate shown counts tokenizing (before the packing loop) too
    report = PrepareReport()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        cache = str(tmp / "cache")
        tokenized = documents() if documents else read_tokenized(files, tokenizer_path, workers or usable_cpus(), cache,
                                                                 per_file)  # fmt: skip
        writers = {split: _ShardWriter(tmp, split, seq_len, dtype, shard_sequences) for split in ("train", "heldout")}
        packer = _Packer(writers, seq_len, heldout_fraction, seed, report)
        _pack(tokenized, packer, report, progress, t_start)
        splits = {name: w.finish() for name, w in writers.items()}
        report.sequences = {k: v["num_sequences"] for k, v in splits.items()}
        if report.sequences["train"] == 0:
            raise DataError(f"{inputs}: not enough text for one sequence of {seq_len} tokens")
        index = _index(seq_len, dtype, tok, tokenizer_path, packer.domain_names(), splits, files, inputs, fields)
        index.update(seed=seed, heldout_fraction=heldout_fraction)
        (tmp / "index.json").write_text(json.dumps(index, indent=1))
        report.seconds = time.time() - t_start
        (tmp / "report.json").write_text(_report_json(report))
        shutil.rmtree(tmp / "cache", ignore_errors=True)
    return report
