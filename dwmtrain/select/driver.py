"""The selection driver: read the pool, rank it, cut at the budget, write the subset; the table of methods.

A selection runs in two passes over the input files so that only per-document numbers (location, checksum,
domain, token count, score) are held for the whole pool:

1. scan: every record is read, validated and scored by the method's scorer; records without text (or, for
   ``qurating --missing skip``, without a score) are counted skips, reported by reason;
2. write: the ranked documents are cut at the budget and the selected records, read again and checked
   against the first pass's checksum, are written unchanged (plus ``meta.selection``) in rank order, through
   temporary bucket files by rank: the memory never holds the selected text (``write_selected``).

Budget crossing: documents are taken in rank order until the budget is *reached*; the document that reaches
or crosses a token budget is included (as QuRating's ``select_subset.py`` does), so the selection holds at
least the budget (unless the pool is smaller) and exceeds it by less than its last document. A token is one
tokenizer piece, plus one EOS per document: the count ``dwmtrain prepare-data`` reports for the output.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dwmtrain.data.readers import SLIMPAJAMA, Fields, expand_inputs, iter_records, reader_for, text_skip_reason
from dwmtrain.errors import DataError, OutputExistsError
from dwmtrain.fileio import atomic_file, atomic_write_text
from dwmtrain.select.base import take_budget
from dwmtrain.select.dsir import DSIRScorer
from dwmtrain.select.qurating import QuRatingScorer
from dwmtrain.select.random_select import RandomScorer

METHODS = {"random": RandomScorer, "dsir": DSIRScorer, "qurating": QuRatingScorer}
OUT_SUFFIXES = (".jsonl", ".jsonl.zst")
CHUNK = 1024  # records scored (and tokenized) together
MAX_EXAMPLES = 20


# ----------------------------------------------------------------------------- output


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


# ----------------------------------------------------------------------------- the scan


@dataclass
class Pool:
    """Per pool document, compactly (a pool may hold millions): where it is, its checksum, domain, tokens."""

    files: list[str]
    fields: Fields = SLIMPAJAMA
    fis: array = field(default_factory=lambda: array("i"))
    lns: array = field(default_factory=lambda: array("q"))
    crcs: array = field(default_factory=lambda: array("I"))
    dom_ids: array = field(default_factory=lambda: array("i"))
    ntok: array = field(default_factory=lambda: array("q"))
    dom_names: dict[str, int] = field(default_factory=dict)
    parts: list[np.ndarray] = field(default_factory=list)  # scores, one array per scored batch
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    example_at: list[tuple] = field(default_factory=list)  # (file index, line, reason) of each example

    def skip(self, reason: str, where: str, at: tuple[int, int] = (0, 0)) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")
            self.example_at.append((*at, reason))

    def add_batch(self, buf: list, scorer, tok) -> None:
        """Score (and count the tokens of) a batch of usable records."""
        texts = [self.fields.text_of(r.rec) for r in buf]
        doms = [self.fields.domain_of(r.rec) for r in buf]
        if tok is not None:
            extra = tok.specials_per_document  # the EOS (and BOS) prepare-data adds
            self.ntok.extend(len(ids) + extra for ids in tok.encode_batch(texts))
        self.parts.append(np.asarray(scorer.score_batch([r.rec for r in buf], texts, doms), dtype=np.float64))
        for r, d in zip(buf, doms):
            self.fis.append(r.file_index)
            self.lns.append(r.line)
            self.crcs.append(r.crc)
            self.dom_ids.append(self.dom_names.setdefault(d, len(self.dom_names)))

    def domain_names(self) -> list[str]:
        return sorted(self.dom_names, key=self.dom_names.get)


def scan_pool(files: list[str], scorer, tok, method: str, progress: bool, fields: Fields = SLIMPAJAMA,
              file_ids: list[int] | None = None) -> Pool:  # fmt: skip
    """First pass: every record read, checked and scored; the unusable ones are counted skips. ``file_ids``: the
    pool's index of each of ``files`` (a part of the pool scans some of its files)."""
    from tqdm import tqdm

    pool, buf = Pool(files, fields), []
    bar = tqdm(unit="doc", disable=not progress, desc=f"scan ({method})", mininterval=10)
    for r in iter_records(files, fields):
        bar.update(1)
        where = f"{files[r.file_index]}:{r.line}"
        reason = text_skip_reason(fields.text_of(r.rec)) or scorer.check(r.rec, where)
        if reason:
            pool.skip(reason, where, (r.file_index if file_ids is None else file_ids[r.file_index], r.line))
            continue
        buf.append(r if file_ids is None else replace(r, file_index=file_ids[r.file_index]))
        if len(buf) >= CHUNK:
            pool.add_batch(buf, scorer, tok)
            buf = []
    if buf:
        pool.add_batch(buf, scorer, tok)
    bar.close()
    return pool


