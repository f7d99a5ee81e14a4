"""Memory-mapped token shards and a deterministic, shardable, resumable sample order."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dwmtrain.data.prepare import FORMAT
from dwmtrain.errors import DataError
from dwmtrain.fileio import sha256_file


class Sequences:
    """What the loop, the meta job and the analyses read of training data: ``ds[i]`` a [seq_len] int64 tensor, and
    each sequence's domain (``domains``: ids into ``domain_names``)."""

    domains: np.ndarray
    domain_names: list[str]

    def __getitem__(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, indices: list[int]) -> torch.Tensor:
        """[len(indices), seq_len] int64."""
        return torch.stack([self[i] for i in indices])

    def domain(self, i: int) -> str:
        return self.domain_names[int(self.domains[i])]

    def domain_ids(self, indices: list[int]) -> torch.Tensor:
        """The domain ids (into ``domain_names``) of sequences ``indices``."""
        return torch.from_numpy(self.domains[np.asarray(indices, dtype=np.int64)].astype(np.int64))


class TokenDataset(Sequences):
    """One split of a ``prepare-data`` directory: ``ds[i]`` is a [seq_len] int64 tensor."""

    def __init__(self, path: str | os.PathLike, split: str = "train", verify: str = "size"):
        self.path = Path(path)
        ipath = self.path / "index.json"
        try:
            self.index = json.loads(ipath.read_text())
        except FileNotFoundError:
            raise DataError(f"{ipath}: not found (run `dwmtrain prepare-data` first)") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{ipath}:{e.lineno}: corrupted index: {e.msg}") from None
        if self.index.get("format") != FORMAT:
            raise DataError(f"{ipath}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        if split not in self.index["splits"]:
            raise DataError(f"{ipath}: no split {split!r} (have {list(self.index['splits'])})")
        info = self.index["splits"][split]
        self.seq_len = int(self.index["seq_len"])
        self.vocab_size = int(self.index["vocab_size"])
        self.dtype = np.dtype(self.index["dtype"])
        self.domain_names = list(self.index["domains"])
        self._shards, self._starts = [], []
        self.shards = list(info["shards"])  #: the split's shards as index.json lists them (file, sha256, ...)
        start = 0
        for s in info["shards"]:
            f = self.path / s["file"]
            n = int(s["num_sequences"])
            want = n * self.seq_len * self.dtype.itemsize
            have = f.stat().st_size if f.exists() else -1
            if have < 0:
                raise DataError(f"shard {f}: missing")
            if have != want:
                raise DataError(
                    f"shard {f}: {have} bytes, index says {n} sequences x {self.seq_len} tokens = {want} bytes "
                    "(truncated or corrupted)"
                )
            if verify == "sha256" and sha256_file(f) != s["sha256"]:
                raise DataError(f"shard {f}: sha256 mismatch with {ipath} (corrupted)")
            self._shards.append((f, np.memmap(f, dtype=self.dtype, mode="r", shape=(n, self.seq_len))))
            self._starts.append(start)
            start += n
        self.num_sequences = start
        dfile = self.path / info["domain_file"]
        self.domains = np.fromfile(dfile, dtype=np.uint16) if dfile.exists() else None
        if self.domains is None or len(self.domains) != self.num_sequences:
            raise DataError(f"{dfile}: missing or does not list one domain per sequence")
        if len(self.domains) and int(self.domains.max()) >= len(self.domain_names):
            raise DataError(f"{dfile}: domain id {int(self.domains.max())}, but {ipath} names "
                            f"{len(self.domain_names)} domains")  # fmt: skip

    def __len__(self) -> int:
        return self.num_sequences

    def _locate(self, i: int):
        if not 0 <= i < self.num_sequences:
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return k, i - self._starts[k]

    def __getitem__(self, i: int) -> torch.Tensor:
        k, j = self._locate(int(i))
        f, mm = self._shards[k]
        seq = np.asarray(mm[j], dtype=np.int64)
        if seq.max(initial=0) >= self.vocab_size:
            raise DataError(
                f"shard {f}: sequence {j} holds token id {int(seq.max())} >= vocab {self.vocab_size} (corrupted)"
            )
        return torch.from_numpy(seq)

    def order(self, seed: int, segment: dict | None = None) -> GlobalOrder:
        """The run's sample order over this split (a blend has its own: ``data.mixture``; ``segment`` is its)."""
        return GlobalOrder(len(self), seed)


class GlobalOrder:
    """The run's global sample order: a fresh seeded permutation of the dataset per epoch.

    Sample ``g`` of the run (0, 1, 2, ...) is ``order[g]``. Every rank computes the same order;
    nothing is stored, so resuming from a consumed-sample count needs only that count.
    """

    def __init__(self, num_sequences: int, seed: int):
        if num_sequences <= 0:
            raise ValueError("empty dataset")
        self.n, self.seed = num_sequences, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, g: int) -> int:
        epoch, pos = divmod(int(g), self.n)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._epoch = rng.permutation(self.n), epoch
        return int(self._perm[pos])


def rank_micro_batches(
    order: GlobalOrder, start: int, rank: int, world: int, micro: int
) -> Iterator[tuple[int, list[int]]]:
    """Yield (global position of the micro-batch, dataset indices) for one data-parallel rank.

    The global stream from ``start`` is cut into blocks of ``world*micro``; rank r takes the r-th
    ``micro`` of each block. For any world size dividing the batch, the ranks together consume
    exactly positions start, start+1, ... so resuming at ``start`` = consumed samples reproduces
    what an uninterrupted run would yield next.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    g = start
    while True:
        base = g + rank * micro
        yield base, [order[base + j] for j in range(micro)]
        g += world * micro
