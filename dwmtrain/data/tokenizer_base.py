"""The tokenizer interface (``Tokenizer``): what data preparation, training, validation, export and analysis ask
of a tokenizer. Implementations: ``data.sentencepiece_tokenizer``, ``data.hf_tokenizer``;
``data.tokenizer.load_tokenizer`` picks one.

Documents follow the tokenizer's own convention at their edges: ``bos_id`` before each (when the tokenizer puts
one before a text, as Llama's do; None otherwise), ``eos_id`` after each. Prepared training sequences, the
in-training validation items and lm-eval's requests (which encode with the tokenizer's special tokens) so agree.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path


class Tokenizer(abc.ABC):
    """Text to the LM's token ids and back."""

    path: str  #: the file or directory it was loaded from
    vocab_size: int  #: ids are 0..vocab_size-1
    bos_id: int | None  #: put before every document and validation context; None if the convention has none
    eos_id: int  #: appended after every document by prepare-data

    @property
    def sha256(self) -> str:
        """What identifies the tokenizer (recorded by prepared data, checkpoints and DWM files)."""
        from dwmtrain.fileio import sha256_file

        return sha256_file(self.path)

    @property
    def specials_per_document(self) -> int:
        """Tokens prepare-data adds to each document: EOS, and BOS where the convention has one."""
        return 1 + (self.bos_id is not None)

    def document(self, text: str) -> list[int]:
        """A document's ids as prepare-data writes them."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text) + [self.eos_id]

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