# ----------------------------------------------------------------------------- the report


def domain_tables(pool: Pool, chosen: np.ndarray, lengths) -> tuple[dict, dict]:
    """Documents (and tokens) per domain in the pool and in the selection."""
    names, n = pool.domain_names(), len(pool.fis)
    dom_arr = np.frombuffer(pool.dom_ids, dtype=np.int32)
    tables = []
    for idx in (np.arange(n), chosen):
        docs = np.bincount(dom_arr[idx], minlength=len(names))
        toks = np.bincount(dom_arr[idx], weights=lengths[idx], minlength=len(names)) if lengths is not None else None
        table = {}
        for j, name in enumerate(names):
            if docs[j]:
                table[name] = {"documents": int(docs[j])}
                if toks is not None:
                    table[name]["tokens"] = int(toks[j])
        tables.append(dict(sorted(table.items())))
    return tables[0], tables[1]


def build_report(method, scorer, seed, files, out, budgets, tokenizer, pool, scores, chosen, lengths) -> dict:
    """Everything a selection did, for ``NAME.report.json`` and ``summary``."""
    budget_tokens, budget_docs = budgets
    k = len(chosen)
    tokens_selected = int(lengths[chosen].sum()) if lengths is not None else None
    dom_pool, dom_sel = domain_tables(pool, chosen, lengths)
    report = {
        "method": method,
        "parameters": scorer.parameters(),
        "seed": seed,
        "inputs": [os.path.abspath(f) for f in files],
        "output": os.path.abspath(out),
        "token_budget": budget_tokens,
        "document_budget": budget_docs,
        "budget_rule": "documents in rank order until the budget is reached; the document crossing it is included",
        "budget_reached": bool((tokens_selected if budget_tokens is not None else k) >= (budget_tokens or budget_docs)),
        "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
        "token_count": "tokenizer pieces + the EOS (and BOS) of each document: what prepare-data counts"
        if tokenizer
        else None,
        "pool_documents": len(pool.fis),
        "selected_documents": int(k),
        "pool_tokens": int(lengths.sum()) if lengths is not None else None,
        "tokens_selected": tokens_selected,
        "skipped": dict(sorted(pool.skipped.items())),
        "skipped_examples": pool.examples,
        "domains_pool": dom_pool,
        "domains_selected": dom_sel,
    }
    if scorer.has_scores:
        report["score_mean"] = {"pool": float(np.mean(scores)), "selected": float(np.mean(scores[chosen]))}
    report.update(scorer.extra_report())
    return report


# ----------------------------------------------------------------------------- select


def check_budget(budget_tokens: int | None, budget_docs: int | None, tokenizer: str | None) -> None:
    if (budget_tokens is None) == (budget_docs is None):
        raise DataError("give exactly one of --budget-tokens and --budget-docs")
    budget = budget_tokens if budget_tokens is not None else budget_docs
    if budget is None or budget <= 0:
        raise DataError(f"budget {budget}: must be a positive number")
    if budget_tokens is not None and not tokenizer:
        raise DataError("--budget-tokens needs --tokenizer (the tokenizer to count tokens with)")


def scorer_for(method: str, options: dict):
    """The method's scorer from the table, or a DataError naming the methods."""
    if method not in METHODS:
        raise DataError(f"unknown selection method {method!r}; one of {', '.join(METHODS)}")
    return METHODS[method](**options)


