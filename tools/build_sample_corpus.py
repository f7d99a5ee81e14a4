#!/usr/bin/env python3
"""Rebuild the bundled sample corpus from real text already on a Debian + CPython machine.

No network. Six domains of real, redistributable text (see dwmtrain/data/corpus/README.md for
provenance and licences), split into passage-sized documents, written in SlimPajama format:

    {"text": ..., "meta": {"redpajama_set_name": DOMAIN, "source": PATH}}

A LAMBADA-format cloze set ({"text": passage}, the last word is the target) is built from
*held-out* prose passages that are not in the training file.

    python tools/build_sample_corpus.py --out dwmtrain/data/corpus
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import json
import os
import random
import re
import sys
import sysconfig
from pathlib import Path

import zstandard

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _read(path: str | Path) -> str | None:
    try:
        raw = gzip.open(path).read() if str(path).endswith(".gz") else Path(path).read_bytes()
        return raw.decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # not UTF-8 text: not part of the corpus


def _passages(text: str, lo: int = 800, hi: int = 6000) -> list[str]:
    """Split at blank lines into chunks of roughly lo..hi characters."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        if cur and len(cur) + len(para) > hi:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= lo and len(cur) <= hi and random.random() < 0.35:
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return [p.strip("\n") for p in out if len(p.strip()) >= 200]


def code_docs() -> list[tuple[str, str]]:
    files = sorted(glob.glob(str(STDLIB / "*.py")) + glob.glob(str(STDLIB / "*/*.py")))
    files = [f for f in files if "/test" not in f and "site-packages" not in f and "/idlelib/" not in f]
    docs = []
    for f in files:
        t = _read(f)
        if t and 500 < len(t) < 60000:
            docs.append((t, os.path.relpath(f, STDLIB.parent)))
    return docs


def reference_docs() -> list[tuple[str, str]]:
    ns: dict = {}
    src = STDLIB / "pydoc_data" / "topics.py"
    exec(compile(src.read_text(encoding="utf-8"), str(src), "exec"), ns)  # a dict literal of strings
    docs = []
    for name, text in sorted(ns["topics"].items()):
        for p in _passages(text):
            docs.append((p, f"pydoc_data/topics.py:{name}"))
    return docs


def vim_docs() -> list[tuple[str, str]]:
    docs = []
    for f in sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")):
        t = _read(f)
        if t:
            for p in _passages(t):
                docs.append((p, f))
    return docs


_POD = re.compile(r"^=(head\d|item|over|back|pod|begin|end|for|encoding|cut)\b.*$", re.M)


def perl_pod_docs() -> list[tuple[str, str]]:
    docs = []
    files = sorted(glob.glob("/usr/share/perl/5.*/**/*.pm", recursive=True))
    files += sorted(glob.glob("/usr/share/perl/5.*/pod/*.pod"))
    for f in files:
        t = _read(f)
        if not t or "\n=head1" not in t:
            continue
        # keep the POD blocks (prose documentation), drop the code between them
        blocks = re.findall(r"^=(?:pod|head1)\b.*?(?=^=cut\b|\Z)", t, re.M | re.S)
        prose = "\n\n".join(blocks)
        prose = _POD.sub(lambda m: m.group(0).split(" ", 1)[1] if " " in m.group(0) else "", prose)
        prose = re.sub(r"[BICLFSEX]<([^<>]*)>", r"\1", prose)
        for p in _passages(prose):
            docs.append((p, f))
    return docs


def changelog_docs() -> list[tuple[str, str]]:
    docs = []
    for f in sorted(glob.glob("/usr/share/doc/*/changelog.Debian.gz")):
        t = _read(f)
        if t:
            for p in _passages(t, lo=600, hi=4000)[:6]:  # newest entries of each package
                docs.append((p, f))
    return docs


def license_docs() -> list[tuple[str, str]]:
    docs = []
    for f in sorted(glob.glob("/usr/share/common-licenses/*")):
        if os.path.islink(f) or os.path.isdir(f):
            continue
        t = _read(f)
        if t:
            for p in _passages(t):
                docs.append((p, f))
    return docs


