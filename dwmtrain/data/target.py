"""The user's target set (``data.target``): the documents the DWM is steered toward. Any input the readers take
(JSON lines plain, .zst or .gz; parquet; arrow; a saved ``datasets`` directory; a directory of them) or a directory
``prepare-data`` wrote. Tokenized once with the run's tokenizer into the run directory
(``validation/target.safetensors``, its sidecar naming the inputs' sizes and sha256, the tokenizer and its sha256,
the text field and the sequence length); a later start reuses it while all of those match and tokenizes again
otherwise. A document (BOS first where the tokenizer has one) is cut into examples of ``seq_len`` tokens, each
scored on every token after its first; every example remembers its document, so that the reward / report split
keeps a document's examples on one side."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from dwmtrain.data.readers import Fields, expand_inputs, iter_records, reader_for, text_skip_reason
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_file, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MIN_TOKENS = 2  #: an example needs a token to predict after its first


@dataclass
class Target:
    """The target's examples (token ids), the document each came from (its record's place among the inputs'
    records, counting skipped ones: a tool can find its text again), and a description for messages."""

    examples: list[list[int]]
    docs: list[int]
    where: str


def target_kind(path: str, kind: str) -> str:
    """``documents`` or ``prepared`` (``auto``: a directory with an index.json is prepared data)."""
    if kind != "auto":
        return kind
    return "prepared" if (Path(path) / "index.json").is_file() else "documents"


def load_target(cfg_data, cache: Path | None) -> Target:
    """``data.target`` tokenized with ``data.tokenizer``, from the cache in ``cache`` (a directory; None: no
    cache) while it matches."""
    t = cfg_data.target
    if not t.path or not os.path.exists(t.path):
        raise DataError(f"data.target.path={t.path!r}: no such file or directory")
    tok = load_tokenizer(cfg_data.tokenizer)
    if target_kind(t.path, t.kind) == "prepared":
        return _prepared(t.path, tok, cfg_data.seq_len)
    try:
        files = expand_inputs([t.path])
    except DataError as e:
        raise DataError(f"data.target.path={t.path}: {e}") from None
    key = None
    if cache is not None:  # what the cached tokens were made from (every input hashed: a changed one is seen)
        key = {"files": [[f, os.path.getsize(f), sha256_file(f)] for f in files], "text_field": t.text_field,
               "tokenizer": os.path.abspath(cfg_data.tokenizer), "tokenizer_sha256": tok.sha256,
               "seq_len": cfg_data.seq_len}  # fmt: skip
    if key is not None and (hit := _cached(cache, key)) is not None:
        return Target(*hit, f"{t.path} ({_count(*hit)}, tokenized before: {cache / 'target.safetensors'})")
    examples, docs = _tokenize(files, tok, Fields(t.text_field, "meta.redpajama_set_name"), cfg_data.seq_len, t.path)
    if cache is not None:
        _store(cache, examples, docs, key)
    return Target(examples, docs, f"{t.path} ({_count(examples, docs)}, field {t.text_field!r})")


def _count(examples: list, docs: list[int]) -> str:
    return f"{len(set(docs))} documents, {len(examples)} examples"


def _tokenize(files: list[str], tok, fields: Fields, seq_len: int, where: str) -> tuple[list[list[int]], list[int]]:
    """(examples, their documents): each usable record cut into ``seq_len`` tokens (BOS first where the tokenizer
    has one; a last piece under 2 tokens dropped); the records skipped counted and said in one line."""
    texts, places, skipped = [], [], Counter()
    for f in files:
        reader_for(f).check(f)  # a cut or corrupt file refused whole, before any record is read
    for place, r in enumerate(iter_records(files, fields)):
        text = fields.text_of(r.rec)
        if why := text_skip_reason(text):
            skipped[why] += 1
            continue
        texts.append(text)
        places.append(place)
    bos = [] if tok.bos_id is None else [tok.bos_id]
    examples, docs = [], []
    for place, ids in zip(places, tok.encode_batch(texts)):
        ids = bos + ids
        pieces = [ids[a : a + seq_len] for a in range(0, len(ids), seq_len) if len(ids) - a >= MIN_TOKENS]
        if not pieces:
            skipped["shorter than 2 tokens"] += 1
        examples += pieces
        docs += [place] * len(pieces)
    if skipped:
        log.warning(f"data.target {where}: skipped {sum(skipped.values())} records ({dict(skipped)})")
    if not examples:
        raise DataError(f"data.target.path={where}: no usable document in field {fields.text!r} "
                        f"({sum(skipped.values())} records skipped: {dict(skipped)})")  # fmt: skip
    return examples, docs


def _prepared(path: str, tok, seq_len: int) -> Target:
    """Every sequence (train and heldout split) of a prepared directory, which must share the run's tokenizer and
    sequence length; each its own document (a packed sequence's documents are not recorded)."""
    from dwmtrain.data.dataset import TokenDataset
    from dwmtrain.fileio import read_json_object

    index = read_json_object(Path(path) / "index.json")
    if index is None:
        raise DataError(f"data.target.path={path}/index.json: not the JSON object prepare-data writes")
    if index.get("tokenizer_sha256") != tok.sha256:
        raise DataError(f"data.target.path={path}: tokenized with {index.get('tokenizer')} "
                        f"(sha256 {str(index.get('tokenizer_sha256'))[:12]}...), not the run's data.tokenizer="
                        f"{tok.path} ({tok.sha256[:12]}...)")  # fmt: skip
    if index.get("seq_len") != seq_len:
        raise DataError(f"data.target.path={path}/index.json: seq_len={index.get('seq_len')}, the run's is {seq_len}")
    seqs = []
    splits = index.get("splits")
    for split in splits if isinstance(splits, dict) else ():
        ds = TokenDataset(Path(path), split)
        seqs += [ds.batch([i])[0].tolist() for i in range(len(ds))]
    if not seqs:
        raise DataError(f"data.target.path={path}: no prepared sequences")
    return Target(seqs, list(range(len(seqs))), f"{path} ({len(seqs)} prepared sequences)")


def _cached(cache: Path, key: dict) -> tuple[list[list[int]], list[int]] | None:
    from safetensors.torch import load_file

    side, data = cache / "target.json", cache / "target.safetensors"
    try:
        if json.loads(side.read_text()) != key:
            return None
        t = load_file(str(data))
        ids, offsets, docs = t["ids"].tolist(), t["offsets"].tolist(), t["docs"].tolist()
    except Exception:  # noqa: BLE001 - absent, cut, foreign, anything: it is only a cache, tokenized again
        return None
    return [ids[a:b] for a, b in zip(offsets, offsets[1:])], docs


def _store(cache: Path, examples: list[list[int]], docs: list[int], key: dict) -> None:
    """The tokens, then the sidecar that makes them a cache hit (written last: a cut write is tokenized again)."""
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e))
    flat = torch.tensor([i for e in examples for i in e], dtype=torch.int64)
    (cache / "target.json").unlink(missing_ok=True)  # no sidecar of older tokens while the new ones are written
    with atomic_file(cache / "target.safetensors") as tmp:
        save_file({"ids": flat, "offsets": torch.tensor(offsets, dtype=torch.int64),
                   "docs": torch.tensor(docs, dtype=torch.int64)}, str(tmp))  # fmt: skip
    atomic_write_text(cache / "target.json", json.dumps(key, indent=1))
