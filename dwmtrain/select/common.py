"""Shared machinery of the offline selectors: read the pool, rank it, cut at the budget, write the subset.

A selection runs in two passes over the input files so that only per-document numbers (location, checksum,
domain, token count, score) are held for the whole pool:

1. scan: every record is read, validated and scored by the method's scorer; records without text (or, for
   ``qurating --missing skip``, without a score) are counted skips, reported by reason;
2. write: the ranked documents are cut at the budget and the selected records, read again and checked
   against the first pass's checksum, are written unchanged (plus ``meta.selection``) in rank order.

Budget crossing: documents are taken in rank order until the budget is *reached*; the document that reaches
or crosses a token budget is included (as QuRating's ``select_subset.py`` does), so the selection holds at
least the budget (unless the pool is smaller) and exceeds it by less than its last document. A token is one
sentencepiece piece, plus one EOS per document: the count ``dwmtrain prepare-data`` reports for the output.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import zlib
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from dwmtrain.data.prepare import _open_text_bytes, diagnose_jsonl, expand_inputs
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_write_text, follow_umask

METHODS = ("random", "dsir", "qurating")
OUT_SUFFIXES = (".jsonl", ".jsonl.zst")
CHUNK = 1024  # records scored (and tokenized) together
MAX_EXAMPLES = 20


# ----------------------------------------------------------------------------- reading


def iter_records(files: list[str]) -> Iterator[tuple[int, int, int, dict]]:
    """Yield ``(file index, line number, crc32 of the line, record)`` for every non-blank line of ``files``.

    Records are parsed here rather than with ``datasets`` (as ``prepare-data`` does) so that they can be
    written back unchanged (pyarrow unifies the schema: absent keys would come back as nulls) and so that
    every error and skip names its line. A bad line raises the same ``file:line: reason`` DataError as
    ``prepare-data``'s diagnosis.
    """
    for fi, path in enumerate(files):
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        with _open_text_bytes(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                    ok = isinstance(rec, dict)
                    ok = ok and (rec.get("text") is None or isinstance(rec["text"], str))
                    ok = ok and (rec.get("meta") is None or isinstance(rec["meta"], dict))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    ok = False
                if not ok:
                    diagnose_jsonl(path)  # raises naming the first bad line, which is this one
                    raise DataError(f"{path}:{lineno}: not a SlimPajama record")
                yield fi, lineno, zlib.crc32(line), rec


def domain_of(rec: dict) -> str:
    """The record's SlimPajama domain (``meta.redpajama_set_name``), as ``prepare-data`` names it."""
    meta = rec.get("meta")
    return str((meta or {}).get("redpajama_set_name") or "unknown")


def get_field(rec: dict, dotted: str):
    """The value at a dotted path (``meta.quality.educational_value``) of a record; KeyError if absent."""
    node = rec
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


# ----------------------------------------------------------------------------- ranking + budget


def gumbel_topk(logits: np.ndarray, seed: int) -> np.ndarray:
    """Indices in the order of sampling without replacement with probability ∝ exp(logits) (Gumbel top-k)."""
    logits = np.asarray(logits, dtype=np.float64)
    keys = logits + np.random.default_rng(seed).gumbel(size=len(logits))
    return np.argsort(-keys, kind="stable")


def sample_order(scores: np.ndarray, temperature: float, seed: int) -> np.ndarray:
    """Sampling order for probability ∝ exp(score / temperature); temperature 0 is deterministic top-k."""
    scores = np.asarray(scores, dtype=np.float64)
    if temperature < 0 or not math.isfinite(temperature):
        raise DataError(f"temperature={temperature}: must be a finite number >= 0")
    if temperature == 0:
        return np.argsort(-scores, kind="stable")  # ties keep pool order
    return gumbel_topk(scores / temperature, seed)


def take_budget(lengths_in_order: np.ndarray, budget: int) -> int:
    """How many leading documents reach ``budget`` tokens, the crossing one included (all if the pool is short)."""
    cum = np.cumsum(np.asarray(lengths_in_order, dtype=np.int64))
    return int(min(np.searchsorted(cum, budget, side="left") + 1, len(cum)))


# ----------------------------------------------------------------------------- output


def report_path(out: str | os.PathLike) -> Path:
    """``DIR/NAME.report.json`` for ``DIR/NAME.jsonl[.zst]``.

    Not ``OUT.report.json``: that name matches ``*.jsonl*``, so ``prepare-data --input DIR`` would read it.
    """
    out = Path(out)
    stem = next((out.name[: -len(s)] for s in (".jsonl.zst", ".jsonl") if out.name.endswith(s)), out.name)
    return out.with_name(f"{stem}.report.json")