DOMAINS = {
    "python_code": code_docs,
    "python_reference": reference_docs,
    "vim_docs": vim_docs,
    "perl_pod": perl_pod_docs,
    "debian_changelogs": changelog_docs,
    "licenses": license_docs,
}

CLOZE_DOMAINS = ("python_reference", "vim_docs", "perl_pod", "licenses")  # prose, not code or logs
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def cloze_items(passage: str, max_words: int = 120) -> str | None:
    """One LAMBADA-style item from a prose passage: text ending in a word that appeared earlier."""
    words = passage.split()
    if len(words) < 30:
        return None
    for end in range(min(len(words), max_words), 29, -1):
        target = words[end - 1].rstrip(".,;:!?)\"'")
        if _WORD.match(target) and target.lower() in {w.lower().strip(".,;:()\"'") for w in words[: end - 1]}:
            ctx = " ".join(words[: end - 1])
            if not re.search(r"[.;:!?]$", ctx):  # the target continues a sentence
                return f"{ctx} {target}"
    return None


def collect_domains(max_chars: int):
    """(training records, held-out prose passages for the cloze set, per-domain stats), or None if a domain
    has too few documents on this machine."""
    train, heldout_prose = [], []
    stats = {}
    for domain, fn in DOMAINS.items():
        docs = fn()
        random.shuffle(docs)
        total, kept = 0, []
        for text, src in docs:
            if total >= max_chars:
                break
            kept.append((text, src))
            total += len(text)
        if len(kept) < 20:
            print(f"domain {domain}: only {len(kept)} documents found on this machine", file=sys.stderr)
            return None
        # hold out ~8% of prose domains' passages for the cloze set (never trained on)
        n_hold = len(kept) // 12 if domain in CLOZE_DOMAINS else 0
        heldout_prose += [t for t, _ in kept[:n_hold]]
        for text, src in kept[n_hold:]:
            train.append({"text": text, "meta": {"redpajama_set_name": domain, "source": src}})
        stats[domain] = {"documents": len(kept) - n_hold, "chars": sum(len(t) for t, _ in kept[n_hold:])}
    random.shuffle(train)
    return train, heldout_prose, stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="dwmtrain/data/corpus")
    ap.add_argument("--max-chars-per-domain", type=int, default=2_600_000)
    ap.add_argument("--cloze", type=int, default=600, help="number of LAMBADA-format items")
    ap.add_argument("--tokenizer-vocab", type=int, default=4096, help="0: do not train the demo tokenizer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    collected = collect_domains(args.max_chars_per_domain)
    if collected is None:
        return 1
    train, heldout_prose, stats = collected

    buf = io.BytesIO()
    for rec in train:
        buf.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    raw = buf.getvalue()
    (out / "sample.jsonl.zst").write_bytes(zstandard.ZstdCompressor(level=19).compress(raw))

    items = []
    for p in heldout_prose:
        c = cloze_items(p)
        if c:
            items.append(c)
    random.shuffle(items)
    items = items[: args.cloze]
    with open(out / "lambada_sample.jsonl", "w", encoding="utf-8") as f:
        for c in items:
            f.write(json.dumps({"text": c}, ensure_ascii=False) + "\n")

    manifest = {
        "documents": len(train),
        "raw_bytes": len(raw),
        "domains": stats,
        "cloze_items": len(items),
        "seed": args.seed,
    }
    if args.tokenizer_vocab:
        from dwmtrain.data.sentencepiece_tokenizer import train_tokenizer

        train_tokenizer((r["text"] for r in train), out / f"sample_sp{args.tokenizer_vocab}", args.tokenizer_vocab)
        (out / f"sample_sp{args.tokenizer_vocab}.vocab").unlink(missing_ok=True)
        manifest["tokenizer"] = f"sample_sp{args.tokenizer_vocab}.model"
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
