"""``dwmtrain select METHOD ... --part I/N`` and ``--merge``: a selection over a large pool split over N jobs
(``dwmtrain/launch/slurm/select_array.sh``). Each part scans its share of the input files (reads, checks,
scores and counts the tokens of every record); one merge ranks the whole pool, cuts it at the budget and writes
the selection: the same records in the same order, and the same report, as one ``dwmtrain select`` of the inputs
with the same seed.

    DIR/NAME.parts/part-000I-of-000N/   scan.npz: per usable document its file, line, checksum, domain, tokens
                                        and score, and the method's pool statistics; scan.json, written last
                                        weights.npy, weights.json: a two-pass method's scores (DSIR)

Files are assigned whole (``arrays.assign_files``: byte-balanced, deterministic; unlike prepare-data's parts,
never cut into row ranges: the merge's second read names each record by its file and line). DSIR's weights
need the n-gram distribution of the whole pool, so each of its parts runs twice: the first run scans and counts,
the second (once every part is scanned) sums every part's counts and computes its documents' weights. A run of
``--part I/N`` does the part's next step and skips a complete part, so the array is submitted twice for DSIR
(``select_array.sh`` does). The parts hold no budget or seed: one scan merges at any budget and seed, and the
parts are kept for that (remove ``NAME.parts/`` when done).
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from dwmtrain.arrays import JobArray, assign_files, parse_part
from dwmtrain.data.readers import SLIMPAJAMA, Fields, expand_inputs
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_write_text
from dwmtrain.select.driver import METHODS, Selection, check_budget, cut_and_write, scorer_for
from dwmtrain.select.output import OUT_SUFFIXES, check_output
from dwmtrain.select.scan import MAX_EXAMPLES, Pool, scan_pool

SCAN, WEIGHTS = "scan.json", "weights.json"
ARRAYS = ("fis", "lns", "crcs", "dom_ids", "ntok")


class Parts:
    """One selection's parts: the method's scorer, the inputs and their assignment, what each part's scan is
    made from (``marker``), and where the parts are."""

    def __init__(self, method: str, inputs, out: str, tokenizer: str | None, fields: Fields, options: dict):
        if not out.endswith(OUT_SUFFIXES):
            raise DataError(f"--out {out}: must end in .jsonl or .jsonl.zst")
        self.method, self.out, self.fields, self.tokenizer = method, out, fields, tokenizer
        self.array = JobArray(out, f"select {method}", SCAN, "inputs, tokenizer, fields or method settings")
        self.files = expand_inputs([str(inputs)] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
        self.scorer = scorer_for(method, options)
        self.scorer.fields = fields
        self.tok = None
        if tokenizer:
            from dwmtrain.data.tokenizer import load_tokenizer

            self.tok = load_tokenizer(tokenizer)

    def marker(self, i: int, n: int) -> dict:
        """What part I of N's scan is made from: a part whose scan.json differs is foreign (redone or refused)."""
        return {"method": self.method, "part": i, "of": n, "inputs": [os.path.abspath(f) for f in self.files],
                "files": assign_files(self.files, n)[i], "tokenizer_sha256": self.tok.sha256 if self.tok else None,
                "text_field": self.fields.text, "domain_field": self.fields.domain,
                "scan_parameters": self.scorer.scan_parameters()}  # fmt: skip

    def scanned(self, i: int, n: int) -> dict | None:
        """Part I's scan.json if it is complete and made from this selection's inputs and settings."""
        return self.array.read(i, n) if self.array.holds(i, n, self.marker(i, n)) else None

    def weighed(self, i: int, n: int) -> bool:
        return self.array.read(i, n, WEIGHTS) == self.marker(i, n)

    def complete(self, i: int, n: int) -> bool:
        return self.scanned(i, n) is not None and (not self.scorer.two_pass or self.weighed(i, n))


# ----------------------------------------------------------------------------- a part


def select_part(method: str, inputs, out, part: str, *, tokenizer: str | None = None, progress: bool = False,
                fields: Fields = SLIMPAJAMA, **method_options) -> str:  # fmt: skip
    """Part I of N's next step: its scan, else (a two-pass method, every part scanned) its weights, else skip.
    Returns a line saying what was done, with the rate."""
    i, n = parse_part(part)
    ps = Parts(method, inputs, str(out), tokenizer, fields, method_options)
    dest = ps.array.part(i, n)
    if ps.scanned(i, n) is None:
        return _scan(ps, i, n, dest, progress)
    if not ps.scorer.two_pass or ps.weighed(i, n):
        return f"part {i}/{n} is complete ({dest}): skipped"
    return _weigh(ps, i, n, dest, progress)


