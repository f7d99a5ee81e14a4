"""Loading a tokenizer: ``load_tokenizer(path)`` picks the implementation of the tokenizer interface
(``data.tokenizer_base.Tokenizer``) from a plain table: a sentencepiece ``.model`` today. A tokenizer is
identified by its file's sha256, which every prepared dataset and checkpoint records.
"""

from __future__ import annotations

import functools
import os

from dwmtrain.data.sentencepiece_tokenizer import SentencePieceTokenizer
from dwmtrain.data.tokenizer_base import Tokenizer
from dwmtrain.errors import ConfigError, DataError

#: file suffix: the implementation that reads it
IMPLEMENTATIONS: dict[str, type[Tokenizer]] = {".model": SentencePieceTokenizer}


@functools.lru_cache(maxsize=8)
def _load(path: str, version: tuple) -> Tokenizer:
    for suffix, impl in IMPLEMENTATIONS.items():
        if path.endswith(suffix):
            return impl(path)
    known = ", ".join(f"{s} ({i.__name__})" for s, i in IMPLEMENTATIONS.items())
    raise DataError(f"tokenizer {path}: not a tokenizer dwmtrain reads ({known})")


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
