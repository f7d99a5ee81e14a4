"""In-training validation: LAMBADA targets or the held-out split, and their loss / accuracy over all ranks
(the trainer at stage ends, the meta job for its reward)."""

from __future__ import annotations

import torch

from dwmtrain.data.dataset import TokenDataset
from dwmtrain.data.lambada import collate_cloze, lm_batch, load_lambada
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.distributed import all_reduce_
from dwmtrain.errors import DataError
from dwmtrain.models.loss import per_example_loss


class ValidationSet:
    """``batches(n, bs, rank, world)`` gives the same split of validation data on every call."""

    def __init__(
        self,
        source: str,
        lambada_path: str,
        tokenizer_path: str,
        train_data: str,
        seq_len: int,
        heldout_data: str = "",
    ):
        self.source = source
        if source == "lambada":
            self.items = load_lambada(lambada_path, load_tokenizer(tokenizer_path), seq_len)
            self.n = len(self.items)
            self.where = f"{lambada_path} (LAMBADA-style cloze, target tokens)"
        else:
            self.heldout = TokenDataset(heldout_data or train_data, "heldout")
            self.n = len(self.heldout)
            self.where = f"the heldout split of {heldout_data or train_data}"
        if self.n == 0:
            raise DataError(f"validation source {source!r} (data.val_source) is empty")

    def describe(self) -> str:
        return f"{self.source}: {self.n} items from {self.where}"

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if self.source == "lambada":
            return collate_cloze([self.items[i % self.n] for i in indices])
        return lm_batch(self.heldout.batch([i % self.n for i in indices]))

    def batches(self, n_batches: int, bs: int, rank: int = 0, world: int = 1, offset: int = 0):
        """Rank r takes every world-th batch; wraps around a small set. Same count on every rank."""
        for b in range(n_batches):
            start = offset + (b * world + rank) * bs
            yield self.batch(list(range(start, start + bs)))


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


def validation_set(cfg) -> ValidationSet:
    d = cfg.data
    return ValidationSet(d.val_source, d.lambada_path, d.tokenizer, d.train_data, d.seq_len, d.heldout_data)
