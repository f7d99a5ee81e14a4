#!/usr/bin/env python3
"""Download the lm-eval tasks' data once, on a machine with network, into the local layout ``dwmtrain eval`` reads.

    python tools/fetch_eval_data.py --out DATA_DIR [--tasks arc_easy,piqa] [--logiqa-source URL_OR_DIR]

writes ``DATA_DIR/<task>/<split>.jsonl``: one record a line, exactly as ``datasets.load_dataset`` gives it for the
hub dataset the installed lm-eval YAML names (docs/evaluation.md). Only the splits lm-eval reads are fetched: the
scored split and the few-shot split (``dwmtrain.eval.tasks.required_splits``).

LogiQA's hub dataset (EleutherAI/logiqa) is a loading script that datasets>=4 no longer runs; its records are made
here from the original text files of lgw863/LogiQA-dataset (Train.txt, Eval.txt, Test.txt), parsed exactly as that
script parsed them (``parse_logiqa``). ``--logiqa-source`` is a base URL or a local directory holding those files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from collections.abc import Iterable
from pathlib import Path

LOGIQA_SOURCE = "https://raw.githubusercontent.com/lgw863/LogiQA-dataset/master"
LOGIQA_FILES = {"train": "Train.txt", "validation": "Eval.txt", "test": "Test.txt"}


def parse_logiqa(text: str) -> list[dict]:
    """Records ``{label, context, question, options}`` of a LogiQA text file, as EleutherAI/logiqa's script made."""

    def normalize(s: str) -> str:
        return s.replace(".", ". ").strip()

    records = []
    # Each record: a blank line, the answer letter, the passage, the question, then one "A." style line per option.
    for i, block in enumerate(text.replace("\r\n", "\n").strip().split("\n\n")):
        lines = block.split("\n")
        rec = {
            "label": lines[0].strip(),
            "context": normalize(lines[1]),
            "question": normalize(lines[2]),
            "options": [normalize(option[2:]) for option in lines[3:]],
        }
        if rec["label"] not in ("a", "b", "c", "d") or len(rec["options"]) != 4:
            raise ValueError(f"LogiQA record {i + 1}: expected an answer letter a-d and 4 options, got {block[:200]!r}")
        records.append(rec)
    return records


def read_logiqa(source: str, split: str) -> list[dict]:
    """LogiQA records of ``split`` from ``source``: a base URL or a directory with Train.txt / Eval.txt / Test.txt."""
    name = LOGIQA_FILES[split]
    if os.path.isdir(source):
        text = Path(source, name).read_text(encoding="utf-8")
    else:
        with urllib.request.urlopen(f"{source.rstrip('/')}/{name}", timeout=60) as r:
            text = r.read().decode("utf-8")
    return parse_logiqa(text)


def hub_records(path: str, name: str | None, split: str) -> Iterable[dict]:
    """Records of one split of a hub dataset, as ``datasets.load_dataset`` returns them."""
    import datasets

    return datasets.load_dataset(path, name, split=split)


def write_jsonl(records: Iterable[dict], path: Path) -> int:
    """Write ``records`` one JSON object a line, atomically; return how many."""
    from dwmtrain.fileio import atomic_file

    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(dict(rec), ensure_ascii=False) + "\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    """Fetch every requested task's splits into ``--out``."""
    from dwmtrain.eval.tasks import TASKS, required_splits

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="DATA_DIR to write <task>/<split>.jsonl into")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names (default: all)")
    ap.add_argument("--logiqa-source", default=LOGIQA_SOURCE, help="base URL or directory of LogiQA's .txt files")
    ap.add_argument("--overwrite", action="store_true", help="replace files that already exist")
    a = ap.parse_args(argv)

    for task in [t for t in a.tasks.split(",") if t]:
        if task not in TASKS:
            sys.exit(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        spec = TASKS[task]
        for split in required_splits(task):
            out = Path(a.out, task, f"{split}.jsonl")
            if out.exists() and not a.overwrite:
                print(f"{out}: exists, kept")
                continue
            if task == "logiqa":
                records = read_logiqa(a.logiqa_source, split)
            else:
                records = hub_records(spec.hub_path, spec.hub_name, split)
            print(f"{out}: {write_jsonl(records, out)} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