def check_output(out: str, files: list[str], overwrite: bool) -> None:
    """Refuse an output with the wrong suffix, one that is also an input, or one that exists without overwrite."""
    if not out.endswith(OUT_SUFFIXES):
        raise DataError(f"--out {out}: must end in .jsonl or .jsonl.zst")
    if os.path.abspath(out) in {os.path.abspath(f) for f in files}:
        raise DataError(f"--out {out} is also an input")
    if not overwrite:
        for p in (Path(out), report_path(out)):
            if p.exists():
                raise FileExistsError(f"{p} exists; pass --overwrite to replace it (only after a successful run)")


def _write_atomic_records(out: str, lines: list[str]) -> None:
    """Write JSON lines to a temp file beside ``out`` (zstd if ``.zst``), then rename it into place."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # no ".jsonl" in the temp name: a concurrent `prepare-data --input DIR` must not pick it up
    fd, tmp = tempfile.mkstemp(prefix=".select-", suffix=".part", dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if out.endswith(".zst"):
                import zstandard

                with zstandard.ZstdCompressor(level=10).stream_writer(fh, closefd=False) as w:
                    for line in lines:
                        w.write(line.encode("utf-8"))
            else:
                for line in lines:
                    fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        follow_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def collect_selected(files: list[str], picked: dict[tuple[int, int], tuple[int, int]], method: str, scores) -> list:
    """Second pass: the selected records as JSON lines in rank order, each with ``meta.selection`` added.

    ``picked`` maps (file index, line) to (rank, crc32 of the line when it was scored).
    """
    out: list[str | None] = [None] * len(picked)
    by_file = sorted({fi for fi, _ in picked})
    for fi in by_file:
        path = files[fi]
        with _open_text_bytes(path) as raw:
            for lineno, line in enumerate(io.BufferedReader(raw), 1):
                hit = picked.get((fi, lineno))
                if hit is None:
                    continue
                rank, crc = hit
                if zlib.crc32(line) != crc:
                    raise DataError(f"{path}:{lineno}: changed while selecting; run again")
                rec = json.loads(line.decode("utf-8"))
                meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
                s = scores[rank]
                meta["selection"] = {"method": method, "score": None if s is None else float(s), "rank": rank}
                rec["meta"] = meta
                out[rank] = json.dumps(rec, ensure_ascii=False) + "\n"
    missing = [r for r, v in enumerate(out) if v is None]
    if missing:
        raise DataError(f"{len(missing)} selected records vanished from the inputs while selecting; run again")
    return out


# ----------------------------------------------------------------------------- the driver


class Scorer:
    """What a method plugs into ``select``: per-record checks, batched scores, and the ranking."""

    has_scores = True  #: whether ``meta.selection.score`` means anything (not for random)

    def prepare(self) -> None:
        """Load what scoring needs (target distribution, rater) before the pool is read."""

    def check(self, rec: dict, where: str) -> str | None:
        """A skip reason for a record that cannot be scored (or raise a DataError naming ``where``)."""
        return None

    def score_batch(self, recs: list[dict], texts: list[str], domains: list[str]) -> np.ndarray:
        """Scores of a batch of pool records (placeholders if ``finalize`` computes them)."""
        return np.zeros(len(texts))

    def finalize(self, scores: np.ndarray, domain_names: list[str]) -> np.ndarray:
        """Final scores of the whole pool, once it has been read (``domain_names``: the pool's domains)."""
        return scores

    def order(self, scores: np.ndarray, seed: int) -> np.ndarray:
        """Pool indices in selection order."""
        raise NotImplementedError

    def parameters(self) -> dict:
        """The method's settings, for the report."""
        return {}

    def extra_report(self) -> dict:
        """Method-specific report fields."""
        return {}


def _scorer(method: str, opts: dict):
    if method == "random":
        from dwmtrain.select.random_select import RandomScorer

        return RandomScorer(**opts)
    if method == "dsir":
        from dwmtrain.select.dsir import DSIRScorer

        return DSIRScorer(**opts)
    if method == "qurating":
        from dwmtrain.select.qurating import QuRatingScorer

        return QuRatingScorer(**opts)
    raise DataError(f"unknown selection method {method!r}; one of {', '.join(METHODS)}")


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
    **method_options,
) -> dict:
    """Select a subset of ``inputs`` with ``method`` up to the budget, write it to ``out``; returns the report."""
    from tqdm import tqdm

    inputs = [str(inputs)] if isinstance(inputs, (str, os.PathLike)) else [str(x) for x in inputs]
    out = str(out)
    if (budget_tokens is None) == (budget_docs is None):
        raise DataError("give exactly one of --budget-tokens and --budget-docs")
    budget = budget_tokens if budget_tokens is not None else budget_docs
    if budget is None or budget <= 0:
        raise DataError(f"budget {budget}: must be a positive number")
    if budget_tokens is not None and not tokenizer:
        raise DataError("--budget-tokens needs --tokenizer (a sentencepiece .model) to count tokens")
    files = expand_inputs(inputs)
    check_output(out, files, overwrite)
    tok = None
    if tokenizer:
        from dwmtrain.data.tokenizer import Tokenizer

        tok = Tokenizer(tokenizer)
    scorer = _scorer(method, method_options)
    scorer.prepare()

    skipped: Counter = Counter()
    examples: list[str] = []
    # per pool document, compactly (a pool may hold millions): where it is, its checksum, domain, tokens
    fis, lns, crcs, dom_ids, ntok = array("i"), array("q"), array("I"), array("i"), array("q")
    dom_names: dict[str, int] = {}
    parts: list[np.ndarray] = []
    buf: list[tuple[int, int, int, dict]] = []

    def skip(reason: str, where: str) -> None:
        skipped[reason] += 1
        if len(examples) < MAX_EXAMPLES:
            examples.append(f"{where}: {reason}")

    def flush() -> None:
        texts = [r["text"] for *_, r in buf]
        doms = [domain_of(r) for *_, r in buf]
        if tok is not None:
            ntok.extend(len(ids) + 1 for ids in tok.encode_batch(texts))  # +1: the EOS prepare-data appends
        parts.append(np.asarray(scorer.score_batch([r for *_, r in buf], texts, doms), dtype=np.float64))
        for (fi, ln, crc, _), d in zip(buf, doms):
            fis.append(fi)
            lns.append(ln)
            crcs.append(crc)
            dom_ids.append(dom_names.setdefault(d, len(dom_names)))
        buf.clear()

    bar = tqdm(unit="doc", disable=not progress, desc=f"scan ({method})")
    for fi, lineno, crc, rec in iter_records(files):
        bar.update(1)
        where = f"{files[fi]}:{lineno}"
        text = rec.get("text")
        if text is None:
            skip("missing text", where)
            continue
        if not text.strip():
            skip("empty text", where)
            continue
        reason = scorer.check(rec, where)
        if reason:
            skip(reason, where)
            continue
        buf.append((fi, lineno, crc, rec))
        if len(buf) >= CHUNK:
            flush()
    if buf:
        flush()
    bar.close()
    n = len(fis)
    if n == 0:
        raise DataError(f"{inputs}: no usable records (skipped: {dict(skipped) or 'none'})")

    names = sorted(dom_names, key=dom_names.get)
    scores = scorer.finalize(np.concatenate(parts), names)
    order = scorer.order(scores, seed)
    lengths = np.asarray(ntok, dtype=np.int64) if tok is not None else None
    if budget_tokens is not None:
        k = take_budget(lengths[order], budget_tokens)
    else:
        k = min(budget_docs, n)
    chosen = order[:k]
    picked = {(fis[i], lns[i]): (rank, crcs[i]) for rank, i in enumerate(chosen.tolist())}
    chosen_scores = [None if not scorer.has_scores else scores[i] for i in chosen]
    lines = collect_selected(files, picked, method, chosen_scores)

    dom_arr = np.frombuffer(dom_ids, dtype=np.int32)
    dom_pool, dom_sel = {}, {}
    for table, idx in ((dom_pool, np.arange(n)), (dom_sel, chosen)):
        docs = np.bincount(dom_arr[idx], minlength=len(names))
        toks = np.bincount(dom_arr[idx], weights=lengths[idx], minlength=len(names)) if lengths is not None else None
        for j, name in enumerate(names):
            if docs[j]:
                table[name] = {"documents": int(docs[j])}
                if toks is not None:
                    table[name]["tokens"] = int(toks[j])
    tokens_selected = int(lengths[chosen].sum()) if lengths is not None else None
    report = {
        "method": method,
        "parameters": scorer.parameters(),
        "seed": seed,
        "inputs": [os.path.abspath(f) for f in files],
        "output": os.path.abspath(out),
        "token_budget": budget_tokens,
        "document_budget": budget_docs,
        "budget_rule": "documents in rank order until the budget is reached; the document crossing it is included",
        "budget_reached": bool((tokens_selected if budget_tokens is not None else k) >= budget),
        "tokenizer": os.path.abspath(tokenizer) if tokenizer else None,
        "token_count": "sentencepiece pieces + 1 EOS per document (what prepare-data counts)" if tokenizer else None,
        "pool_documents": n,
        "selected_documents": int(k),
        "pool_tokens": int(lengths.sum()) if lengths is not None else None,
        "tokens_selected": tokens_selected,
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "domains_pool": dict(sorted(dom_pool.items())),
        "domains_selected": dict(sorted(dom_sel.items())),
    }
    if scorer.has_scores:
        report["score_mean"] = {"pool": float(np.mean(scores)), "selected": float(np.mean(scores[chosen]))}
    report.update(scorer.extra_report())
    _write_atomic_records(out, lines)
    atomic_write_text(report_path(out), json.dumps(report, indent=1) + "\n")
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
