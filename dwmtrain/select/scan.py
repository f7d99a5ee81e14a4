"""The scan of a selection's pool: every record read, checked and scored, and only per-document numbers kept for
the whole pool (file, line, checksum, domain, tokens, score); records without text are counted skips."""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from dwmtrain.data.readers import SLIMPAJAMA, Fields, iter_records, text_skip_reason

CHUNK = 1024  # records scored (and tokenized) together
MAX_EXAMPLES = 20  #: skipped records named in the report


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
