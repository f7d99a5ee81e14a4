#!/usr/bin/env python3
"""A tiny, randomly initialized quality rater: a stand-in for a QuRater model in the CPU walk-through.

It has the interface of the real thing (a local Hugging Face sequence-classification directory with one
output, loaded by ``dwmtrain select qurating --rater DIR``) but no judgement: its scores are random
functions of the text. At paper scale use a QuRating rater (princeton-nlp/QuRater-1.3B, copied to local
disk) instead; see docs/experiments.md.

    python tools/make_tiny_rater.py --out runs/exp/tiny-rater
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_tiny_rater(out: Path, sp_model: Path, seed: int = 0) -> Path:
    """Write the bundled tokenizer and a seeded 2-layer LlamaForSequenceClassification (1 output) to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dwmtrain.data.sentencepiece_tokenizer import export_hf
    from dwmtrain.data.tokenizer import load_tokenizer

    export_hf(sp_model, out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=load_tokenizer(sp_model).vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, num_labels=1,
        pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForSequenceClassification(cfg).save_pretrained(out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "dwmtrain" / "data" / "corpus" / "sample_sp4096.model")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.out.exists():
        sys.exit(f"make_tiny_rater: {a.out} exists")
    print(f"wrote {make_tiny_rater(a.out, a.tokenizer, a.seed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
