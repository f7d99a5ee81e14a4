#!/usr/bin/env python3
"""`make demo` (foundation stage): prepare the bundled corpus and summarize the demo model.

The end-to-end multi-stage DWM run replaces this once the training job exists.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "dwmtrain" / "data" / "corpus"
OUT = ROOT / "runs" / "demo"


def sh(*args):
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([sys.executable, "-m", "dwmtrain.cli", *map(str, args)], check=True)


def main():
    print("dwmtrain demo: data preparation + model summary only (training arrives in a later issue)")
    data = OUT / "data"
    if not (data / "index.json").exists():
        sh("prepare-data", "--input", CORPUS / "sample.jsonl.zst", "--tokenizer", CORPUS / "sample_sp4096.model",
           "--out", data, "--seq-len", 256, "--workers", os.cpu_count() or 1)
    sh("describe-model", "small", "--vocab-size", 4096)


if __name__ == "__main__":
    main()
