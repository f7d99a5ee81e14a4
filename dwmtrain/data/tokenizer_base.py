"""The tokenizer interface (``Tokenizer``): what data preparation, training, validation, export and analysis ask
of a tokenizer. Implementations: ``data.sentencepiece_tokenizer``; ``data.tokenizer.load_tokenizer`` picks one."""

from __future__ import annotations

import abc
import os
from pathlib import Path


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