def select(
    method: str,
    inputs: list[str] | str,
    out: str | os.PathLike,
    *,
    budget_tokens: int | None = None,
    budget_docs: int | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    fields: Fields = SLIMPAJAMA,
    shard_docs: int = 0,
    **method_options,
) -> dict:
    """Select a subset of ``inputs`` with ``method`` up to the budget, write it to ``out``; returns the report.
    ``fields``: where each record's text and domain are (any input format ``data.readers`` reads)."""
    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(x) for x in inputs]
    out = str(out)
    check_budget(budget_tokens, budget_docs, tokenizer)
    files = expand_inputs(inputs)
    check_output(out, files, overwrite)
    tok = None
    if tokenizer:
        from dwmtrain.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    scorer = scorer_for(method, method_options)
    scorer.fields = fields
    scorer.prepare()
    pool = scan_pool(files, scorer, tok, method, progress, fields)
    if not pool.fis:
        raise DataError(f"{inputs}: no usable records (skipped: {dict(pool.skipped) or 'none'})")
    scores = scorer.finalize(np.concatenate(pool.parts), pool.domain_names())
    lengths = np.asarray(pool.ntok, dtype=np.int64) if tok is not None else None
    return cut_and_write(Selection(method, scorer, seed, files, out, fields, tokenizer, shard_docs),
                         pool, scores, lengths, (budget_tokens, budget_docs))  # fmt: skip


@dataclass
class Selection:
    """What a selection writes and how: its method and scorer, seed, inputs, output, fields, tokenizer."""

    method: str
    scorer: object
    seed: int
    files: list[str]
    out: str
    fields: Fields
    tokenizer: str | None
    shard_docs: int = 0


def cut_and_write(sel: Selection, pool: Pool, scores: np.ndarray, lengths, budgets: tuple,
                  extra: dict | None = None) -> dict:  # fmt: skip
    """Rank the scored pool, cut at the budget, write the selected records and the report (plus ``extra``);
    returns the report."""
    budget_tokens, budget_docs = budgets
    order = sel.scorer.order(scores, sel.seed)
    k = take_budget(lengths[order], budget_tokens) if budget_tokens is not None else min(budget_docs, len(pool.fis))
    chosen = order[:k]
    picked = {(pool.fis[i], pool.lns[i]): (rank, pool.crcs[i]) for rank, i in enumerate(chosen.tolist())}
    report = build_report(sel.method, sel.scorer, sel.seed, sel.files, sel.out, budgets, sel.tokenizer, pool, scores,
                          chosen, lengths)  # fmt: skip
    report.update(extra or {})
    sel_scores = [scores[i] if sel.scorer.has_scores else None for i in chosen]
    report["outputs"] = write_selected(sel.out, sel.files, picked, sel.method, sel_scores, sel.fields,
                                       shard_docs=sel.shard_docs)  # fmt: skip
    atomic_write_text(report_path(sel.out), json.dumps(report, indent=1) + "\n")
    return report


def summary(report: dict) -> str:
    """A few lines for the terminal: sizes, budget, skips, and the domain mix before and after."""
    r = report
    lines = [f"method: {r['method']}  seed: {r['seed']}  {json.dumps(r['parameters'])}"]
    if r["token_budget"] is not None:
        lines.append(
            f"selected {r['selected_documents']} of {r['pool_documents']} documents, "
            f"{r['tokens_selected']} of {r['pool_tokens']} tokens (budget {r['token_budget']}; "
            "the document crossing it is included)"
        )
    else:
        lines.append(
            f"selected {r['selected_documents']} of {r['pool_documents']} documents (budget {r['document_budget']})"
        )
    if not r["budget_reached"]:
        lines.append("warning: the pool is smaller than the budget; every usable document was selected")
    sk = r["skipped"]
    lines.append("skipped records: " + (", ".join(f"{k}: {v}" for k, v in sk.items()) if sk else "0"))
    lines += [f"  e.g. {e}" for e in r["skipped_examples"][:5]]
    if "score_mean" in r:
        lines.append(f"mean score: pool {r['score_mean']['pool']:.4g}, selected {r['score_mean']['selected']:.4g}")
    pool, sel = r["domains_pool"], r["domains_selected"]
    np_, ns = max(r["pool_documents"], 1), max(r["selected_documents"], 1)
    width = max([len("domain")] + [len(d) for d in pool])
    lines.append(f"{'domain':<{width}}  {'pool docs':>10}  {'selected docs':>14}")
    for d in sorted(pool, key=lambda d: -sel.get(d, {}).get("documents", 0)):
        a, b = pool[d]["documents"], sel.get(d, {}).get("documents", 0)
        lines.append(f"{d:<{width}}  {a:>5} {100 * a / np_:3.0f}%  {b:>8} {100 * b / ns:3.0f}%")
    return "\n".join(lines)
