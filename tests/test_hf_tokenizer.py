"""Hugging Face tokenizers behind the tokenizer interface: parity with AutoTokenizer, the BOS convention shared by
prepared data, in-training validation and lm-eval's requests, and the refusal of a DWM of another tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dwmtrain.data.hf_tokenizer import BOS_TOKEN, EOS_TOKEN, train_hf_tokenizer
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.errors import DataError

from .conftest import LAMBADA, SP_MODEL, corpus_records, write_jsonl
from .test_tokenizer import UNSEEN


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("hftok") / "tok"
    return train_hf_tokenizer((r["text"] for r in corpus_records(300)), out, vocab_size=1000)


@pytest.mark.parametrize("form", ["directory", "tokenizer.json"])
def test_ids_equal_autotokenizers_on_the_corpus_and_unseen_text(hf_tok, form):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_tok if form == "directory" else hf_tok / "tokenizer.json")
    auto = AutoTokenizer.from_pretrained(hf_tok)
    assert tok.vocab_size == len(auto) == 1000
    assert (tok.bos_id, tok.eos_id) == (auto.convert_tokens_to_ids(BOS_TOKEN), auto.convert_tokens_to_ids(EOS_TOKEN))
    texts = [r["text"] for r in corpus_records(400)[300:]] + UNSEEN
    assert tok.encode_batch(texts) == tok.encode_batch(texts, num_threads=1)
    for text in texts:
        ids = tok.encode(text)
        assert ids == auto(text, add_special_tokens=False)["input_ids"]
        assert auto(text)["input_ids"] == [tok.bos_id, *ids]  # Llama 3's convention: BOS before a text
        assert tok.decode(ids) == text  # byte-level BPE round-trips every byte


def test_a_tokenizer_without_a_bos_convention_puts_none_before_documents(tmp_path, hf_tok):
    backend = json.loads((hf_tok / "tokenizer.json").read_text())
    backend["post_processor"] = None  # as GPT-2 and Qwen: no BOS before a text
    (tmp_path / "tokenizer.json").write_text(json.dumps(backend))
    tok = load_tokenizer(tmp_path / "tokenizer.json")  # a bare tokenizer.json: EOS found by its name
    assert tok.bos_id is None and tok.document("hi") == [*tok.encode("hi"), tok.eos_id]
    assert tok.specials_per_document == 1


def test_prepared_documents_validation_and_lm_evals_requests_agree_on_bos(tmp_path, hf_tok):
    """Every document of the prepared data starts with BOS, as every LAMBADA item and lm-eval's own request does."""
    from dwmtrain.data.dataset import TokenDataset
    from dwmtrain.data.lambada import load_lambada
    from dwmtrain.data.prepare import prepare_data

    recs = corpus_records(40)
    prepare_data([str(write_jsonl(tmp_path / "a.jsonl", recs))], str(hf_tok), str(tmp_path / "d"), seq_len=32,
                 workers=1, heldout_fraction=0.0, progress=False)  # fmt: skip
    tok = load_tokenizer(hf_tok)
    stream = np.concatenate([np.array(tok.document(r["text"])) for r in recs])
    ds = TokenDataset(tmp_path / "d")
    got = np.concatenate([ds[i].numpy() for i in range(len(ds))])
    assert (got == stream[: len(got)]).all() and got[0] == tok.bos_id
    assert ds.index["bos_id"] == tok.bos_id and ds.index["tokenizer_sha256"] == tok.sha256
    items = load_lambada(str(LAMBADA), tok, 1 << 20)  # no item cut to fit (cutting drops BOS, as lm-eval's does)
    assert all(it.context[0] == tok.bos_id for it in items)
    _assert_lm_eval_builds_the_same_requests(tmp_path / "model", hf_tok, items[:20])


@pytest.mark.parametrize("kind", ["sentencepiece", "hf"])
def test_lambada_items_are_lm_evals_own_requests(tmp_path, hf_tok, kind):
    """The target keeps lm-eval's convention for the space before the last word, with either tokenizer."""
    from dwmtrain.data.lambada import load_lambada

    path = SP_MODEL if kind == "sentencepiece" else hf_tok
    tok = load_tokenizer(path)
    hf_dir = tok.export_hf(tmp_path / "tok") if kind == "sentencepiece" else hf_tok
    _assert_lm_eval_builds_the_same_requests(tmp_path / "model", hf_dir, load_lambada(str(LAMBADA), tok, 1 << 20)[:30])


def _assert_lm_eval_builds_the_same_requests(model_dir, tok_dir, items) -> None:
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    auto = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(auto), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    auto.save_pretrained(model_dir)
    lm = HFLM(pretrained=str(model_dir), device="cpu", batch_size=1)
    texts = [json.loads(x)["text"] for x in LAMBADA.read_text().splitlines() if x.strip()]
    for it, text in zip(items, texts):
        words = text.split(" ")  # lambada_openai's doc_to_text and doc_to_target
        ctx_enc, cont_enc = lm._encode_pair(" ".join(words[:-1]), " " + words[-1])  # what lm-eval scores
        assert (it.context, it.target) == (ctx_enc, cont_enc), text[-80:]


def test_a_dwm_of_another_tokenizer_is_refused_naming_both(tmp_path, hf_tok):
    from dwmtrain.checkpoint.dwm_file import DWMFileError, check_dwm_tokenizer, read_dwm_meta, save_dwm
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch

    sp = load_tokenizer(SP_MODEL)
    path = tmp_path / "w.safetensors"
    save_dwm(DataWeightingModel(DWMArch("tiny", 512, 32)), path, stage=2, lm_step=0, tokenizer=str(SP_MODEL),
             tokenizer_sha256=sp.sha256)  # fmt: skip
    meta = read_dwm_meta(path)
    check_dwm_tokenizer(meta, path, str(SP_MODEL), sp.sha256)  # the same tokenizer: fine
    with pytest.raises(DWMFileError, match=r"fitted with tokenizer .*sample_sp4096.model .*data.tokenizer=.*tok"):
        check_dwm_tokenizer(meta, path, str(hf_tok), load_tokenizer(hf_tok).sha256)


def test_a_tokenizer_path_that_is_not_one_is_a_clear_error(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=r"x.txt: not a tokenizer dwmtrain reads"):
        load_tokenizer(tmp_path / "x.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer.json in it"):
        load_tokenizer(tmp_path / "empty")