def _scan(ps: Parts, i: int, n: int, dest: Path, progress: bool) -> str:
    t0 = time.time()
    mine = assign_files(ps.files, n)[i]
    ps.scorer.keep_features = False  # a two-pass method's scan only counts
    ps.scorer.prepare()
    info = ps.marker(i, n)  # completed below with what the scan found
    with ps.array.writing(i, n, info) as tmp:  # a killed scan leaves no scan.json: a rerun redoes it
        pool = scan_pool([ps.files[k] for k in mine], ps.scorer, ps.tok, f"{ps.method} {i}/{n}", progress,
                         ps.fields, file_ids=mine)  # fmt: skip
        scores = np.concatenate(pool.parts) if pool.parts and not ps.scorer.two_pass else np.zeros(0)
        arrays = {k: np.frombuffer(getattr(pool, k), dtype=getattr(pool, k).typecode) for k in ARRAYS}
        stats = {f"stat_{k}": v for k, v in ps.scorer.pool_stats().items()}
        np.savez(tmp / "scan.npz", scores=scores, **arrays, **stats)
        dt = time.time() - t0
        info.update(documents=len(pool.fis), domains=pool.domain_names(), skipped=dict(pool.skipped),
                    examples=pool.example_at, seconds=round(dt, 3))  # fmt: skip
    then = " (its weights: run the part again once every part is scanned)" if ps.scorer.two_pass else ""
    return (f"part {i}/{n} scanned: {len(mine)} files, {len(pool.fis):,} documents in {dt:.1f} s "
            f"({len(pool.fis) / max(dt, 1e-9):,.0f} docs/s) -> {dest}{then}")  # fmt: skip


def _weigh(ps: Parts, i: int, n: int, dest: Path, progress: bool) -> str:
    """A two-pass part's second step: its documents' scores from every part's statistics."""
    missing = [j for j in range(n) if ps.scanned(j, n) is None]
    if missing:
        raise DataError(f"part {i}/{n} is scanned, but its weights need every part's statistics and parts "
                        f"{', '.join(f'{j}/{n}' for j in missing)} are not scanned yet: run them, then part {i} "
                        "again")  # fmt: skip
    t0 = time.time()
    mine = assign_files(ps.files, n)[i]
    ps.scorer.prepare()
    pool = scan_pool([ps.files[k] for k in mine], ps.scorer, None, f"{ps.method} {i}/{n} weights", progress,
                     ps.fields, file_ids=mine)  # fmt: skip
    with np.load(dest / "scan.npz") as z:
        if not (np.array_equal(z["crcs"], np.frombuffer(pool.crcs, dtype="I")) and
                np.array_equal(z["lns"], np.frombuffer(pool.lns, dtype="q"))):  # fmt: skip
            raise DataError(f"{dest}: its files changed since the part was scanned; remove {dest} and run the "
                            "part again (then the parts after it)")  # fmt: skip
    ps.scorer.use_pool_stats([_stats(ps, j, n) for j in range(n)])
    names = sorted({d for j in range(n) for d in ps.scanned(j, n)["domains"]})
    weights = ps.scorer.finalize(np.concatenate(pool.parts) if pool.parts else np.zeros(0), names)
    np.save(dest / "weights.npy.tmp.npy", weights)
    os.replace(dest / "weights.npy.tmp.npy", dest / "weights.npy")
    atomic_write_text(dest / WEIGHTS, json.dumps(ps.marker(i, n), indent=1))  # written last
    dt = time.time() - t0
    return (f"part {i}/{n} weighed: {len(weights):,} documents in {dt:.1f} s "
            f"({len(weights) / max(dt, 1e-9):,.0f} docs/s) -> {dest}")  # fmt: skip


def _stats(ps: Parts, j: int, n: int) -> dict[str, np.ndarray]:
    with np.load(ps.array.part(j, n) / "scan.npz") as z:
        return {k[5:]: z[k] for k in z.files if k.startswith("stat_")}


# ----------------------------------------------------------------------------- the merge


