"""Loading a tokenizer: ``load_tokenizer(path)`` picks the implementation of the tokenizer interface
(``data.tokenizer_base.Tokenizer``) from a plain table: a sentencepiece ``.model``, or a Hugging Face
``tokenizer.json`` or directory. A tokenizer is identified by its ``sha256``, which every prepared dataset,
checkpoint and DWM file records.
"""

from __future__ import annotations

import functools
import os

from dwmtrain.data.hf_tokenizer import HFTokenizer
from dwmtrain.data.sentencepiece_tokenizer import SentencePieceTokenizer
from dwmtrain.data.tokenizer_base import Tokenizer
from dwmtrain.errors import ConfigError, DataError

#: what a path names: the implementation that reads it
IMPLEMENTATIONS: dict[str, type[Tokenizer]] = {
    ".model": SentencePieceTokenizer,  # a sentencepiece model
    ".json": HFTokenizer,  # a Hugging Face tokenizer.json
    "/": HFTokenizer,  # a directory AutoTokenizer loads
}


@functools.lru_cache(maxsize=8)
def _load(path: str, version: tuple) -> Tokenizer:
    kind = "/" if os.path.isdir(path) else os.path.splitext(path)[1]
    if kind not in IMPLEMENTATIONS:
        known = "a sentencepiece .model, a Hugging Face tokenizer.json or a directory with one"
        raise DataError(f"tokenizer {path}: not a tokenizer dwmtrain reads ({known})")
    try:
        return IMPLEMENTATIONS[kind](path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - sentencepiece and tokenizers say a bad file in their own types
        first = " ".join(str(e).split())[:200]
        raise DataError(
            f"tokenizer {path}: cannot be read as {kind_name(kind)} ({type(e).__name__}: {first})"
        ) from None


def kind_name(kind: str) -> str:
    return {".model": "a sentencepiece model", ".json": "a Hugging Face tokenizer.json"}.get(
        kind, "a tokenizer directory"
    )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer in ``path`` (loaded once per process while the file is unchanged)."""
    path = str(path)
    try:
        st = os.stat(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)
    except FileNotFoundError:
        what = "no tokenizer.json in it (a fast tokenizer is needed)" if os.path.isdir(path) else "not found"
        raise DataError(f"tokenizer {path}: {what}") from None
    return _load(path, (st.st_mtime_ns, st.st_size))


def check_vocab(
    tokenizer_vocab: int, model_vocab: int, tokenizer_path: str, field: str = "model.vocab_size", padded: bool = False
):
    """Refuse a tokenizer whose vocabulary does not match the model's embedding table. ``padded``: a model from a
    Hugging Face config may have more rows than its tokenizer has pieces (Qwen pads its table); fewer never fit."""
    if padded and tokenizer_vocab <= model_vocab:
        return
    if tokenizer_vocab != model_vocab:
        raise ConfigError(
            f"tokenizer {tokenizer_path} has {tokenizer_vocab} pieces but {field}={model_vocab}; "
            f"set {field}={tokenizer_vocab} or use the tokenizer the model was built for"
        )
