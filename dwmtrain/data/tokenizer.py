"""The tokenizer interface that data preparation, training, validation, export and analysis all go through.

``load_tokenizer(path)`` picks the implementation from the file: a sentencepiece ``.model`` today
(``data.sentencepiece_tokenizer``). A tokenizer is identified by its file's sha256, which every prepared dataset
and checkpoint records.
"""

from __future__ import annotations

import abc
import functools
import os
from pathlib import Path

from dwmtrain.errors import ConfigError, DataError


class Tokenizer(abc.ABC):
    """Text to the LM's token ids and back."""

    path: str  #: the file it was loaded from
    vocab_size: int  #: ids are 0..vocab_size-1
    bos_id: int | None  #: put before a context (validation cloze items); None if the tokenizer has none
    eos_id: int  #: appended after every document by prepare-data

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without special tokens."""

    @abc.abstractmethod
    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """``encode`` of each text, on ``num_threads`` threads (-1: all cores; 1 inside a worker process)."""

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``."""

    @abc.abstractmethod
    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        """A Hugging Face tokenizer directory (``AutoTokenizer``) that tokenizes exactly like this one."""


@functools.lru_cache(maxsize=8)
def _load(path: str, version: tuple) -> Tokenizer:
    if path.endswith(".model"):
        from dwmtrain.data.sentencepiece_tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer(path)
    raise DataError(f"tokenizer {path}: not a tokenizer dwmtrain reads (a sentencepiece .model)")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in ``path`` (loaded once per process while the file is unchanged)."""
    path = str(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"tokenizer {path}: not found") from None
    return _load(path, (st.st_mtime_ns, st.st_size))


def check_vocab(tokenizer_vocab: int, model_vocab: int, tokenizer_path: str, field: str = "model.vocab_size"):
    """Refuse a tokenizer whose vocabulary does not match the model's embedding table."""
    if tokenizer_vocab != model_vocab:
        raise ConfigError(
            f"tokenizer {tokenizer_path} has {tokenizer_vocab} pieces but {field}={model_vocab}; "
            f"set {field}={tokenizer_vocab} or use the tokenizer the model was built for"
        )
