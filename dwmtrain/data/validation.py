"""In-training validation: LAMBADA targets, the held-out split or the user's target set (``data.val_source``),
split once into a reward part (the meta job's only data) and a report part (what validation reports); their loss
/ accuracy over all ranks."""

from __future__ import annotations

import json

import torch

from dwmtrain.data.dataset import TokenDataset
from dwmtrain.data.lambada import ClozeItem, collate_cloze, lm_batch, load_lambada
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.distributed import all_reduce_
from dwmtrain.errors import DataError
from dwmtrain.models.loss import per_example_loss

REWARD, REPORT = "reward", "report"  #: the meta job's part of a validation source; what validation reports
ALL = "all"  #: a set only reported (data.report_sets), never a reward: all of it


def split_ids(keys: list, reward_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(reward ids, report ids) of the examples whose contents are ``keys`` (hashable): a seeded permutation of the
    distinct keys, its first ``round(distinct * reward_fraction)`` the reward part, so that equal examples (a
    corpus repeats some texts) fall on the same side. Each list sorted; the same in every process for the same
    arguments."""
    distinct = list(dict.fromkeys(keys))
    order = torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed)).tolist()
    reward = {distinct[j] for j in order[: round(len(distinct) * reward_fraction)]}
    ids = range(len(keys))
    return [i for i in ids if keys[i] in reward], [i for i in ids if keys[i] not in reward]


def document_groups(docs: list[int], keys: list) -> list[int]:
    """Per example (of document ``docs[i]``, contents ``keys[i]``): the smallest document of its group, the
    documents joined by any example they share (union-find)."""
    parent: dict[int, int] = {}

    def root(d: int) -> int:
        while parent.setdefault(d, d) != d:
            parent[d] = d = parent[parent[d]]
        return d

    first: dict = {}
    for d, k in zip(docs, keys):
        a, b = root(d), root(first.setdefault(k, d))
        parent[max(a, b)] = min(a, b)
    return [root(d) for d in docs]


class ValidationSet:
    """One validation source's examples (``data.val_source``), and the part of them this reader sees: the meta job
    the reward part, validation the report part; they never share an example. ``batches(n, bs, rank, world)``
    gives the same batches of the part on every call."""

    def __init__(self, source: str, cfg_data, part: str, needs: dict[str, int] | None = None, cache=None):
        self.source, self.part = source, part
        self.heldout, self.items, self.docs = None, None, None
        if source == "lambada":
            self.items = load_lambada(cfg_data.lambada_path, load_tokenizer(cfg_data.tokenizer), cfg_data.seq_len)
            self.where = f"{cfg_data.lambada_path} (LAMBADA-style cloze, target tokens)"
        elif source == "target":
            from dwmtrain.data.target import load_target

            t = load_target(cfg_data, cache)
            self.items = [ClozeItem(e[:1], e[1:]) for e in t.examples]  # every token after the first is scored
            self.docs, self.where = t.docs, t.where
        else:
            self.heldout = TokenDataset(cfg_data.heldout_data or cfg_data.train_data, "heldout")
            self.where = f"the heldout split of {cfg_data.heldout_data or cfg_data.train_data}"
        self.total = len(self.items) if self.items is not None else len(self.heldout)
        self.split = {} if part == ALL else self._split(cfg_data, needs)
        self.ids = self.split[part] if self.split else list(range(self.total))
        self.n = len(self.ids)
        if self.n == 0:
            raise DataError(f"validation set {source!r} ({self.where}) is empty")

    def _split(self, cfg_data, needs: dict[str, int]) -> dict[str, list[int]]:
        """{REWARD: ids, REPORT: ids}, each part as big as ``needs`` says (else an error saying how many in all)."""
        keys = self._keys()
        reward, report = split_ids(keys, cfg_data.reward_fraction, cfg_data.split_seed)
        split = {REWARD: reward, REPORT: report}
        for name, ids in split.items():
            if len(ids) < needs[name]:
                raise DataError(
                    f"validation source {self.source!r} ({self.where}): {self.total} examples split "
                    f"{len(reward)} reward / {len(report)} report (data.reward_fraction={cfg_data.reward_fraction}); "
                    f"the {name} part needs at least {needs[name]} ({_NEEDS[name]}): "
                    f"{_least(needs, cfg_data.reward_fraction)} examples in all" + self._by_document(keys, split)
                )
        return split

    def _by_document(self, keys: list, split: dict[str, list[int]]) -> str:
        """For a target: how its documents fell (the split is by document group, so examples alone are no guide)."""
        if self.docs is None:
            return ""
        n = {part: len({keys[i] for i in ids}) for part, ids in split.items()}
        return (f"; split by document: {len(set(keys))} document groups, {n[REWARD]} reward / {n[REPORT]} report "
                "(each part needs a document; documents sharing text are one group): add documents")  # fmt: skip

    def _keys(self) -> list:
        """What the split is keyed by: a target example by its document's group (documents that share an example,
        a licence header or a copied text, are one group: no reported example equals a rewarded one, and a
        document's examples stay together), a cloze item by its tokens, a packed held-out sequence by its place
        (reading them all would cost a pass)."""
        if self.items is None:
            return list(range(self.total))
        tokens = [(tuple(it.context), tuple(it.target)) for it in self.items]
        return tokens if self.docs is None else document_groups(self.docs, tokens)

    def describe(self) -> str:
        return f"{self.source}: {self.n} of {self.total} items ({self.part} part) from {self.where}"

    def record(self, fraction: float, seed: int) -> dict:
        """What the run's split is (``validation/split.json``): checked on every start and by every meta job."""
        import hashlib

        # an item by its tokens; a held-out sequence by its place in shards named by their sha256 (index.json)
        shards = [] if self.items is not None else [s.get("sha256") for s in self.heldout.shards]

        def digest(ids: list[int]) -> str:
            h = hashlib.sha256(json.dumps(shards).encode())
            for i in ids:
                ex = self.items[i] if self.items is not None else None
                h.update(json.dumps([ex.context, ex.target] if ex else [i]).encode())
            return h.hexdigest()

        where = self.where.split(" (")[0]  # said, not compared: the same data may be named by another path
        docs = {} if self.docs is None else {"documents": len(set(self.docs))}
        return {"source": self.source, "where": where, "examples": self.total, **docs, "reward_fraction": fraction,
                "split_seed": seed, **{f"{k}_examples": len(v) for k, v in self.split.items()},
                **{f"{k}_sha256": digest(v) for k, v in self.split.items()}}  # fmt: skip

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        ids = [self.ids[i % self.n] for i in indices]
        if self.items is not None:
            return collate_cloze([self.items[i] for i in ids])
        return lm_batch(self.heldout.batch(ids))

    def chunked(self, ids, bs: int):
        """The examples ``ids`` in batches of ``bs`` (the last one shorter), in order."""
        ids = list(ids)
        for i in range(0, len(ids), bs):
            yield self.batch(ids[i : i + bs])

    def batches(self, n_batches: int, bs: int, rank: int = 0, world: int = 1, offset: int = 0):
        """Rank r takes every world-th batch; wraps around a small part. Same count on every rank."""
        for b in range(n_batches):
            start = offset + (b * world + rank) * bs
            yield self.batch(list(range(start, start + bs)))


_NEEDS = {REWARD: "one meta validation batch, meta.val_batch_size", REPORT: "one validation micro-batch"}


def _least(needs: dict[str, int], fraction: float) -> int:
    """The fewest examples whose split gives each part what it needs (at this reward fraction)."""
    import math

    return max(math.ceil(needs[REWARD] / fraction), math.ceil(needs[REPORT] / (1 - fraction)))


@torch.no_grad()
def validation_metrics(
    forward, val: ValidationSet, n_batches: int, bs: int, rank: int, world: int, device, counted: bool = True
) -> dict:
    """Mean per-example loss and accuracy (exact match of all target tokens) over all ranks (collective);
    ``rank``/``world``: the data-parallel ones; ``counted``: whether this rank's examples enter the sums (one rank
    of each tensor-parallel group)."""
    tot = torch.zeros(3, dtype=torch.float64, device=device)
    for b in val.batches(n_batches, bs, rank, world):
        b = {k: v.to(device) for k, v in b.items()}
        loss, hit = per_example_loss(forward(b), b["labels"])
        tot += torch.stack([loss.sum().double(), hit.sum().double(), torch.tensor(len(loss), device=device)])
    all_reduce_(tot if counted else tot.zero_())
    return {
        "val_loss": (tot[0] / tot[2]).item(),
        "val_acc": (tot[1] / tot[2]).item(),
        "val_examples": int(tot[2]),
    }


def validation_set(cfg, part: str, cache=None) -> ValidationSet:
    """The run's validation source, ``part`` of it (REWARD: the meta job's; REPORT: what validation reports);
    ``cache``: where a target set's tokens are kept (the run directory's ``validation/``)."""
    needs = {REWARD: cfg.meta.val_batch_size, REPORT: cfg.deepspeed.micro_batch_size}
    return ValidationSet(cfg.data.val_source, cfg.data, part, needs, cache)


def report_sets(cfg, cache=None) -> dict[str, ValidationSet]:
    """What validation reports, by name: the validation source's report part first, then each of
    ``data.report_sets`` whole (a set that is not the reward source has nothing to hold out)."""
    sets = {cfg.data.val_source: validation_set(cfg, REPORT, cache)}
    for name in cfg.data.report_sets:
        if name not in sets:
            sets[name] = ValidationSet(name, cfg.data, ALL, cache=cache)
    return sets


def check_split(path, record: dict, trained: bool) -> None:
    """Record the run's split at ``path`` while nothing was trained on it (``trained``: a checkpoint exists); after
    that, refuse a start whose split differs (another target, fraction or seed: a new run), naming the first field
    that does."""
    import logging
    from pathlib import Path

    from dwmtrain.errors import ResumeError
    from dwmtrain.fileio import atomic_write_text, read_json_object

    path = Path(path)
    if not trained or not path.exists():
        if trained:  # a run from before the split: from here on it reports on the report part only
            logging.getLogger(__name__).warning(
                f"{path}: recorded now, in a run that has checkpoints already: its validation reports on the "
                f"report part only ({record['report_examples']} of {record['examples']}) from this start on, and "
                f"the meta job reads the reward part only"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1))
        return
    old = read_json_object(path)
    if old is None:
        raise DataError(f"{path}: not the JSON object a run's validation split record is; it was written at the run's "
                        "first start (restore it, or start a new run directory)")  # fmt: skip
    if "documents" in record and "documents" not in old and old.get("source") == "target":
        raise ResumeError(f"{path}: recorded by a dwmtrain that took one example per target document (its first "
                          "data.seq_len tokens); this one cuts documents into examples and splits them by document: "
                          "a new run directory, or the earlier dwmtrain, continues it")  # fmt: skip
    for k, v in record.items():
        if k != "where" and old.get(k) != v:
            raise ResumeError(f"{path}: this run's validation split has {k}={old.get(k)!r}, this start would have "
                              f"{v!r}: a run keeps its target and split (data.target, data.val_source, "
                              "data.reward_fraction, data.split_seed); another one is a new run directory")  # fmt: skip


