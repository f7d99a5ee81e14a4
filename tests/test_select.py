"""Offline selection baselines (random, DSIR, QuRating): rankings, budgets, output format, errors."""

from __future__ import annotations

import argparse
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dwmtrain.data.tokenizer import load_tokenizer
from dwmtrain.errors import DataError
from dwmtrain.launch.cli import main
from dwmtrain.select import (
    dsir_features,
    fit_ngram_dist,
    gumbel_topk,
    hash_bucket,
    importance_logw,
    report_path,
    sample_order,
    select,
    take_budget,
    words,
)
from dwmtrain.select.cli import register

from .conftest import SP_MODEL, corpus_records, write_jsonl

COMMON = "the a of and to with in for is on".split()
STYLES = {
    "recipe": "preheat oven cup flour sugar butter egg stir bake minutes salt pepper chop onion garlic simmer "
    "pan bowl whisk cream dough knead golden serve".split(),
    "code": "def return self if else for import class print none true false while try except lambda yield raise "
    "pass ( ) : = , [ ] x y i".split(),
    "legal": "party shall hereby agreement pursuant section herein liability clause contract warranty indemnify "
    "breach notice term licensee thereof governing law jurisdiction".split(),
}


def read_out(path) -> list[dict]:
    raw = open(path, "rb").read()
    if str(path).endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def synth_docs(style: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        vocab = STYLES[style] + COMMON
        text = " ".join(rng.choice(vocab, size=int(rng.integers(30, 80))))
        docs.append({"text": text, "meta": {"redpajama_set_name": style, "id": f"{style}-{seed}-{i}"}})
    return docs


@pytest.fixture(scope="module")
def synth_pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    docs = [doc for k, style in enumerate(STYLES) for doc in synth_docs(style, 100, k)]
    order = np.random.default_rng(0).permutation(len(docs))
    pool = write_jsonl(d / "pool.jsonl", [docs[i] for i in order])
    target = write_jsonl(d / "target.jsonl", synth_docs("recipe", 50, 99))
    return pool, target


# ----------------------------------------------------------------------------- pure functions


def test_importance_weight_by_hand():
    lt = fit_ngram_dist(np.array([3.0, 1.0]), smoothing=1.0)  # (3+1)/(4+2), (1+1)/(4+2)
    lr = fit_ngram_dist(np.array([1.0, 1.0]), smoothing=1.0)  # 1/2, 1/2
    assert np.allclose(np.exp(lt), [4 / 6, 2 / 6]) and np.allclose(np.exp(lr), [0.5, 0.5])
    assert importance_logw(np.array([0]), np.array([2]), lt, lr) == pytest.approx(2 * math.log(4 / 3))
    assert importance_logw(np.array([0, 1]), np.array([1, 1]), lt, lr) == pytest.approx(math.log(4 / 3 * 2 / 3))


def test_features_are_stable_hashed_unigrams_and_bigrams():
    # fixed values: Python's salted hash() would change these between processes
    assert hash_bucket("hello", 10000) == 7620 and hash_bucket("the cat", 10000) == 143
    assert words("Don't STOP-me! x_1==2") == ["don", "'", "t", "stop", "-", "me", "!", "x_1", "==", "2"]
    idx, cnt = dsir_features("A b a", 10000)  # a, b, a, "a b", "b a"
    assert cnt.sum() == 5 and dict(zip(idx.tolist(), cnt.tolist()))[hash_bucket("a", 10000)] == 2


def test_budget_and_order_helpers():
    assert take_budget([5, 5, 5], 10) == 2  # reached exactly by the 2nd document
    assert take_budget([5, 5, 5], 11) == 3  # the crossing document is included
    assert take_budget([5, 5, 5], 100) == 3 and take_budget([20], 10) == 1
    s = np.array([0.5, 3.0, 3.0, -1.0, 2.0])
    assert sample_order(s, 0, seed=1).tolist() == [1, 2, 4, 0, 3]  # top-k, ties in pool order
    a = gumbel_topk(s, 7)
    assert (a == gumbel_topk(s, 7)).all() and sorted(a) == list(range(5))
    firsts = [gumbel_topk(np.array([0.0, 5.0]), k)[0] for k in range(200)]
    assert 0.95 < np.mean(firsts) < 1.0  # P(first = 1) = e^5 / (1 + e^5) = 0.993


# ----------------------------------------------------------------------------- DSIR


def test_dsir_target_file_selects_target_style(tmp_path, synth_pool):
    pool, target = synth_pool
    shares, sets = [], []
    for seed in (0, 1):
        out = tmp_path / f"s{seed}.jsonl"
        rep = select("dsir", [str(pool)], str(out), budget_docs=60, target_files=[str(target)], seed=seed)
        recs = read_out(out)
        assert len(recs) == rep["selected_documents"] == 60 and rep["pool_documents"] == 300
        assert rep["target_documents"] == 50 and not rep["target_from_pool"]
        shares.append(np.mean([r["meta"]["redpajama_set_name"] == "recipe" for r in recs]))
        sets.append({r["meta"]["id"] for r in recs})
        ws = [r["meta"]["selection"]["score"] for r in recs]
        assert all(r["meta"]["selection"]["method"] == "dsir" for r in recs)
        assert [r["meta"]["selection"]["rank"] for r in recs] == list(range(60))
        assert np.mean(ws) > rep["score_mean"]["pool"]
    assert min(shares) > 0.8  # the pool is 1/3 recipes
    assert sets[0] != sets[1]


def test_dsir_target_domains_on_bundled_corpus(tmp_path, capsys):
    src = write_jsonl(tmp_path / "pool.jsonl", corpus_records(2000))
    out = tmp_path / "sel.jsonl.zst"
    argv = ["select", "dsir", "--input", str(src), "--out", str(out), "--target-domains", "python_reference"]
    assert main([*argv, "--budget-docs", "150", "--no-progress"]) == 0
    rep = json.loads(report_path(out).read_text())
    pool, sel = rep["domains_pool"], rep["domains_selected"]
    share_pool = pool["python_reference"]["documents"] / rep["pool_documents"]
    share_sel = sel.get("python_reference", {}).get("documents", 0) / rep["selected_documents"]
    assert rep["target_from_pool"] and rep["target_documents"] == pool["python_reference"]["documents"]
    assert share_pool < 0.1 and share_sel > 4 * share_pool
    assert sum(d["documents"] for d in sel.values()) == 150 == len(read_out(out))
    assert "python_reference" in capsys.readouterr().out


# ----------------------------------------------------------------------------- QuRating


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    rng = np.random.default_rng(5)
    recs = [
        {"text": f"document number {i}", "meta": {"redpajama_set_name": "x", "quality": {"edu": float(s)}}}
        for i, s in enumerate(rng.normal(size=200))
    ]
    return write_jsonl(tmp_path_factory.mktemp("q") / "q.jsonl", recs), [r["meta"]["quality"]["edu"] for r in recs]


def test_qurating_score_field_temperature(tmp_path, scored):
    src, scores = scored
    med = np.median(scores)
    rep = select(
        "qurating",
        [str(src)],
        str(tmp_path / "a.jsonl"),
        budget_docs=40,
        score_field="meta.quality.edu",
        temperature=0.1,
    )
    sel = [r["meta"]["selection"]["score"] for r in read_out(tmp_path / "a.jsonl")]
    assert np.mean(np.array(sel) > med) > 0.9 and rep["parameters"]["temperature"] == 0.1
    # the paper's τ = 2 still prefers quality, far less sharply
    select("qurating", [str(src)], str(tmp_path / "b.jsonl"), budget_docs=40, score_field="meta.quality.edu")
    sel2 = [r["meta"]["selection"]["score"] for r in read_out(tmp_path / "b.jsonl")]
    assert np.mean(scores) < np.mean(sel2) < np.mean(sel)
    # τ = 0: exact top-k, best first
    select(
        "qurating", [str(src)], str(tmp_path / "c.jsonl"), budget_docs=40, score_field="meta.quality.edu", temperature=0
    )
    top = [r["text"] for r in read_out(tmp_path / "c.jsonl")]
    assert top == [f"document number {i}" for i in np.argsort(-np.array(scores), kind="stable")[:40]]


def test_qurating_missing_score_errors_or_skips(tmp_path):
    ok = {"text": "t", "meta": {"quality": {"edu": 1}}}
    recs = [ok, ok, {"text": "no score", "meta": {}}, {"text": "bad", "meta": {"quality": {"edu": "high"}}}, ok]
    src = write_jsonl(tmp_path / "q.jsonl", recs)
    kw = dict(budget_docs=2, score_field="meta.quality.edu")
    with pytest.raises(DataError, match=r"q.jsonl:3: no field 'meta.quality.edu'"):
        select("qurating", [str(src)], str(tmp_path / "o.jsonl"), **kw)
    assert not (tmp_path / "o.jsonl").exists()
    rep = select("qurating", [str(src)], str(tmp_path / "o.jsonl"), missing="skip", **kw)
    assert rep["skipped"] == {"missing score field": 1, "non-numeric score": 1} and rep["pool_documents"] == 3
    assert rep["skipped_examples"][0].endswith("q.jsonl:3: missing score field")


def test_qurating_rater_is_top_k_of_its_logits(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from dwmtrain.data.sentencepiece_tokenizer import export_hf

    rater = tmp_path / "rater"
    export_hf(SP_MODEL, rater)  # no pad token: the selector must pad with the model's pad id
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForSequenceClassification(cfg).eval()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    model.save_pretrained(rater)
    recs = corpus_records(40)
    src = write_jsonl(tmp_path / "pool.jsonl", recs)

    tok = AutoTokenizer.from_pretrained(rater)
    assert tok.pad_token is None
    with torch.no_grad():  # one document at a time: no padding involved
        ref = []
        for r in recs:
            enc = tok(r["text"], truncation=True, max_length=64, return_tensors="pt")
            ref.append(float(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, 0]))
    ref = np.array(ref)
    k = 10
    top = np.argsort(-ref, kind="stable")
    assert ref[top[k - 1]] - ref[top[k]] > 1e-3  # a clear cut, so float noise cannot flip the test

    out = tmp_path / "sel.jsonl"
    rep = select(
        "qurating",
        [str(src)],
        str(out),
        budget_docs=k,
        rater=str(rater),
        temperature=0,
        rater_max_length=64,
        rater_batch_size=8,
    )
    got = read_out(out)
    assert [r["text"] for r in got] == [recs[i]["text"] for i in top[:k]]
    assert np.allclose([r["meta"]["selection"]["score"] for r in got], ref[top[:k]], atol=1e-4)
    assert rep["parameters"]["rater_device"] == "cpu"


# ----------------------------------------------------------------------------- random, output, errors


def test_random_seeded_budgets_and_prepare_data(tmp_path, small_jsonl):
    from dwmtrain.data.prepare import prepare_data

    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    select("random", [str(small_jsonl)], str(a), budget_docs=25, seed=3)
    select("random", [str(small_jsonl)], str(b), budget_docs=25, seed=3)
    select("random", [str(small_jsonl)], str(c), budget_docs=25, seed=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    pool = [json.loads(line) for line in small_jsonl.read_text().splitlines()]
    got = read_out(a)
    assert len(got) == 25 and all(
        r["meta"]["selection"] == {"method": "random", "score": None, "rank": i} for i, r in enumerate(got)
    )
    texts = [r["text"] for r in pool]
    idx = [texts.index(r["text"]) for r in got]
    assert idx != sorted(idx)  # shuffled order
    for r in got:  # records unchanged but for meta.selection
        assert {**r, "meta": {k: v for k, v in r["meta"].items() if k != "selection"}} in pool

    out = tmp_path / "t.jsonl.zst"
    rep = select("random", [str(small_jsonl)], str(out), budget_tokens=5000, tokenizer=str(SP_MODEL), seed=1)
    tok = load_tokenizer(SP_MODEL)
    lens = [len(tok.document(r["text"])) for r in read_out(out)]  # BOS + pieces + EOS, as prepare-data writes
    assert rep["tokens_selected"] == sum(lens) >= 5000 > sum(lens) - lens[-1]  # crossing document included
    assert rep["budget_reached"] and rep["pool_tokens"] > rep["tokens_selected"]
    prep = prepare_data(
        [str(out)], str(SP_MODEL), str(tmp_path / "prep"), seq_len=64, workers=1, heldout_fraction=0.0, progress=False
    )
    assert prep.tokens == rep["tokens_selected"] and prep.documents == rep["selected_documents"]
    assert json.loads(report_path(out).read_text())["tokens_selected"] == rep["tokens_selected"]


def test_the_written_selection_passes_through_rank_buckets_in_order(tmp_path, small_jsonl, monkeypatch):
    """Buckets of 3 ranks (many temporary files, each sorted alone) write the same bytes as one bucket, and leave
    no temporary file behind."""
    import functools

    from dwmtrain.select import driver

    one, many = tmp_path / "one.jsonl.zst", tmp_path / "many.jsonl.zst"
    select("random", [str(small_jsonl)], str(one), budget_docs=40, seed=5)
    monkeypatch.setattr(driver, "write_selected", functools.partial(driver.write_selected, bucket=3))
    select("random", [str(small_jsonl)], str(many), budget_docs=40, seed=5)
    assert one.read_bytes() == many.read_bytes()
    assert [r["meta"]["selection"]["rank"] for r in read_out(many)] == list(range(40))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.jsonl.zst", "many.report.json", "one.jsonl.zst",
                                                          "one.report.json"]  # fmt: skip


def test_a_sharded_selection_reads_back_in_rank_order_and_a_rerun_leaves_no_stale_shard(tmp_path, small_jsonl):
    from dwmtrain.data.readers import expand_inputs

    out = tmp_path / "sel" / "top.jsonl.zst"
    rep = select("random", [str(small_jsonl)], str(out), budget_docs=25, seed=2, shard_docs=10)
    names = [Path(p).name for p in rep["outputs"]]
    assert names == ["top-00000.jsonl.zst", "top-00001.jsonl.zst", "top-00002.jsonl.zst"] and not out.exists()
    files = expand_inputs([str(out.parent)])  # prepare-data --input DIR: the shards, in name order, not the report
    assert [Path(f).name for f in files] == names
    ranks = [r["meta"]["selection"]["rank"] for f in files for r in read_out(Path(f))]
    assert ranks == list(range(25))
    (out.parent / "top.report.json").unlink()  # a shard alone is refused too
    with pytest.raises(FileExistsError, match="top-00000.jsonl.zst exists"):
        select("random", [str(small_jsonl)], str(out), budget_docs=25, seed=2, shard_docs=10)
    rep = select("random", [str(small_jsonl)], str(out), budget_docs=15, seed=2, shard_docs=10, overwrite=True)
    assert sorted(p.name for p in out.parent.glob("top-*")) == ["top-00000.jsonl.zst", "top-00001.jsonl.zst"]


def test_never_overwrites_without_flag(tmp_path, small_jsonl):
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    register(sub)
    out = tmp_path / "sel.jsonl"
    out.write_bytes(b"sentinel\n")
    argv = ["select", "random", "--input", str(small_jsonl), "--out", str(out), "--budget-docs", "5", "--no-progress"]
    a = ap.parse_args(argv)
    with pytest.raises(FileExistsError, match="--overwrite"):
        a.fn(a)
    assert main(argv) == 2  # dwmtrain's exit code for expected errors
    assert out.read_bytes() == b"sentinel\n" and not report_path(out).exists()
    assert main([*argv, "--overwrite"]) == 0 and len(read_out(out)) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_bad_input_is_named_and_skips_are_counted(tmp_path):
    good = json.dumps({"text": "fine text here", "meta": {"redpajama_set_name": "d"}})
    bad = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"text": "unterminated', good])
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        select("random", [str(bad)], str(tmp_path / "o.jsonl"), budget_docs=1)
    assert not (tmp_path / "o.jsonl").exists()
    src = write_jsonl(tmp_path / "s.jsonl", [good, {"text": "  "}, {"meta": {}}, "", good])
    rep = select("random", [str(src)], str(tmp_path / "o.jsonl"), budget_docs=10)
    assert rep["skipped"] == {"empty text": 1, "missing text": 1} and rep["pool_documents"] == 2
    assert rep["selected_documents"] == 2 and not rep["budget_reached"]
    with pytest.raises(DataError, match="exactly one"):
        select("random", [str(src)], str(tmp_path / "p.jsonl"), budget_docs=1, budget_tokens=5)
    with pytest.raises(DataError, match="needs --tokenizer"):
        select("random", [str(src)], str(tmp_path / "p.jsonl"), budget_tokens=5)
    with pytest.raises(DataError, match="must end in"):
        select("random", [str(src)], str(tmp_path / "p.json"), budget_docs=1)
    with pytest.raises(DataError, match="no such documents in the pool"):
        select("dsir", [str(src)], str(tmp_path / "p.jsonl"), budget_docs=1, target_domains=["nope"])