def merge_selection(method: str, inputs, out, *, budget_tokens: int | None = None, budget_docs: int | None = None,
                    tokenizer: str | None = None, seed: int = 0, overwrite: bool = False,
                    fields: Fields = SLIMPAJAMA, shard_docs: int = 0, **method_options) -> dict:  # fmt: skip
    """Rank the whole pool from its parts, cut at the budget and write the selection (``select``'s output and
    report, plus ``parts``); a missing, unfinished or foreign part is a DataError naming it."""
    check_budget(budget_tokens, budget_docs, tokenizer)
    ps = Parts(method, inputs, str(out), tokenizer, fields, method_options)
    check_output(ps.out, ps.files, overwrite)
    n = ps.array.require(ps.marker)
    infos = [ps.scanned(j, n) for j in range(n)]
    for j in range(n) if ps.scorer.two_pass else ():
        if not ps.weighed(j, n):
            raise DataError(f"{ps.array.part(j, n)}: part {j}/{n} is scanned but not weighed; run select "
                            f"{method} --part {j}/{n} again (every part is scanned), then the merge")  # fmt: skip
    ps.scorer.prepare_merge()
    ps.scorer.use_pool_stats([_stats(ps, j, n) for j in range(n)])
    pool, scores = _pool_of(ps, infos, n)
    if not pool.fis:
        raise DataError(f"{ps.files}: no usable records (skipped: {dict(pool.skipped) or 'none'})")
    if not ps.scorer.two_pass:
        scores = ps.scorer.finalize(scores, pool.domain_names())
    lengths = np.frombuffer(pool.ntok, dtype=np.int64).copy() if ps.tok is not None else None
    sel = Selection(method, ps.scorer, seed, ps.files, ps.out, fields, tokenizer, shard_docs)
    report = cut_and_write(sel, pool, scores, lengths, (budget_tokens, budget_docs), extra={"parts": n})
    return report


def _pool_of(ps: Parts, infos: list[dict], n: int) -> tuple[Pool, np.ndarray]:
    """The whole pool in the order one scan reads it (file by file), from the parts: its per-document arrays,
    domain ids numbered by first appearance, skips (and the first examples), and the scores."""
    cols: dict[str, list] = {k: [] for k in (*ARRAYS, "scores", "dom")}  # "dom": each part's own domain ids
    for j in range(n):
        d = ps.array.part(j, n)
        with np.load(d / "scan.npz") as z:
            for k in ARRAYS:
                cols[k].append(z[k])
            cols["dom"].append(z["dom_ids"])
            cols["scores"].append(np.load(d / "weights.npy") if ps.scorer.two_pass else z["scores"])
    fis = np.concatenate(cols["fis"])
    order = np.argsort(fis, kind="stable")  # parts hold whole files, each in line order
    pool = Pool(ps.files, ps.fields)
    for k in ARRAYS:
        a = np.concatenate(cols[k])
        a = a[order] if len(a) else a  # no tokens counted without a tokenizer
        setattr(pool, k, array(getattr(pool, k).typecode, a.astype(getattr(pool, k).typecode).tobytes()))
    names = sorted({x for info in infos for x in info["domains"]})  # provisional ids, then by first appearance
    prov = np.concatenate([np.searchsorted(names, np.asarray(info["domains"], dtype=object))[ids]
                           for info, ids in zip(infos, cols["dom"])]).astype(np.int64)[order]  # fmt: skip
    uniq, first = np.unique(prov, return_index=True)
    by_first = uniq[np.argsort(first)]
    renum = np.zeros(len(names), dtype=np.int32)
    renum[by_first] = np.arange(len(by_first), dtype=np.int32)
    pool.dom_names = {names[p]: k for k, p in enumerate(by_first.tolist())}
    pool.dom_ids = array("i", renum[prov].tobytes())
    pool.skipped = sum((Counter(info["skipped"]) for info in infos), Counter())
    examples = sorted(tuple(e) for info in infos for e in info["examples"])[:MAX_EXAMPLES]
    pool.examples = [f"{ps.files[fi]}:{line}: {reason}" for fi, line, reason in examples]
    return pool, np.concatenate(cols["scores"])[order].astype(np.float64)


# ----------------------------------------------------------------------------- status


def selection_status(out: str) -> list[str]:
    """One line per part of a selection's array: complete, scanned (a two-pass method's weights to come),
    started (running, or failed), or not started; with the documents and the rate of a scanned part."""
    arr = JobArray(out, "select", marker=SCAN)

    def describe(i: int, n: int, info: dict) -> str:
        docs, secs = info.get("documents"), info.get("seconds", 0)
        if type(docs) is not int or type(secs) not in (int, float):
            return f"{arr.part(i, n) / SCAN} is not a scan marker dwmtrain wrote: remove it and rerun the part"
        two = METHODS[info["method"]].two_pass if info.get("method") in METHODS else False
        state = "complete" if not two or (arr.part(i, n) / WEIGHTS).is_file() else "scanned, not weighed yet"
        return f"{state} ({docs:,} documents, scanned at {docs / max(secs, 1e-9):,.0f} docs/s)"

    return arr.status(describe)
