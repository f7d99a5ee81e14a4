"""The sentencepiece implementation of the tokenizer interface: Llama-style BPE training (special ids 0/1/2,
byte fallback) and an exact Hugging Face export."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from dwmtrain.data.tokenizer_base import Tokenizer
from dwmtrain.errors import DataError, OutputExistsError
from dwmtrain.fileio import atomic_dir
from dwmtrain.procs import usable_cpus

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(
    texts: Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int = 32000,
    max_sentence_length: int = 1 << 16,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 0,  #: 0: the CPUs the scheduler gave this process
) -> Path:
    """Train a Llama-style sentencepiece BPE model with byte fallback; returns the ``.model`` path.

    Settings follow Llama-2's tokenizer: identity normalization (no NFKC, so text round-trips), digits
    split, a dummy-prefix space, whitespace kept as is, byte fallback for anything unseen,
    ``<unk>=0, <s>=1, </s>=2`` and no pad id.
    """
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        n = 0
        for t in texts:
            # sentencepiece reads one sentence per line; keep documents' own line structure.
            for line in t.split("\n"):
                if line.strip():
                    f.write(line + "\n")
                    n += 1
        tmp = f.name
    if n == 0:
        os.unlink(tmp)
        raise DataError("train-tokenizer: no text to train on")
    try:
        spm.SentencePieceTrainer.train(
            input=tmp,
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or usable_cpus(),
            minloglevel=2,
            hard_vocab_limit=True,
        )
    finally:
        os.unlink(tmp)
    return prefix.with_suffix(".model")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (``.model``) with the ids a Llama LM expects."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        if not Path(self.path).is_file():
            raise DataError(f"tokenizer {self.path}: not found")
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        if (self.sp.bos_id(), self.sp.eos_id()) != (BOS_ID, EOS_ID):
            raise DataError(
                f"tokenizer {self.path}: bos/eos ids are {self.sp.bos_id()}/{self.sp.eos_id()}, "
                f"a Llama model expects {BOS_ID}/{EOS_ID}"
            )
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = BOS_ID, EOS_ID

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        """sentencepiece encodes a list on ``num_threads`` threads (-1: all cores)."""
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def export_hf(self, out_dir: str | os.PathLike) -> Path:
        return export_hf(self.path, out_dir)


def _hf_backend(sp_model: str):
    """A ``tokenizers.Tokenizer`` equal to the sentencepiece BPE model.

    Built from the model proto directly: transformers 5.x's ``LlamaTokenizer(vocab_file=...)`` yields
    empty ids for a plain sentencepiece model, and its BPE converter path is broken, so we assemble
    what LlamaConverter would: the piece vocabulary, merges ordered by piece score (sentencepiece
    merges the highest-scored pair first), byte fallback, and sentencepiece's own normalization
    (prepend the dummy-prefix "▁", spaces become "▁"; identity otherwise).
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, normalizers
    from tokenizers.models import BPE
    from transformers.tokenization_utils_base import generate_merges

    sp = spm.SentencePieceProcessor(model_file=sp_model)
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i))}
    specials = {sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    merges = generate_merges(vocab, scores, skip_tokens=specials)
    backend = HFTokenizer(
        BPE(vocab, merges, unk_token=sp.id_to_piece(UNK_ID), fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return backend


def export_hf(sp_model: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write a Hugging Face tokenizer directory that tokenizes exactly like ``sp_model``."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    sp_model = str(sp_model)
    out = Path(out_dir)
    if out.exists():
        raise OutputExistsError(f"{out} exists; refusing to overwrite a tokenizer directory")
    backend = _hf_backend(sp_model)
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    # <s> in front, as LlamaTokenizer does; encode(add_special_tokens=False) gives sentencepiece's ids.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 30,
        # "<s>" typed in a document is text to sentencepiece; keep it text here too.
        split_special_tokens=True,
    )
    with atomic_dir(out) as tmp:  # a failed export leaves no half-written directory
        tok.save_pretrained(tmp)
        (tmp / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
        (tmp / "dwmtrain_tokenizer.json").write_text(json.dumps({"source": os.path.abspath(sp_model)}))
    return out
