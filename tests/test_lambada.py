import json

import pytest
import torch

from dwmtrain.data.lambada import collate_cloze, load_lambada, split_last_word
from dwmtrain.data.prepare import DataError
from dwmtrain.data.sentencepiece_tokenizer import BOS_ID
from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.models.loss import per_example_loss

from .conftest import LAMBADA


def test_split_last_word():
    assert split_last_word("the cat sat on the mat") == ("the cat sat on the", " mat")


def test_loader_targets_are_the_last_word(sp_model):
    tok = load_tokenizer(sp_model)
    items = load_lambada(str(LAMBADA), tok, max_len=256)
    assert len(items) > 100
    first = json.loads(LAMBADA.read_text().splitlines()[0])["text"]
    ctx, word = split_last_word(first)
    assert tok.decode(items[0].target).strip() == word.strip()
    assert items[0].context[0] == BOS_ID


def test_loss_counts_target_tokens_only():
    from dwmtrain.data.lambada import ClozeItem

    items = [ClozeItem([1, 5, 6, 7], [8, 9]), ClozeItem([1, 5], [4])]
    b = collate_cloze(items)
    assert b["labels"].tolist() == [[-100, -100, -100, -100, 8, 9], [-100, -100, 4, -100, -100, -100]]
    V = 12
    logits = torch.randn(2, 6, V)
    loss, hit = per_example_loss(logits, b["labels"])
    lp = logits.log_softmax(-1)
    want0 = -(lp[0, 3, 8] + lp[0, 4, 9]) / 2
    want1 = -lp[1, 1, 4]
    assert torch.allclose(loss, torch.stack([want0, want1]))
    # changing logits off the target positions changes nothing
    logits2 = logits.clone()
    logits2[0, :3] += 5
    logits2[1, 2:] -= 3
    assert torch.allclose(per_example_loss(logits2, b["labels"])[0], loss)
    perfect = torch.full((2, 6, V), -10.0)
    perfect[0, 3, 8] = perfect[0, 4, 9] = perfect[1, 1, 4] = 10.0
    assert per_example_loss(perfect, b["labels"])[1].tolist() == [True, True]


def test_bad_lambada_line(tmp_path, sp_model):
    p = tmp_path / "l.jsonl"
    p.write_text('{"text": "a fine sentence here"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"l.jsonl:2: missing or empty 'text'"):
        load_lambada(str(p), load_tokenizer(sp_model), 64)


def test_bundled_corpus_is_real_and_multidomain():
    from .conftest import CORPUS, corpus_records

    recs = corpus_records()
    domains = {r["meta"]["redpajama_set_name"] for r in recs}
    assert len(domains) >= 5 and len(recs) > 1000
    assert (CORPUS / "sample.jsonl.zst").stat().st_size > 1_000_000
    # real text: mostly dictionary-like words, not generated filler
    words = " ".join(r["text"] for r in recs[:200]).split()
    assert len(set(words)) > 5000
    held = {json.loads(x)["text"] for x in LAMBADA.read_text().splitlines()}
    train_text = "\n".join(r["text"] for r in recs)
    assert sum(h[:200] in train_text for h in held) == 0  # cloze passages are held out


def test_items_fit_a_tiny_maximum_length_and_overlong_targets_are_counted(tmp_path, sp_model, caplog):
    tok = load_tokenizer(sp_model)
    path = tmp_path / "l.jsonl"
    long_word = "Pneumonoultramicroscopicsilicovolcanoconiosis"
    path.write_text(
        json.dumps({"text": "a fairly long context of several words and then the word house"}) + "\n"
        + json.dumps({"text": f"short context {long_word}"}) + "\n"
    )  # fmt: skip
    n_target = len(load_lambada(str(path), tok, max_len=1000)[1].target)
    assert n_target > len(load_lambada(str(path), tok, max_len=1000)[0].target) + 1
    items = load_lambada(str(path), tok, max_len=n_target)  # no room for any context token of line 2
    assert len(items) == 1 and len(items[0].context) + len(items[0].target) <= n_target
    assert "skipped 1 items" in caplog.text and "(lines 2)" in caplog.text
    for max_len in (n_target + 1, n_target + 3):
        for it in load_lambada(str(path), tok, max_len=max_len):
            assert len(it.context) + len(it.target) <= max_len and len(it.context) >= 1
