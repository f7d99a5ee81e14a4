"""LAMBADA (lambada_openai JSONL) and held-out validation batches, scored on target tokens only."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from dwmtrain.data.tokenizer import Tokenizer
from dwmtrain.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class ClozeItem:
    """Context ids (with BOS) and the target ids of the last word."""

    context: list[int]
    target: list[int]


def split_last_word(text: str) -> tuple[str, str]:
    """lambada_openai convention: context = all but the last word, target = " " + last word."""
    text = text.rstrip()
    cut = text.rfind(" ")
    if cut <= 0:
        raise ValueError("needs at least two words")
    return text[:cut], text[cut:]


def load_lambada(path: str, tokenizer: Tokenizer, max_len: int) -> list[ClozeItem]:
    """Read ``{"text": ...}`` lines; a bad line is an error naming file and line.

    Each item fits ``max_len`` tokens: the context is cut from the left; an item whose target alone
    leaves no room for a context token is skipped, counted and reported on stderr.
    """
    items, too_long = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from None
            text = rec.get("text") if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{path}:{lineno}: missing or empty 'text'")
            try:
                ctx, tgt = split_last_word(text)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            ctx_ids = tokenizer.encode(ctx)
            full = tokenizer.encode(ctx + tgt)
            # the target's tokens are what the whole text adds to the context (as lm-eval scores it)
            tgt_ids = full[len(ctx_ids) :] if full[: len(ctx_ids)] == ctx_ids else tokenizer.encode(tgt.strip())
            ctx_ids = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + ctx_ids
            keep = max_len - len(tgt_ids)
            if keep < 1:  # ctx_ids[-keep:] with keep <= 0 would keep (nearly) the whole context
                too_long.append(lineno)
                continue
            items.append(ClozeItem(ctx_ids[-keep:], tgt_ids))
    if too_long:
        log.warning(
            f"{path}: skipped {len(too_long)} items whose target needs {max_len} tokens or more "
            f"(lines {', '.join(map(str, too_long[:10]))}{', ...' if len(too_long) > 10 else ''})"
        )
    if not items:
        raise DataError(f"{path}: no items" + (f" fit {max_len} tokens" if too_long else ""))
    return items


def collate_cloze(items: list[ClozeItem], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask; labels are -100 except on target tokens."""
    seqs = [it.context + it.target for it in items]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    for i, (it, s) in enumerate(zip(items, seqs)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(it.context) : len(s)] = torch.tensor(it.target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_batch(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed [B, T] batch scored on every next token (held-out validation, training)."""
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()}
