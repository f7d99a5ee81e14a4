import json

import numpy as np
import pytest
import zstandard

from dwmtrain.data.dataset import GlobalOrder, TokenDataset, rank_micro_batches
from dwmtrain.data.prepare import DataError, prepare_data
from dwmtrain.data.sentencepiece_tokenizer import BOS_ID, EOS_ID
from dwmtrain.data.tokenizer import load_tokenizer

from .conftest import corpus_records, write_jsonl


def test_packing_is_exact(tmp_path, sp_model):
    recs = corpus_records(60)
    src = write_jsonl(tmp_path / "a.jsonl", recs)
    rep = prepare_data(
        [str(src)],
        sp_model,
        str(tmp_path / "out"),
        seq_len=32,
        workers=2,
        heldout_fraction=0.0,
        progress=False,
    )
    tok = load_tokenizer(sp_model)
    # each document as the tokenizer's convention has it: Llama's BOS, the text, EOS
    stream = np.concatenate([np.array([BOS_ID] + tok.encode(r["text"]) + [EOS_ID]) for r in recs])
    assert (tok.bos_id, tok.eos_id) == (BOS_ID, EOS_ID) and tok.document("a b") == [BOS_ID, *tok.encode("a b"), EOS_ID]
    ds = TokenDataset(tmp_path / "out", verify="sha256")
    n = len(stream) // 32
    assert len(ds) == n and rep.tail_tokens_dropped == len(stream) - n * 32
    got = np.concatenate([ds[i].numpy() for i in range(len(ds))])
    assert (got == stream[: n * 32]).all()
    assert set(ds.domain_names) <= {r["meta"]["redpajama_set_name"] for r in recs}
    assert ds.domain(0) == recs[0]["meta"]["redpajama_set_name"]


def test_zst_input_and_heldout_split(tmp_path, sp_model):
    recs = corpus_records(200)
    raw = "".join(json.dumps(r) + "\n" for r in recs).encode()
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    prepare_data([str(tmp_path)], sp_model, str(tmp_path / "o"), seq_len=64, heldout_fraction=0.1, progress=False)
    tr, ho = TokenDataset(tmp_path / "o"), TokenDataset(tmp_path / "o", "heldout")
    assert len(ho) > 0 and len(tr) > 5 * len(ho)
    idx = json.loads((tmp_path / "o" / "index.json").read_text())
    assert idx["vocab_size"] == 4096 and len(idx["tokenizer_sha256"]) == 64


def test_malformed_json_names_file_and_line(tmp_path, sp_model):
    good = json.dumps({"text": "fine text here"})
    src = write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"text": "unterminated', good])
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        prepare_data([str(src)], sp_model, str(tmp_path / "o"), seq_len=8, progress=False)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]


def test_invalid_utf8_names_file_and_line(tmp_path, sp_model):
    p = tmp_path / "u.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe bytes"}\n')
    with pytest.raises(DataError, match=r"u.jsonl:2: invalid UTF-8"):
        prepare_data([str(p)], sp_model, str(tmp_path / "o"), seq_len=8, progress=False)


def test_non_string_text_names_line(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}, {"text": 5}])
    with pytest.raises(DataError, match=r"t.jsonl:2: field 'text' must be a string"):
        prepare_data([str(src)], sp_model, str(tmp_path / "o"), seq_len=8, progress=False)


def test_empty_and_missing_text_are_counted_skips(tmp_path, sp_model):
    recs = [r for r in corpus_records(20)]
    recs[3] = {"text": "   ", "meta": {}}
    recs[7] = {"meta": {"redpajama_set_name": "x"}}
    recs[9] = {"text": ""}
    src = write_jsonl(tmp_path / "s.jsonl", recs)
    rep = prepare_data([str(src)], sp_model, str(tmp_path / "o"), seq_len=16, progress=False)
    assert rep.skipped == {"empty text": 2, "missing text": 1}
    assert rep.documents == 17
    assert "s.jsonl:8: missing text" in rep.summary()
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["skipped"] == {"empty text": 2, "missing text": 1}


def test_skips_name_line_numbers_when_blank_lines_are_present(tmp_path, sp_model):
    lines = [json.dumps(r) for r in corpus_records(12)]
    lines[5] = json.dumps({"meta": {}})  # record 6 ...
    src = tmp_path / "b.jsonl"
    src.write_text("\n".join(lines[:3] + ["", "   "] + lines[3:]) + "\n")  # ... on line 8
    rep = prepare_data([str(src)], sp_model, str(tmp_path / "o"), seq_len=16, progress=False)
    assert rep.skipped == {"missing text": 1} and rep.skipped_examples == [f"{src}:8: missing text"]


def _zst(path, raw: bytes, keep: float = 1.0):
    import zstandard

    c = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(c[: int(len(c) * keep)])
    return path


