"""A blend of training sources with proportions (``data.sources``): each a prepared dwmtrain directory or a
Megatron/GPT-NeoX ``.bin/.idx`` prefix, with a weight and a name.

The blend is one dataset (the sources' sequences one after another: index ``offset[s] + j`` is source s's j-th)
and one sample order over it, ``BlendOrder``: position g of the run's global stream is the g-th event of a merge in
which source s's k-th draw happens at virtual time (k + 1/2) / w_s (w normalized to sum 1; ties to the lower
source). It is Megatron's greedy blend (each sample goes to the source furthest behind its share) in closed form:
every prefix of g samples holds w_s * g of source s to within (S + 1) / 2 samples (S sources), and any position is
computed from the weights alone, without the prefix, so a resume or another world size needs only the consumed
sample count. Within a source its k-th draw is sequence ``perm_e[k mod n]`` of its epoch e = k // n, a fresh seeded
permutation per epoch (as the single-source order), so each source repeats only after all its sequences are drawn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dwmtrain.data.dataset import Sequences, TokenDataset
from dwmtrain.data.megatron import MegatronTokens, is_megatron_prefix, strip_suffix
from dwmtrain.errors import DataError
from dwmtrain.fileio import atomic_write_text, sha256_file

CHUNK = 1 << 15  #: virtual time per chunk of the blend computed at once (about as many positions)


class BlendOrder:
    """Position g of the global stream -> dataset index, for sources of ``sizes`` sequences with ``weights``."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, start: int = 0, k0: list[int] | None = None,
                 keys: list[int] | None = None):  # fmt: skip
        """``start``: the stream position this blend applies from (a changed blend, data.change_mixture); ``k0``:
        each source's draws before it, which its own draws continue; ``keys``: what seeds each source's own order
        (``source_key``: its path, so a kept source keeps its order whatever its place in a changed list; default:
        its index)."""
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()
        self.sizes, self.seed, self.start = list(sizes), seed, start
        self.k0 = np.zeros(len(w), dtype=np.int64) if k0 is None else np.asarray(k0, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.live = np.flatnonzero(self.w > 0)  # a source of weight 0 is never drawn
        self.keys = list(range(len(w))) if keys is None else list(keys)
        self._chunk: tuple[int, int, np.ndarray, np.ndarray] | None = None
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def before(self, t: float) -> np.ndarray:
        """Draws of each live source at virtual times < t."""
        return np.maximum(np.ceil(self.w[self.live] * t - 0.5), 0).astype(np.int64)

    def _start(self, c: int) -> int:
        return int(self.before(c * CHUNK).sum())

    def _events(self, c: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Chunk c of the merge: (its first position, the source and draw number of each of its positions)."""
        if self._chunk is None or self._chunk[0] != c:
            lo, hi = self.before(c * CHUNK), self.before((c + 1) * CHUNK)
            src = np.repeat(self.live, hi - lo)
            k = np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)])
            order = np.lexsort((src, (k + 0.5) / self.w[src]))  # by virtual time, ties to the lower source
            self._chunk = (c, int(lo.sum()), src[order], k[order])
        return self._chunk[1:]

    def _chunk_of(self, g: int) -> int:
        c = g // CHUNK
        while c > 0 and self._start(c) > g:
            c -= 1
        while self._start(c + 1) <= g:
            c += 1
        return c

    def draws(self, g: int) -> tuple[int, int]:
        """(source, its draw number k) at position g."""
        first, src, k = self._events(self._chunk_of(g))
        return int(src[g - first]), int(k[g - first])

    def __getitem__(self, g: int) -> int:
        if g < self.start:
            raise IndexError(f"position {g}: this blend applies from {self.start} (data_mixture.json)")
        s, k = self.draws(int(g) - self.start)
        epoch, pos = divmod(k + int(self.k0[s]), self.sizes[s])
        if self._perms.get(s, (None,))[0] != epoch:
            rng = np.random.default_rng([self.seed, self.keys[s], epoch])
            self._perms[s] = (epoch, rng.permutation(self.sizes[s]))
        return int(self.offsets[s] + self._perms[s][1][pos])

    def drawn(self, g: int) -> np.ndarray:
        """How many sequences of each source the first ``g`` positions draw."""
        if g <= 0:
            return np.zeros(len(self.w), dtype=np.int64)
        c = self._chunk_of(g - 1)
        first, src, _ = self._events(c)
        out = np.zeros(len(self.w), dtype=np.int64)
        out[self.live] = self.before(c * CHUNK)
        return out + np.bincount(src[: g - first], minlength=len(self.w))

    def first_repeat(self, s: int, before: int = 0) -> int | None:
        """The position (from this blend's start) at which source s is drawn for the (n+1)-th time, ``before`` of
        its draws made earlier (its first repeat; 0 if it already repeated); None: weight 0."""
        if self.w[s] <= 0:
            return None
        n = self.sizes[s] - before
        if n <= 0:
            return 0
        c = int((n + 0.5) / self.w[s] // CHUNK)
        while c > 0 and self.before(c * CHUNK)[np.searchsorted(self.live, s)] > n:
            c -= 1
        while self.before((c + 1) * CHUNK)[np.searchsorted(self.live, s)] <= n:
            c += 1
        first, src, k = self._events(c)
        return first + int(np.flatnonzero((src == s) & (k == n))[0])


@dataclass(frozen=True)
class Source:
    """One training source as a run reads it."""

    name: str
    path: Path
    weight: float
    kind: str  #: prepared | megatron
    data: object  #: TokenDataset or MegatronTokens

    def __len__(self) -> int:
        return len(self.data)


def open_source(name: str, path: str, weight: float, seq_len: int, vocab_size: int, verify: str) -> Source:
    """A source of ``data.sources``, checked: a prepared directory of ``seq_len`` or a Megatron prefix."""
    p = Path(path)
    if (p / "index.json").is_file():
        ds = TokenDataset(p, "train", verify=verify)
        if ds.seq_len != seq_len:
            raise DataError(f"data.sources {name}: {p} was prepared with seq_len={ds.seq_len}, not data.seq_len="
                            f"{seq_len}")  # fmt: skip
        return Source(name, p, weight, "prepared", ds)
    if is_megatron_prefix(p):
        return Source(name, p, weight, "megatron", MegatronTokens(p, seq_len, vocab_size))
    raise DataError(f"data.sources {name}: {p}: neither a prepared directory (index.json) nor a Megatron/GPT-NeoX "
                    "prefix (PREFIX.bin and PREFIX.idx)")  # fmt: skip


class MixtureDataset(Sequences):
    """The sources' sequences one after another, with the ``TokenDataset`` interface the loop and meta job use;
    each sequence's domain is its source's finer one where a prepared source has several, else the source's name."""

    def __init__(self, sources: list[Source], seq_len: int, vocab_size: int):
        self.sources, self.seq_len, self.vocab_size = sources, seq_len, vocab_size
        self.offsets = np.concatenate([[0], np.cumsum([len(s) for s in sources])]).astype(np.int64)
        self.num_sequences = int(self.offsets[-1])
        names: list[str] = []
        parts = []
        for s in sources:
            fine = s.kind == "prepared" and len(s.data.domain_names) > 1
            local = s.data.domain_names if fine else [s.name]
            ids = np.array([_intern(names, n) for n in local], dtype=np.uint16)
            parts.append(ids[s.data.domains] if fine else np.full(len(s), ids[0], dtype=np.uint16))
        self.domain_names, self.domains = names, np.concatenate(parts)
        self.path = Path(sources[0].path)  # for messages that name "the data"

    def __len__(self) -> int:
        return self.num_sequences

    def _locate(self, i: int) -> tuple[Source, int]:
        if not 0 <= i < self.num_sequences:
            raise IndexError(i)
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.sources[k], i - int(self.offsets[k])

    def __getitem__(self, i: int) -> torch.Tensor:
        s, j = self._locate(int(i))
        return s.data[j]

    def order(self, seed: int, segment: dict | None = None) -> BlendOrder:
        """The blend's order; ``segment``: the run's current one (``mixture_segment``) when the blend changed."""
        sizes, weights = [len(s) for s in self.sources], [s.weight for s in self.sources]
        keys = [source_key(s.path) for s in self.sources]
        if not segment:
            return BlendOrder(sizes, weights, seed, keys=keys)
        k0 = [segment["drawn_before"].get(str(Path(s.path)), 0) for s in self.sources]
        return BlendOrder(sizes, weights, seed, segment["from_sample"], k0, keys)


def source_key(path) -> int:
    """What seeds a source's own order: its path (the same in every process and whatever its place in the list)."""
    return int.from_bytes(hashlib.sha256(str(Path(path)).encode()).digest()[:8], "little")


def _intern(names: list[str], n: str) -> int:
    if n not in names:
        names.append(n)
    return names.index(n)


@dataclass(frozen=True)
class SourcePlan:
    """What a run of ``samples`` draws of one source."""

    name: str
    sequences: int
    share: float
    drawn: int
    first_repeat_step: int | None  #: the optimizer step (1-based) that first draws a sequence again, None: never

    @property
    def epochs(self) -> float:
        return self.drawn / self.sequences

    def line(self, seq_len: int) -> str:
        rep = f"repeats from step {self.first_repeat_step}" if self.first_repeat_step else "no repeat"
        return (f"{self.name}: weight {self.share:.3g}, {self.sequences:,} sequences ({self.sequences * seq_len:,} "
                f"tokens), draws {self.drawn:,} = {self.epochs:.2f} epochs, {rep}")  # fmt: skip


def source_plans(data: MixtureDataset, order: BlendOrder, steps: int, global_batch: int) -> list[SourcePlan]:
    end = steps * global_batch
    drawn = order.drawn(max(end - order.start, 0)) + order.k0
    out = []
    for i, s in enumerate(data.sources):
        rep = order.first_repeat(i, int(order.k0[i]))
        rep = None if rep is None else rep + order.start
        step = rep // global_batch + 1 if rep is not None and rep < end else None
        out.append(SourcePlan(s.name, len(s), float(order.w[i]), int(drawn[i]), step))
    return out


def open_training_data(d, vocab_size: int, tok_sha: str | None = None):
    """The run's training data (``d``: the DataConfig): train_data's prepared split, or data.sources' blend, every
    source checked (its sequence length; a prepared one's tokenizer against ``tok_sha`` where given)."""
    if not d.sources:
        return TokenDataset(d.train_data, "train", verify=d.verify)
    srcs = [open_source(s.name, s.path, s.weight, d.seq_len, vocab_size, d.verify) for s in d.sources]
    for s in srcs:
        if tok_sha and s.kind == "prepared" and s.data.index["tokenizer_sha256"] != tok_sha:
            raise DataError(f"data.sources {s.name}: {s.path} was tokenized with {s.data.index['tokenizer']}, not "
                            f"data.tokenizer={d.tokenizer} (their sha256 differ)")  # fmt: skip
    return MixtureDataset(srcs, d.seq_len, vocab_size)


def mixture_segment(path: Path, d, step: int, consumed: int, ident: str = "") -> dict | None:
    """The blend segment a run at ``step`` (``consumed`` samples) continues, from RUN_DIR/data_mixture.json: the one
    that covers ``consumed`` (later ones, of a rollback to an older checkpoint, are dropped), or a new one when the
    blend changed (data.change_mixture: the checkpoint allowed it), each source's draws so far carried over by its
    path (``ident``: ``data_identity(d)``, where the caller has it already). Rank 0's work (it writes); None for a
    single prepared directory."""
    if not d.sources:
        return None
    ident = ident or data_identity(d)
    srcs = [{"name": s.name, "path": str(Path(s.path)), "weight": s.weight} for s in d.sources]
    segs = json.loads(path.read_text())["segments"] if path.is_file() and consumed > 0 else []
    segs = [g for g in segs if g["from_sample"] <= consumed]
    if segs and segs[-1]["identity"] == ident:
        new, segs = segs[-1], segs[:-1]
    else:
        new = {"from_step": step, "from_sample": consumed, "identity": ident, "sources": srcs, "drawn_before": {}}
    if segs and new["from_sample"] == consumed:  # what the last blend drew of each source up to here
        last = segs[-1]
        counts = BlendOrder([1] * len(last["sources"]), [s["weight"] for s in last["sources"]], 0).drawn(
            consumed - last["from_sample"]
        )
        new["drawn_before"] = dict(last["drawn_before"])  # a dropped source's count is kept, for its return
        for s, c in zip(last["sources"], counts):
            new["drawn_before"][s["path"]] = new["drawn_before"].get(s["path"], 0) + int(c)
    atomic_write_text(path, json.dumps({"segments": [*segs, new]}, indent=1))
    return new


def current_segment(path: Path) -> dict | None:
    """The blend segment a run is in (what ``mixture_segment`` last wrote); None: none recorded."""
    return json.loads(path.read_text())["segments"][-1] if path.is_file() else None


def data_identity(d) -> str:
    """What a resume compares of the training data: train_data's index, or every source's path, weight, name and
    index (a changed weight or source is another stream)."""
    if not d.sources:
        return sha256_file(Path(d.train_data) / "index.json")
    return hashlib.sha256(json.dumps([_source_identity(s) for s in d.sources], sort_keys=True).encode()).hexdigest()


def _source_identity(s) -> dict:
    p = Path(s.path)
    idx = p / "index.json" if (p / "index.json").is_file() else strip_suffix(p).with_name(strip_suffix(p).name + ".idx")
    return {
        "name": s.name,
        "path": str(p),
        "weight": s.weight,
        "index_sha256": sha256_file(idx) if idx.is_file() else "",
    }
