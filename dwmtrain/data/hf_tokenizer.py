"""The Hugging Face implementation of the tokenizer interface: a fast tokenizer from a ``tokenizer.json`` or a
directory ``AutoTokenizer`` loads (no remote code), with its own special tokens and conventions; and the training
of a byte-level BPE ``tokenizer.json`` (Llama-3 style) with the ``tokenizers`` library."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from dwmtrain.data.tokenizer_base import Tokenizer
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_dir

#: end-of-document tokens of the common tokenizer families, for a bare tokenizer.json that names no eos_token
EOS_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|im_end|>", "<eos>", "<|eot_id|>")
#: the special tokens ``train_hf_tokenizer`` gives a tokenizer (Llama 3's names)
BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"
_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer, its BOS convention its own: BOS is put before a document when the tokenizer
    puts it before a text (Llama 2 and 3 do, GPT-2 and Qwen do not)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.tok = _load_fast(Path(self.path))
        self.vocab_size = len(self.tok)
        eos = self.tok.eos_token_id
        if eos is None:
            eos = next((self.tok.convert_tokens_to_ids(t) for t in EOS_NAMES if t in self.tok.get_vocab()), None)
        if eos is None:
            raise DataError(
                f"tokenizer {self.path}: no end-of-document token (no eos_token, none of {', '.join(EOS_NAMES)}); "
                "give a directory whose tokenizer_config.json names eos_token"
            )
        self.eos_id = int(eos)
        bos, with_specials = self.tok.bos_token_id, self.tok("a").input_ids
        self.bos_id = int(bos) if bos is not None and with_specials[:1] == [bos] else None
        self.backend = self.tok.backend_tokenizer

    @property
    def sha256(self) -> str:
        """Over the files that define the tokenization (tokenizer.json and, where present, its configs)."""
        h, base = hashlib.sha256(), _directory(Path(self.path))
        for name in _FILES:
            f = base / name
            if f.is_file():
                h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``tokenizers`` encodes a batch on its own thread pool; one thread means one text at a time."""
        if num_threads == 1:
            return [self.backend.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        with atomic_dir(out) as tmp:
            self.tok.save_pretrained(tmp)
        return out


def _directory(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _load_fast(path: Path):
    """A fast tokenizer from a directory, or from a tokenizer.json (with the configs beside it, if any)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        if path.is_dir() or (path.parent / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(
                str(_directory(path)), local_files_only=True, trust_remote_code=False, use_fast=True
            )
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line: transformers' messages run long
        raise DataError(f"tokenizer {path}: not a Hugging Face tokenizer dwmtrain can load: {msg}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {path}: {type(tok).__name__} is a slow tokenizer; give its tokenizer.json")
    return tok


def train_hf_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 32000) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenizer, Llama 3's special tokens and BOS convention) and
    write it as a Hugging Face tokenizer directory (``tokenizer.json`` + configs)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((t for t in texts if t.strip()), trainer)
    if backend.get_vocab_size() <= 258:
        raise DataError("train-tokenizer: no text to train on")
    bos = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, clean_up_tokenization_spaces=False
    )
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return out
