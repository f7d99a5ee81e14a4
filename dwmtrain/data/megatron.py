"""Megatron-LM / GPT-NeoX token files (``PREFIX.bin`` + ``PREFIX.idx``), read in place: memory-mapped, no
conversion.

The ``.idx`` layout (Megatron-Core's ``IndexedDataset``, the one GPT-NeoX writes too), little-endian::

    b"MMIDIDX\\x00\\x00"  version <Q (1)  dtype code <B  sequence count <Q  document count <Q
    sequence lengths int32[sequence count]  sequence byte offsets int64[sequence count]
    document start indices int64[document count]

The ``.bin`` holds the sequences' tokens back to back. dwmtrain packs them the way it packs its own documents: the
token stream in file order, cut into consecutive windows of ``seq_len`` (a window runs across document edges; the
last partial window is dropped and counted), the tokens exactly as written (the writer's EOD, e.g. Megatron's
``--append-eod``, stays where it is; no BOS or EOS is added).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dwmtrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
#: Megatron-Core's DType codes (megatron/core/datasets/indexed_dataset.py)
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_DTYPES = (1, 3, 4, 5, 8)  #: integer codes: the float ones are not token files
_HEAD = len(MAGIC) + 8 + 1 + 8 + 8


def is_megatron_prefix(path: str | Path) -> bool:
    """Whether ``path`` names a ``.bin``/``.idx`` pair (by its prefix, or by either file)."""
    p = strip_suffix(Path(path))
    return p.with_name(p.name + ".idx").exists() or p.with_name(p.name + ".bin").exists()


def strip_suffix(p: Path) -> Path:
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


@dataclass(frozen=True)
class IdxHeader:
    """What a ``.idx`` says of its ``.bin``."""

    dtype: np.dtype
    sequences: int
    documents: int
    tokens: int  #: the sum of the sequence lengths


def read_index(idx: Path, bin_size: int) -> IdxHeader:
    """The header of ``idx``, checked against itself and against its ``.bin`` of ``bin_size`` bytes: magic, version,
    dtype, counts, lengths, contiguous offsets, document indices and the file lengths. A DataError names the file
    and what disagrees."""
    size = idx.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_HEAD)
    if len(head) < _HEAD or head[: len(MAGIC)] != MAGIC:
        raise DataError(f"{idx}: not a Megatron/GPT-NeoX index (no MMIDIDX header)")
    (version,) = struct.unpack_from("<Q", head, len(MAGIC))
    code, n, docs = struct.unpack_from("<BQQ", head, len(MAGIC) + 8)
    if version != 1:
        raise DataError(f"{idx}: index version {version}, this reader knows version 1")
    if code not in TOKEN_DTYPES:
        raise DataError(f"{idx}: dtype code {code} is not an integer token type (codes {TOKEN_DTYPES})")
    want = _HEAD + n * 4 + n * 8 + docs * 8
    if size != want:  # a multimodal index (sequence modes) is longer: not token data either
        raise DataError(f"{idx}: {size} bytes, its header ({n} sequences, {docs} documents) needs {want}")
    arrays = np.memmap(idx, np.uint8, "r") if size else np.zeros(0, np.uint8)
    lengths = arrays[_HEAD : _HEAD + 4 * n].view(np.int32).astype(np.int64)
    offsets = arrays[_HEAD + 4 * n : _HEAD + 12 * n].view(np.int64)
    doc_idx = arrays[_HEAD + 12 * n : want].view(np.int64)
    dtype = np.dtype(DTYPES[code])
    if (lengths < 0).any():
        raise DataError(f"{idx}: sequence {int(np.argmax(lengths < 0))} has a negative length")
    tokens = int(lengths.sum())
    if bin_size != tokens * dtype.itemsize:
        raise DataError(f"{idx.with_suffix('.bin')}: {bin_size} bytes, its index says {tokens} {dtype.name} tokens = "
                        f"{tokens * dtype.itemsize} bytes (truncated, or another file's index)")  # fmt: skip
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * dtype.itemsize
    if n and not np.array_equal(offsets, starts):
        bad = int(np.argmax(offsets != starts))
        raise DataError(f"{idx}: sequence {bad} starts at byte {int(offsets[bad])}, not {int(starts[bad])}: the "
                        "sequences are not back to back (not a file the writers write)")  # fmt: skip
    if docs and (doc_idx[0] != 0 or doc_idx[-1] != n or (np.diff(doc_idx) < 0).any()):
        raise DataError(f"{idx}: document indices must rise from 0 to the sequence count {n}")
    return IdxHeader(dtype, n, max(docs - 1, 0), tokens)


class MegatronTokens:
    """A Megatron/GPT-NeoX token file as packed sequences of ``seq_len``: ``len``, ``[j]`` -> [seq_len] int64."""

    def __init__(self, prefix: str | Path, seq_len: int, vocab_size: int):
        p = strip_suffix(Path(prefix))
        self.idx, self.bin = p.with_name(p.name + ".idx"), p.with_name(p.name + ".bin")
        for f in (self.idx, self.bin):
            if not f.is_file():
                raise DataError(f"{f}: missing (a Megatron source names PREFIX of PREFIX.bin and PREFIX.idx)")
        self.header = read_index(self.idx, self.bin.stat().st_size)
        self.seq_len, self.vocab_size = seq_len, vocab_size
        self.num_sequences = self.header.tokens // seq_len
        self.dropped_tokens = self.header.tokens - self.num_sequences * seq_len  #: the last partial window
        if self.num_sequences == 0:
            raise DataError(f"{self.bin}: {self.header.tokens} tokens, fewer than one sequence of {seq_len}")
        self._mm = np.memmap(self.bin, dtype=self.header.dtype, mode="r", shape=(self.header.tokens,))

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self.num_sequences:
            raise IndexError(j)
        seq = np.asarray(self._mm[j * self.seq_len : (j + 1) * self.seq_len], dtype=np.int64)
        if seq.min(initial=0) < 0 or seq.max(initial=0) >= self.vocab_size:
            bad = int(seq.max()) if seq.max(initial=0) >= self.vocab_size else int(seq.min())
            raise DataError(f"{self.bin}: sequence {j} holds token id {bad}, outside the vocabulary of "
                            f"{self.vocab_size} (another tokenizer's file?)")  # fmt: skip
        return torch.from_numpy(seq)
