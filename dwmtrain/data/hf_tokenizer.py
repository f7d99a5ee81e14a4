"""The Hugging Face implementation of the tokenizer interface: a fast tokenizer from a ``tokenizer.json`` or a
directory ``AutoTokenizer`` loads (no remote code), with its own special tokens and conventions; and the training
of a byte-level BPE ``tokenizer.json`` (Llama-3 style) with the ``tokenizers`` library."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from dwmtrain.data.tokenizer_base import Tokenizer
from dwmtrain.errors import DataError, OutputExistsError
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
        self.tok, self._files = _load_fast(Path(self.path))
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
        self.backend = self.tok.backend_tokenizer
        # the BOS convention is what the tokenizer does to a text, whether or not a config names a bos_token
        plain, with_specials = self.encode("a"), self.backend.encode("a").ids
        self.bos_id = with_specials[0] if with_specials[1:] == plain and len(with_specials) == len(plain) + 1 else None

    @property
    def sha256(self) -> str:
        """Over the files it was loaded from (the tokenizer.json and, for a directory, its configs)."""
        h = hashlib.sha256()
        for f in self._files:
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
        return h.hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``tokenizers`` encodes a batch on its own thread pool; one thread means one text at a time."""
        if num_threads == 1:
            return [self.backend.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)  # as sentencepiece drops BOS / EOS

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        out = Path(out_dir)
        if out.exists():
            raise OutputExistsError(f"{out} exists; refusing to overwrite a tokenizer directory")
        with atomic_dir(out) as tmp:
            self.tok.save_pretrained(tmp)
        return out


def _load_fast(path: Path):
    """(a fast tokenizer, the files that define it) from a directory, or from a tokenizer file: the one named,
    with the configs beside it when it is that directory's ``tokenizer.json`` (they name its special tokens)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = path if path.is_dir() else path.parent if path.name == "tokenizer.json" else None
    try:
        if directory is not None and (path.is_dir() or (directory / "tokenizer_config.json").is_file()):
            tok = AutoTokenizer.from_pretrained(
                str(directory), local_files_only=True, trust_remote_code=False, use_fast=True
            )
            files = [directory / n for n in _FILES if (directory / n).is_file()]
        else:
            tok, files = PreTrainedTokenizerFast(tokenizer_file=str(path)), [path]
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line: transformers' messages run long
        raise DataError(f"tokenizer {path}: not a Hugging Face tokenizer dwmtrain can load: {msg}") from None
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise DataError(f"tokenizer {path}: {type(tok).__name__} is a slow tokenizer; give its tokenizer.json")
    return tok, files


def train_hf_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 32000) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenizer, Llama 3's special tokens and BOS convention) and
    write it as a Hugging Face tokenizer directory (``tokenizer.json`` + configs)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if out.exists():  # before hours of training, not after
        raise OutputExistsError(f"{out} exists; refusing to overwrite a tokenizer directory")
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
    with atomic_dir(out) as tmp:
        tok.save_pretrained(tmp)
    return out
