import pytest

from dwmtrain.data.sentencepiece_tokenizer import BOS_ID, EOS_ID, export_hf, train_tokenizer
from dwmtrain.data.tokenizer import check_vocab, load_tokenizer

from .conftest import corpus_records

UNSEEN = [
    "Grüße aus Köln — naïve café, Ærøskøbing, İstanbul, Ελληνικά, русский текст, 中文字符, 日本語のテキスト, 한국어",
    "Emoji 🤖🧪🚀 and symbols ∑∫√∞ ≠ ≤ ⊕ ℝ ½ ² µ",
    "Digits 0123456789 3.14159 -2.5e-10 1,234,567 0xFFEE 2026-11-22",
    "many    spaces   between\twords\t\tand tabs",
    "line one\nline two\n\n\nafter blank lines\r\nwindows ending",
    "   leading spaces and trailing ones   ",
    "def f(x: int) -> dict[str, list[int]]:\n    return {'a': [x ** 2 for _ in range(3)]}  # code\n",
    '#include <stdio.h>\nint main(){printf("%d\\n", 42);}',
    "<s> looks special </s> but is <unk> text",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
    "",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    texts = [r["text"] for r in corpus_records(300)]
    model = train_tokenizer(texts, d / "sp", vocab_size=600)
    return model, export_hf(model, d / "hf")


def test_special_ids_and_vocab(trained):
    tok = load_tokenizer(trained[0])
    assert tok.vocab_size == 600
    assert (tok.sp.unk_id(), tok.sp.bos_id(), tok.sp.eos_id(), tok.sp.pad_id()) == (0, BOS_ID, EOS_ID, -1)
    # byte fallback: nothing unseen becomes <unk>
    assert 0 not in tok.encode("中文字符 🤖")


@pytest.mark.parametrize("text", UNSEEN)
def test_hf_export_tokenizes_exactly_like_sentencepiece(trained, text):
    from transformers import AutoTokenizer

    sp = load_tokenizer(trained[0])
    hf = AutoTokenizer.from_pretrained(trained[1])
    ids = sp.encode(text)
    assert hf.encode(text, add_special_tokens=False) == ids
    assert hf.encode(text) == [BOS_ID] + ids
    assert hf.decode(ids) == sp.decode(ids) == text


def test_hf_export_on_shipped_tokenizer_and_long_text(tmp_path, sp_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(export_hf(sp_model, tmp_path / "hf"))
    sp = load_tokenizer(sp_model)
    text = "\n".join(UNSEEN) * 20
    assert hf.encode(text, add_special_tokens=False) == sp.encode(text)
    with pytest.raises(FileExistsError):
        export_hf(sp_model, tmp_path / "hf")


def test_vocab_mismatch_is_refused(sp_model):
    with pytest.raises(ValueError, match=r"4096 pieces but model.vocab_size=32000"):
        check_vocab(load_tokenizer(sp_model).vocab_size, 32000, sp_model)


def test_hf_export_directory_follows_the_umask(tmp_path, sp_model):
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = export_hf(sp_model, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755  # not mkdtemp's 0700