def open_validation(cfg, rd, part: str) -> ValidationSet | dict[str, ValidationSet]:
    """Collective: the meta job's reward part of the validation source (``part`` REWARD), or the sets validation
    reports (REPORT: ``report_sets``). Rank 0 first tokenizes a target set (the other ranks then read its tokens)
    and records the split at the run's first start, or refuses a start whose split differs; its error reaches
    every rank, before any training or meta-step."""
    from dwmtrain.distributed import all_gather_object, run_on_rank0
    from dwmtrain.errors import DWMTrainError

    def opened():
        return validation_set(cfg, part, rd.validation_dir) if part == REWARD else report_sets(cfg, rd.validation_dir)

    kept = []  # rank 0's sets (not sent: the other ranks open their own)

    def first() -> None:
        kept.append(opened())  # a target set tokenized here, once, into the run directory
        v = kept[0] if part == REWARD else next(iter(kept[0].values()))
        check_split(rd.validation_split, v.record(cfg.data.reward_fraction, cfg.data.split_seed),
                    trained=bool(rd.complete_tags()))  # fmt: skip

    run_on_rank0(first)
    sets, why = (kept or [None])[0], ""
    if not kept:
        try:  # from the cache rank 0 wrote (or, with node-local run directories, this node's own)
            sets = opened()
        except DWMTrainError as e:
            why = f"rank {_rank()}: {e}"
    failed = [w for w in all_gather_object(why) if w]  # every rank fails alike: none waits in a collective
    if failed:
        raise DataError(failed[0])
    return sets


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
