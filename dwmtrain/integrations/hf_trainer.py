"""``DWMTrainer``: a Hugging Face ``Trainer`` whose training loss is the DWM-weighted one, and which refits the DWM at
stage boundaries from its own model and optimizer (``dwmtrain.meta_update``), on every process at once.

    trainer = DWMTrainer(model=model, args=args, train_dataset=train, data_collator=collator,
                         boundaries=[0.2, 0.4, 0.6, 0.8], reward=target_examples, dwm_tokenizer="tokenizer/")
    trainer.train()                          # stage 1 uniform; a DWM from each boundary on
    trainer.train(resume_from_checkpoint=True)   # the checkpoint's DWM again (checkpoint-N/dwm.safetensors)

Evaluation is the Trainer's own (unweighted) loss. The meta-update's micro-batches are drawn from ``train_dataset``
by a seeded order of its own per stage (this process's share under DDP), never from the training dataloader.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from dwmtrain.api import DWM, TokenizerId, meta_update, tokenizer_identity, weighted_lm_loss
from dwmtrain.checkpoint.dwm_file import meta_path
from dwmtrain.config.schema import DWMConfig, MetaConfig
from dwmtrain.errors import DWMInputError, DWMTrainError
from dwmtrain.models.weights import weight_stats

log = logging.getLogger(__name__)

CHECKPOINT_DWM = "dwm.safetensors"  #: the DWM a checkpoint was saved with, inside checkpoint-N/


class DWMTrainer(Trainer):
    """A ``transformers.Trainer`` whose training loss is mean_i w_i L_i, the weights w of each micro-batch by a
    frozen DWM (uniform while there is none: stage 1), refit at each of ``boundaries``.

    ``dwm``: a DWM (or its file) to weigh from step 0 (a DWM fitted in a dwmtrain run, say); ``boundaries``: the
    optimizer steps (ints) or fractions of training (floats in (0, 1)) after which the DWM is refit;
    ``reward``: the reward set the refits lower the loss of (``dwmtrain.meta_update``'s); ``meta``/``settings``:
    the meta-update's and a fresh DWM's settings; ``dwm_tokenizer``: the tokenizer's directory or file, checked
    against every DWM and recorded in the fitted ones (default: ``processing_class``, when it was loaded from a
    local directory); ``loss_chunk``: > 0 computes the loss ``loss_chunk`` tokens at a time without the full logits.
    Fitted DWMs are written to ``OUTPUT_DIR/dwm/stageK.safetensors`` and into each checkpoint.
    """

    def __init__(self, *args, dwm: DWM | str | os.PathLike | None = None, boundaries=(), reward=None,
                 meta: MetaConfig | None = None, settings: DWMConfig | None = None, dwm_tokenizer=None,
                 loss_chunk: int = 0, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # a micro-batch's mean: the Trainer divides by the accumulation steps
        self.boundaries, self.reward, self.meta = _checked_boundaries(boundaries), reward, meta or MetaConfig()
        if self.boundaries and reward is None:
            raise DWMInputError("reward: boundaries refit the DWM to lower the loss of a reward set; give one")
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if sharded and (self.boundaries or loss_chunk):
            raise DWMInputError(f"{'boundaries' if self.boundaries else 'loss_chunk'}: reads the whole model (the LM "
                                "head) on every process: DDP or one process; sharded (DeepSpeed, FSDP), fit in a "
                                "dwmtrain run and weigh here by dwm=FILE")  # fmt: skip
        self.settings, self.loss_chunk = settings or DWMConfig(), loss_chunk
        # the tokenizer's identity, its files hashed once: every DWM is checked against it, every fit records it
        if dwm_tokenizer:
            self.tokenizer_id = tokenizer_identity(dwm_tokenizer)
        else:
            self.tokenizer_id = _local_tokenizer(self.processing_class)
        self.dwm: DWM | None = None
        self.stats = {"steps": 0, "max": 0.0, "ess": 0.0, "short": 0, "stage": 1}
        if dwm is not None:
            self.use_dwm(dwm if isinstance(dwm, DWM) else DWM.load(dwm))
        self.add_callback(_Boundaries(self))

    @property
    def dwm_dir(self) -> Path:
        return Path(self.args.output_dir) / "dwm"

    def use_dwm(self, dwm: DWM | None) -> None:
        """Weigh from now on with ``dwm`` (None: uniform), after checking it fits this model, its tokenizer and the
        per-device batch."""
        if dwm is not None:
            vocab = self.model.config.vocab_size
            if dwm.arch.vocab_size != vocab:
                raise DWMInputError(f"dwm: {dwm.where} embeds {dwm.arch.vocab_size} token ids, the model's "
                                    f"vocabulary is {vocab}")  # fmt: skip
            if self.tokenizer_id is not None:
                dwm.check_tokenizer(self.tokenizer_id)
            if 0 < self.args.per_device_train_batch_size < dwm.micro_batch_size:
                raise DWMInputError(f"per_device_train_batch_size={self.args.per_device_train_batch_size}: {dwm.where}"
                                    f" was fitted on micro-batches of {dwm.micro_batch_size}")  # fmt: skip
            dwm.model.to(self.args.device)
        self.dwm = dwm

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Training: the weighted loss of the micro-batch. Evaluation: the Trainer's own loss."""
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "labels")}
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        weights = self._weights(ids, mask)
        loss, _ = weighted_lm_loss(model, ids, weights, labels=inputs.get("labels"), attention_mask=mask,
                                   chunk=self.loss_chunk, **rest)  # fmt: skip
        return loss

    def _weights(self, ids: torch.Tensor, mask):
        """The micro-batch's weights: uniform in stage 1 and (counted) for a batch shorter than the DWM was fitted
        on (a dataloader's last); the DWM itself where it reads the LM's forward (resolved in that forward)."""
        self.stats["stage"] = (self.dwm.stage or 2) if self.dwm is not None else 1  # the stage this step trains in
        if self.dwm is None or ids.shape[0] < self.dwm.micro_batch_size:
            self.stats["short"] += self.dwm is not None
            return torch.ones(ids.shape[0], device=ids.device)
        if self.dwm.reads_lm:
            return self.dwm
        w = self.dwm(ids, mask)
        s = weight_stats(w)
        self.stats.update(steps=self.stats["steps"] + 1, max=self.stats["max"] + s["max"],
                          ess=self.stats["ess"] + s["ess"])  # fmt: skip
        return w

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's record, with the stage, the DWM's mean max weight and ESS since the last record, and the
        micro-batches weighed uniformly for being short."""
        if "loss" in logs:
            n = self.stats["steps"]
            logs["dwm_stage"] = self.stats["stage"]
            if n:
                logs.update(dwm_weight_max=self.stats["max"] / n, dwm_weight_ess=self.stats["ess"] / n)
            logs["dwm_short_batches"] = self.stats["short"]
            self.stats.update(steps=0, max=0.0, ess=0.0)
        super().log(logs, start_time)

    def refit(self) -> DWM:
        """The next stage's DWM from the model and optimizer as they are now (collective)."""
        stage = (self.dwm.stage or 1) + 1 if self.dwm is not None else 2
        out = self.dwm_dir / f"stage{stage}.safetensors"
        new = meta_update(self.model, self._meta_batches(stage), self.reward, dwm=self.dwm, optimizer=self.optimizer,
                          meta=self.meta, settings=self.settings, lookahead_lr=self.lr_scheduler.get_last_lr()[0],
                          tokenizer=self.tokenizer_id, out=out, stage=stage, lm_step=self.state.global_step,
                          seed=self.args.seed)  # fmt: skip
        if self.args.process_index == 0:
            log.info(f"step {self.state.global_step}: stage {stage}'s DWM fitted ({new.meta['meta_steps']} meta-steps)"
                     f" -> {out}")  # fmt: skip
        self.use_dwm(new)
        return new

    def _meta_batches(self, stage: int) -> torch.utils.data.DataLoader:
        """This process's share of ``train_dataset`` in a seeded order of the stage's own, as micro-batches."""
        ds = self.train_dataset
        if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            raise DWMInputError("train_dataset: the meta-update draws micro-batches from it by index (a map-style "
                                "dataset); an iterable dataset cannot be")  # fmt: skip
        g = torch.Generator().manual_seed(self.args.seed * 1009 + stage)
        mine = torch.randperm(len(ds), generator=g)[self.args.process_index :: self.args.world_size].tolist()
        keep = ("input_ids", "attention_mask", "labels")

        def collate(items):
            return self.data_collator([{k: v for k, v in it.items() if k in keep} for it in items])

        return torch.utils.data.DataLoader(torch.utils.data.Subset(ds, mine), self.args.per_device_train_batch_size,
                                           collate_fn=collate, drop_last=True)  # fmt: skip

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, the DWM written into it first (a checkpoint whose trainer state is complete
        holds its DWM)."""
        if self.dwm is not None and self.args.should_save:
            self._save_dwm(
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
        super()._save_checkpoint(model, trial)

    def _save_dwm(self, dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        if self.dwm.path and Path(self.dwm.path).is_file():  # tensors, then the sidecar that marks it complete
            shutil.copyfile(self.dwm.path, dest / CHECKPOINT_DWM)
            shutil.copyfile(meta_path(self.dwm.path), meta_path(dest / CHECKPOINT_DWM))
        else:
            DWM(self.dwm.model, self.dwm.meta).save(dest / CHECKPOINT_DWM)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """The Trainer's ``train``; resumed from a checkpoint, with the DWM that checkpoint was saved with (none:
        uniform, it was saved in stage 1)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the Trainer says why
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            saved = Path(resume_from_checkpoint) / CHECKPOINT_DWM
            self.use_dwm(DWM.load(saved) if saved.is_file() else None)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class _Boundaries(TrainerCallback):
    """Refits the trainer's DWM after the optimizer steps of its boundaries (fractions resolved once the Trainer
    knows its steps)."""

    def __init__(self, trainer: DWMTrainer):
        self.trainer, self.steps = trainer, []

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        self.steps = sorted(b if isinstance(b, int) else max(1, round(b * state.max_steps)) for b in t.boundaries)
        if len(set(self.steps)) != len(self.steps) or any(s >= state.max_steps for s in self.steps):
            raise DWMInputError(f"boundaries={list(t.boundaries)}: steps {self.steps} of {state.max_steps}: each must "
                                "fall before the last step, no two on the same step")  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.trainer.refit()


def _checked_boundaries(boundaries) -> list:
    out = list(boundaries)
    for b in out:
        if isinstance(b, bool) or not (isinstance(b, int) and b > 0 or isinstance(b, float) and 0 < b < 1):
            raise DWMInputError(f"boundaries: {b!r} is neither an optimizer step (an int > 0) nor a fraction of "
                                "training (a float in (0, 1))")  # fmt: skip
    return out


def _local_tokenizer(processing_class) -> TokenizerId | None:
    """The identity of the tokenizer the Trainer was given, when its files identify it (loaded from a local
    directory)."""
    if processing_class is None:
        return None
    try:
        return tokenizer_identity(processing_class)
    except DWMTrainError:  # a tokenizer of the hub cache: its files cannot be named, nothing to check against
        return None
