"""QuRating (Wettig et al. 2024, "QuRating: Selecting High-Quality Data for Training Language Models").

Each document has a quality score: a number already in the record (``--score-field meta.quality.x``, e.g.
QuRatedPajama's ratings) or the output of a local rater model (``--rater DIR``: any Hugging Face
sequence-classification/regression model; QuRater-1.3B's four criteria are four labels). Documents are
then sampled without replacement with probability ∝ exp(score / τ) (Gumbel top-k on score / τ, τ = 2.0 by
default as in the paper); τ = 0 is plain top-k. ``--normalize`` z-scores the pool's scores first, like
QuRating's ``select_subset.py --normalize``; the score written to ``meta.selection`` is always the raw one.
"""

from __future__ import annotations

import inspect
import math
import os

import numpy as np

from dwmtrain.data.readers import get_field
from dwmtrain.errors import DataError
from dwmtrain.select.base import Scorer, sample_order


def score_of(rec: dict, field: str) -> float | str:
    """The record's numeric score at ``field``, or the skip reason ('missing score field', 'non-numeric score')."""
    try:
        v = get_field(rec, field)
    except KeyError:
        return "missing score field"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "non-numeric score"
    return float(v)


def load_rater(path: str, device: str = "cpu"):
    """A local sequence-classification model and its tokenizer, with one pad id shared by both."""
    if not os.path.isdir(path):
        raise DataError(f"--rater {path}: not a directory (a local Hugging Face model directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DataError(f"--rater {path}: no config.json (save the model there with save_pretrained)")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        msg = " ".join(str(e).split())[:300] or type(e).__name__  # one line: transformers' messages run long
        raise DataError(f"--rater {path}: not a loadable sequence-classification model: {msg}") from None
    # Batches are padded, and a decoder rater pools the last non-pad token by config.pad_token_id:
    # the tokenizer must pad with exactly that id. The model's own pad id wins; else the tokenizer's;
    # else EOS (or UNK), which a document never contains since no EOS is added when scoring.
    pad = model.config.pad_token_id
    if pad is not None:
        if tok.pad_token_id != pad:
            tok.pad_token = tok.convert_ids_to_tokens(int(pad))
    else:
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        if tok.pad_token_id is None:
            raise DataError(f"--rater {path}: the tokenizer has no pad, eos or unk token to pad batches with")
        model.config.pad_token_id = tok.pad_token_id
    model.eval().to(device)
    return tok, model


def rater_scores(
    texts: list[str],
    tok,
    model,
    label: int | None = None,
    max_length: int = 512,
    batch_size: int = 16,
) -> np.ndarray:
    """The rater's logit (the single one, or label ``label``) of each text, truncated to ``max_length`` tokens."""
    n_labels = model.config.num_labels
    if label is None:
        if n_labels != 1:
            raise DataError(f"the rater has {n_labels} labels; pick the score with --rater-label K")
        label = 0
    if not 0 <= label < n_labels:
        raise DataError(f"--rater-label {label}: the rater has labels 0..{n_labels - 1}")
    return rater_logits(texts, tok, model, max_length, batch_size)[:, label]


def rater_logits(texts: list[str], tok, model, max_length: int = 512, batch_size: int = 16) -> np.ndarray:
    """Every label's logit of each text [N, labels], truncated to ``max_length`` tokens."""
    import torch

    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos:
        max_length = min(max_length, max_pos)
    accepted = set(inspect.signature(model.forward).parameters)
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    out = np.empty((len(texts), model.config.num_labels), dtype=np.float64)
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            ids = order[s : s + batch_size]
            enc = tok(
                [texts[i] for i in ids], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in accepted}
            out[ids] = model(**enc).logits.float().cpu().numpy()
    return out


def rater_label_names(model, names: list[str] | None = None) -> list[str]:
    """One name per rater label: ``names`` if given (as many as labels), else the model's id2label."""
    n = model.config.num_labels
    if names:
        if len(names) != n:
            raise DataError(f"--rater-labels names {len(names)} labels, the rater has {n}")
        return list(names)
    id2label = getattr(model.config, "id2label", None) or {}
    return [str(id2label.get(i, f"LABEL_{i}")) for i in range(n)]


class QuRatingScorer(Scorer):
    """Scores from a record field or a rater model; sampling ∝ exp(score / τ)."""

    def __init__(
        self,
        score_field: str | None = None,
        rater: str | None = None,
        rater_label: int | None = None,
        rater_max_length: int = 512,
        rater_batch_size: int = 16,
        rater_device: str = "auto",
        temperature: float = 2.0,
        normalize: bool = False,
        missing: str = "error",
    ):
        if bool(score_field) == bool(rater):
            raise DataError("qurating needs exactly one of --score-field and --rater")
        if missing not in ("error", "skip"):
            raise DataError(f"--missing {missing}: one of error, skip")
        if temperature < 0 or not math.isfinite(temperature):
            raise DataError(f"--temperature {temperature}: must be a finite number >= 0")
        if rater_max_length < 1 or rater_batch_size < 1:
            raise DataError("--rater-max-length and --rater-batch-size must be >= 1")
        self.score_field, self.rater, self.rater_label = score_field, rater, rater_label
        self.rater_max_length, self.rater_batch_size = rater_max_length, rater_batch_size
        self.rater_device = rater_device
        self.temperature, self.normalize, self.missing = temperature, normalize, missing
        self._tok = self._model = None

    def prepare(self) -> None:
        if self.rater:
            device = self.rater_device
            if device == "auto":
                import torch

                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.rater_device = device
            self._tok, self._model = load_rater(self.rater, device)
            n_labels = self._model.config.num_labels
            if self.rater_label is None and n_labels != 1:
                raise DataError(f"--rater {self.rater} has {n_labels} labels; pick the score with --rater-label K")
            if self.rater_label is not None and not 0 <= self.rater_label < n_labels:
                raise DataError(f"--rater-label {self.rater_label}: the rater has labels 0..{n_labels - 1}")

    def check(self, rec: dict, where: str) -> str | None:
        if not self.score_field:
            return None
        s = score_of(rec, self.score_field)
        if not isinstance(s, str):
            return None
        if self.missing == "skip":
            return s
        what = "no field" if s == "missing score field" else "not a finite number in field"
        raise DataError(f"{where}: {what} '{self.score_field}' (pass --missing skip to skip such records)")

    def score_batch(self, recs, texts, domains) -> np.ndarray:
        if self.score_field:
            return np.array([score_of(r, self.score_field) for r in recs], dtype=np.float64)
        return rater_scores(
            texts, self._tok, self._model, self.rater_label, self.rater_max_length, self.rater_batch_size
        )

    def order(self, scores, seed) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if self.normalize and len(s) > 1 and s.std() > 0:
            s = (s - s.mean()) / s.std()
        return sample_order(s, self.temperature, seed)

    def scan_parameters(self) -> dict:
        p = self.parameters()
        for k in ("temperature", "normalize", "rater_device"):  # the ranking's, or not the scores'
            p.pop(k, None)
        return p

    def parameters(self) -> dict:
        p = {"temperature": self.temperature, "normalize": self.normalize}
        if self.score_field:
            p.update(score_field=self.score_field, missing=self.missing)
        else:
            p.update(
                rater=os.path.abspath(self.rater),
                rater_label=self.rater_label,
                rater_max_length=self.rater_max_length,
                rater_device=self.rater_device,
            )
        return p