@pytest.mark.parametrize(
    "name, make, message",
    [
        ("e.jsonl", lambda p: p.write_bytes(b""), r"e.jsonl: empty file \(no records\)"),
        ("w.jsonl", lambda p: p.write_text("\n  \n\n"), r"w.jsonl: no records \(only blank lines\)"),
        ("z.jsonl.zst", lambda p: _zst(p, b""), r"z.jsonl.zst: empty file \(no records once decompressed\)"),
        (
            "t.jsonl.zst",
            lambda p: _zst(p, "".join(json.dumps(r) + "\n" for r in corpus_records(400)).encode(), keep=0.6),
            r"t.jsonl.zst: compressed stream is truncated \(ends after [\d,]+ bytes of text\)",
        ),
        (
            "m.jsonl",
            lambda p: write_jsonl(p, [{"text": "a b", "meta": "web"}, {"text": "c d", "meta": "web"}]),
            r"m.jsonl:1: field 'meta' must be an object, got str",
        ),
        (
            "n.jsonl",
            lambda p: write_jsonl(
                p, [{"text": "a b", "meta": {}}, {"text": "c", "meta": {}}, {"text": "d", "meta": 3}]
            ),
            r"n.jsonl:3: field 'meta' must be an object, got int",
        ),
    ],
)
def test_empty_truncated_and_non_object_meta_inputs_are_named(tmp_path, sp_model, name, make, message):
    make(tmp_path / name)
    with pytest.raises(DataError, match=message):
        prepare_data([str(tmp_path / name)], sp_model, str(tmp_path / "o"), seq_len=8, progress=False)
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_when_a_rerun_fails(tmp_path, sp_model, small_jsonl):
    out = tmp_path / "o"
    prepare_data([str(small_jsonl)], sp_model, str(out), seq_len=64, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError):
        prepare_data([str(small_jsonl)], sp_model, str(out), seq_len=64, progress=False)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "x"}', "{nope"])
    with pytest.raises(DataError):
        prepare_data([str(bad)], sp_model, str(out), seq_len=64, progress=False, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_truncated_and_corrupted_shards(tmp_path, prepared):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(prepared, d)
    shard = d / "train-00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"train-00000.bin: .* \(truncated or corrupted\)"):
        TokenDataset(d)
    corrupt = bytearray(data)
    corrupt[100:102] = b"\xff\xff"  # token id 65535 > vocab
    shard.write_bytes(bytes(corrupt))
    with pytest.raises(DataError, match="sha256 mismatch"):
        TokenDataset(d, verify="sha256")
    ds = TokenDataset(d)  # the cheap check passes; reading the bad sequence does not
    with pytest.raises(DataError, match=r"sequence 0 holds token id 65535"):
        ds[0]


def test_sampler_is_deterministic_and_covers_each_epoch():
    o1, o2 = GlobalOrder(100, seed=3), GlobalOrder(100, seed=3)
    assert [o1[g] for g in range(250)] == [o2[g] for g in range(250)]
    assert sorted(o1[g] for g in range(100)) == list(range(100))
    assert [o1[g] for g in range(100)] != [o1[g] for g in range(100, 200)]
    assert [GlobalOrder(100, 4)[g] for g in range(10)] != [o1[g] for g in range(10)]


def _consume(order, start, world, micro, steps):
    """What the ranks together consume, in global order, over `steps` micro-steps."""
    gens = [rank_micro_batches(order, start, r, world, micro) for r in range(world)]
    out = []
    for _ in range(steps):
        for g in gens:
            pos, idx = next(g)
            out.append((pos, idx))
    out.sort()
    return [i for _, idx in out for i in idx]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("k", [0, 8, 64, 136, 200, 1000])
def test_resume_at_k_matches_uninterrupted_run(world, k):
    micro, order = 8, GlobalOrder(97, seed=11)
    full = _consume(order, 0, world, micro, 200 // world)
    resumed = _consume(GlobalOrder(97, seed=11), k, world, micro, 40 // world)
    assert resumed == full[k : k + len(resumed)]
    # independent of world size: the global stream is one order
    assert _consume(order, k, 1, micro, 5) == full[k : k + 40]


def test_atomic_dir_keeps_what_the_user_had_through_every_failure(tmp_path, monkeypatch):
    import os

    from dwmtrain import fileio

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with fileio.atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):  # the block fails: nothing replaced, no temporary left
        with fileio.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    real, calls = os.replace, []

    def failing_second_replace(src, dst):  # the swap itself fails after the old one was moved aside
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_second_replace)
    with pytest.raises(OSError, match="disk full"):
        with fileio.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
    monkeypatch.setattr(fileio.os, "replace", real)
    assert (out / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with fileio.atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["b"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
