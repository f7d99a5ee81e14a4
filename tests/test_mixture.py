"""data.sources: the blend's order (proportions, resume, world size), Megatron / GPT-NeoX .bin/.idx files read in
place against the real writer (Megatron-Core's IndexedDatasetBuilder), a blend of both kinds, and every bad input."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwmtrain.config import load_config
from dwmtrain.data.dataset import rank_micro_batches
from dwmtrain.data.megatron import MegatronTokens
from dwmtrain.data.mixture import BlendOrder, data_identity, open_training_data, source_plans
from dwmtrain.errors import ConfigError, DataError, ResumeError

from .conftest import CORPUS

VOCAB = 4096


def write_megatron(prefix, docs: list[np.ndarray], dtype=np.uint16) -> None:
    """Documents through Megatron-Core's own writer (one sequence per document, as its preprocessing writes)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    b = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for d in docs:
        b.add_item(torch.from_numpy(np.asarray(d, dtype=np.int64)))
        b.end_document()
    b.finalize(f"{prefix}.idx")


def docs_of(rng, n: int, lo: int = 1, hi: int = 90) -> list[np.ndarray]:
    return [rng.integers(0, VOCAB, rng.integers(lo, hi)) for _ in range(n)]


# ----------------------------------------------------------------------------- the blend's order (pure)


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [1, 1, 1], [5, 0, 1, 2], [0.999, 0.001]])
def test_every_prefix_of_the_blend_holds_each_source_in_proportion(weights):
    sizes = [37, 11, 5, 23][: len(weights)]
    o = BlendOrder(sizes, weights, seed=3)
    g = 3 * 32768 + 17  # over several chunks of the merge
    src = np.array([o.draws(i)[0] for i in range(g)])
    w = np.asarray(weights, float) / sum(weights)
    counts = np.zeros((g + 1, len(w)), dtype=np.int64)
    np.add.at(counts[1:], (np.arange(g), src), 1)
    counts = counts.cumsum(0)
    dev = np.abs(counts - np.arange(g + 1)[:, None] * w).max()
    assert dev <= (len([x for x in weights if x > 0]) + 1) / 2  # at every prefix, not only in expectation
    for n in (0, 1, 999, 32768, g):
        assert (o.drawn(n) == counts[n]).all()
    assert (counts[-1][w == 0] == 0).all()  # a source of weight 0 is never drawn


def test_a_source_repeats_only_after_every_one_of_its_sequences_and_says_when():
    o = BlendOrder([7, 30], [0.5, 0.5], seed=0)
    drawn = [o[g] for g in range(80)]
    first = [i for i in drawn if i < 7]
    assert sorted(first[:7]) == list(range(7)) and first[7:14] != first[:7]  # a new permutation per epoch
    assert o.first_repeat(0) == next(g for g in range(80) if o.draws(g) == (0, 7))
    assert sorted([i - 7 for i in drawn if i >= 7][:30]) == list(range(30))


def test_any_position_is_computed_alone_so_a_resume_or_another_world_size_reads_the_same_stream():
    sizes, weights = [100, 40, 9], [0.5, 0.3, 0.2]
    whole = [BlendOrder(sizes, weights, 1)[g] for g in range(400)]
    later = BlendOrder(sizes, weights, 1)  # a fresh process resuming at 37000 and then at 240
    assert [later[g] for g in range(37000, 37010)] == [BlendOrder(sizes, weights, 1)[g] for g in range(37000, 37010)]
    assert [later[g] for g in range(240, 400)] == whole[240:]
    for world, micro in ((1, 8), (2, 4), (4, 2)):  # the ranks together consume positions 240, 241, ... in order
        streams = [rank_micro_batches(later, 240, r, world, micro) for r in range(world)]
        got = [i for _ in range(5) for s in streams for i in next(s)[1]]
        assert got == whole[240:280], world
    assert [BlendOrder(sizes, weights, 2)[g] for g in range(40)] != whole[:40]  # another seed, another stream


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=6),
    raw=st.lists(st.floats(0, 100, allow_nan=False), min_size=6, max_size=6),
    g=st.integers(0, 3000),
)
def test_fuzzed_weights_keep_the_proportions_and_the_sizes(sizes, raw, g):
    weights = raw[: len(sizes)]
    if sum(weights) <= 0 or max(weights) / sum(weights) < 1e-9:
        return
    o = BlendOrder(sizes, weights, 0)
    w = np.asarray(weights) / sum(weights)
    d = o.drawn(g)
    assert d.sum() == g and np.abs(d - w * g).max() <= (len(sizes) + 1) / 2 + 1e-9
    off = np.concatenate([[0], np.cumsum(sizes)])
    for i in range(min(g, 50)):
        s, _ = o.draws(i)
        assert off[s] <= o[i] < off[s + 1] and w[s] > 0


# ----------------------------------------------------------------------------- Megatron / GPT-NeoX files


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_a_megatron_file_from_the_real_writer_reads_as_its_documents_packed(tmp_path, dtype):
    rng = np.random.default_rng(0)
    docs = docs_of(rng, 40)
    write_megatron(tmp_path / "web_text_document", docs, dtype)
    m = MegatronTokens(tmp_path / "web_text_document", seq_len=64, vocab_size=VOCAB)
    stream = np.concatenate(docs)
    assert len(m) == len(stream) // 64 and m.dropped_tokens == len(stream) % 64
    for j in (0, 1, len(m) - 1):  # the windows run across document edges; the tokens exactly as written
        assert torch.equal(m[j], torch.from_numpy(stream[64 * j : 64 * j + 64].astype(np.int64)))
    assert m.header.documents == 40 and m.header.dtype == np.dtype(dtype)
    assert MegatronTokens(tmp_path / "web_text_document.bin", 64, VOCAB).num_sequences == len(m)  # or by its file


def good_file(tmp_path, n_docs=6):
    write_megatron(tmp_path / "d", docs_of(np.random.default_rng(1), n_docs, 20, 40))
    return tmp_path / "d.idx", tmp_path / "d.bin"


def test_a_wrong_or_truncated_megatron_file_is_refused_by_name(tmp_path):
    idx, binf = good_file(tmp_path)
    good_idx, good_bin = idx.read_bytes(), binf.read_bytes()

    def refused(idx_bytes: bytes, bin_bytes: bytes, why: str, name) -> None:
        idx.write_bytes(idx_bytes)
        binf.write_bytes(bin_bytes)
        with pytest.raises(DataError, match=why) as e:
            MegatronTokens(tmp_path / "d", 16, VOCAB)
        assert str(name) in str(e.value) and "\n" not in str(e.value)

    refused(good_idx, good_bin[:-2], "truncated", binf)  # a .bin cut short
    refused(good_idx, good_bin + b"\0\0", "its index says", binf)
    refused(b"NOTANIDX" + good_idx[8:], good_bin, "no MMIDIDX header", idx)
    refused(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], good_bin, "index version 2", idx)
    refused(good_idx[:17] + bytes([7]) + good_idx[18:], good_bin, "dtype code 7", idx)  # float32: not tokens
    refused(good_idx[:17] + bytes([4]) + good_idx[18:], good_bin, "bytes", binf)  # int32 sizes disagree with .bin
    refused(good_idx[:-8], good_bin, "needs", idx)  # the index cut short
    n = struct.unpack_from("<Q", good_idx, 18)[0]
    ptr = 34 + 4 * n + 8  # the second sequence's byte offset
    refused(good_idx[:ptr] + struct.pack("<q", 4) + good_idx[ptr + 8 :], good_bin, "not back to back", idx)
    idx.write_bytes(good_idx)
    binf.unlink()
    with pytest.raises(DataError, match=r"d\.bin: missing"):
        MegatronTokens(tmp_path / "d", 16, VOCAB)


def test_a_token_outside_the_vocabulary_is_refused_when_read(tmp_path):
    write_megatron(tmp_path / "d", [np.arange(64) + 5000])
    m = MegatronTokens(tmp_path / "d", 16, VOCAB)
    with pytest.raises(DataError, match="sequence 0 holds token id 5015, outside the vocabulary of 4096"):
        m[0]


# ----------------------------------------------------------------------------- a blend of both kinds


@pytest.fixture(scope="module")
def blend_sources(tmp_path_factory):
    """Two prepared directories (one with several domains, one with none) and one Megatron file, at seq_len 64."""
    import json

    import zstandard

    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.readers import Fields

    root = tmp_path_factory.mktemp("blend")
    tok = str(CORPUS / "sample_sp4096.model")
    prepare_data([str(CORPUS / "sample.jsonl.zst")], tok, str(root / "web"), seq_len=64, workers=1, progress=False)
    lines = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / "sample.jsonl.zst", "rb")).read().splitlines()
    books = root / "books.jsonl"  # records of another schema: the text under "content", no domain
    books.write_text("".join(json.dumps({"content": json.loads(ln)["text"]}) + "\n" for ln in lines[-600:]))
    prepare_data([str(books)], tok, str(root / "plain"), seq_len=64, workers=1, progress=False,
                 fields=Fields("content", "meta.redpajama_set_name"))  # fmt: skip
    write_megatron(root / "code_text_document", docs_of(np.random.default_rng(2), 300, 10, 200))
    return root, tok


def blend_config(root, tok, w=(0.5, 0.3, 0.2)):
    srcs = (f"[{{path: {root}/web, weight: {w[0]}}}, {{path: {root}/plain, weight: {w[1]}, name: books}}, "
            f"{{path: {root}/code_text_document, weight: {w[2]}, name: code}}]")  # fmt: skip
    return load_config(None, [f"data.tokenizer={tok}", "data.seq_len=64", "model.preset=tiny", f"data.sources={srcs}"])


def test_a_blend_of_prepared_and_megatron_sources_trains_as_one_dataset(blend_sources):
    from dwmtrain.data.tokenizer import load_tokenizer

    root, tok = blend_sources
    cfg = blend_config(root, tok)
    data = open_training_data(cfg.data, VOCAB, load_tokenizer(tok).sha256)
    web, books, code = data.sources
    assert (web.kind, books.kind, code.kind) == ("prepared", "prepared", "megatron")
    assert len(data) == len(web) + len(books) + len(code)
    # each sequence's domain: the prepared source's own where it names several, else the source's name
    assert set(web.data.domain_names) < set(data.domain_names) and {"books", "code"} < set(data.domain_names)
    assert data.domain(len(web)) == "books" and data.domain(len(data) - 1) == "code"
    assert torch.equal(data[len(web) + len(books)], code.data[0]) and torch.equal(data[3], web.data[3])
    order = data.order(cfg.run.seed)
    plans = source_plans(data, order, steps=200, global_batch=16)
    assert [p.drawn for p in plans] == order.drawn(3200).tolist() and sum(p.drawn for p in plans) == 3200
    assert [round(p.share, 3) for p in plans] == [0.5, 0.3, 0.2]
    assert plans[2].first_repeat_step == order.first_repeat(2) // 16 + 1 and plans[2].epochs > 1  # code repeats
    assert plans[0].first_repeat_step is None and plans[0].epochs < 1
    assert "epochs" in plans[2].line(64) and f"{len(code):,} sequences" in plans[2].line(64)


def test_a_resume_refuses_changed_weights_or_sources(blend_sources):
    from dwmtrain.checkpoint.compat import check_compatible

    root, tok = blend_sources
    a, b = data_identity(blend_config(root, tok).data), data_identity(blend_config(root, tok).data)
    assert a == b
    other = data_identity(blend_config(root, tok, (0.6, 0.2, 0.2)).data)
    with pytest.raises(ResumeError, match=r"data.sources: a source's path, weight, name or index"):
        check_compatible({"data_sha": a}, {"data_sha": other})


@pytest.mark.parametrize(
    "sources, field",
    [
        ("[{path: x, weight: -0.5}]", "data.sources[0].weight"),
        ("[{path: x, weight: 0}, {path: y, weight: 0.0}]", "every weight is 0"),
        ("[{path: x, weight: many}]", "data.sources[0].weight"),
        ("[{path: x, weight: .inf}]", "data.sources[0].weight"),
        ("[{path: x}, {path: x}]", "names ['x'] twice"),
        ("[{weight: 1}]", "data.sources[0].path"),
        ("[{path: x, wieght: 1}]", "did you mean 'weight'"),
        ("'0.6 web 0.4 code'", "data.sources='0.6 web 0.4 code': expected a list"),
    ],
)
def test_bad_weights_and_sources_name_the_field(sources, field):
    with pytest.raises(ConfigError, match=__import__("re").escape(field)) as e:
        load_config(None, [f"data.sources={sources}"])
    assert "\n" not in str(e.value)


def test_before_launch_each_bad_source_is_named_in_one_line(blend_sources, tmp_path):
    from dwmtrain.preflight import data_problems

    root, tok = blend_sources
    other_len = tmp_path / "len32"
    from dwmtrain.data.prepare import prepare_data

    prepare_data([str(CORPUS / "sample.jsonl.zst")], tok, str(other_len), seq_len=32, workers=1, progress=False)
    (tmp_path / "cut.idx").write_bytes((root / "code_text_document.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes((root / "code_text_document.bin").read_bytes()[:-10])
    cfg = load_config(None, [f"data.tokenizer={tok}", "data.seq_len=64", "data.val_source=heldout",
                             "model.vocab_size=4096", f"data.heldout_data={root}/web",
                             f"data.sources=[{{path: {root}/web}}, {{path: {other_len}}}, {{path: {tmp_path}/cut}}, "
                             f"{{path: {tmp_path}/nothing}}]"])  # fmt: skip
    before = {p: p.stat().st_mtime_ns for p in [*root.rglob("*"), *tmp_path.rglob("*")] if p.is_file()}
    problems = data_problems(cfg)
    assert any("data.sources[1] (len32)" in p and "seq_len=32" in p for p in problems), problems
    assert any("data.sources[2] (cut)" in p and "truncated" in p for p in problems), problems
    assert any("data.sources[3] (nothing).path" in p and "neither a prepared directory" in p for p in problems)
    assert len(problems) == 3 and all("\n" not in p for p in problems)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing already there is touched
    blend = load_config(None, [f"data.tokenizer={tok}", "data.train_data=0.6 web 0.4 code"])
    assert any("a Megatron-style blend is not a path: write it as data.sources" in p for p in data_problems(blend))


def test_a_changed_blend_continues_each_sources_draws_and_is_allowed_only_when_asked(tmp_path, blend_sources):
    from dwmtrain.checkpoint.compat import check_compatible
    from dwmtrain.data.mixture import mixture_segment, source_key

    root, tok = blend_sources
    rec = tmp_path / "data_mixture.json"
    first = blend_config(root, tok).data
    s0 = mixture_segment(rec, first, 0, 0)
    assert s0["from_sample"] == 0 and mixture_segment(rec, first, 10, 320) == s0  # the same blend: nothing new
    changed = blend_config(root, tok, (0.2, 0.2, 0.6)).data
    s1 = mixture_segment(rec, changed, 10, 320)
    old = BlendOrder([1, 1, 1], [0.5, 0.3, 0.2], 0).drawn(320)
    assert (s1["from_step"], s1["from_sample"]) == (10, 320) and list(s1["drawn_before"].values()) == old.tolist()
    data = open_training_data(changed, VOCAB)
    o = data.order(0, s1)
    with pytest.raises(IndexError, match="applies from 320"):
        o[319]
    g = next(g for g in range(320, 400) if o.draws(g - 320)[0] == 2)  # the code source's first draw in the new blend
    n, k = len(data.sources[2]), int(old[2])  # ... continues its own order where the first blend stopped
    key = source_key(data.sources[2].path)  # its own order: seeded by its path, not its place in the list
    assert o[g] == int(data.offsets[2]) + int(np.random.default_rng([0, key, k // n]).permutation(n)[k % n])
    plans = source_plans(data, o, steps=20, global_batch=32)
    assert sum(p.drawn for p in plans) == 640 and plans[2].drawn == old[2] + o.drawn(320)[2]
    a, b = (data_identity(c) for c in (first, changed))
    saved = {"data_sha": a, "data_kind": "blend"}
    with pytest.raises(ResumeError, match="data.change_mixture=true"):
        check_compatible(saved, {"data_sha": b, "data_kind": "blend", "change_mixture": False})
    assert check_compatible(saved, {"data_sha": b, "data_kind": "blend", "change_mixture": True})  # a note, allowed
    with pytest.raises(ResumeError):  # a prepared directory does not become a blend
        check_compatible({**saved, "data_kind": "prepared"}, {"data_sha": b, "data_kind": "blend", "change_mixture": 1})


def test_dry_run_reads_the_blend_and_refuses_a_bad_source_with_exit_2(blend_sources, tmp_path):
    from .test_config import _dry_run

    root, tok = blend_sources
    srcs = (f"data.sources=[{{path: {root}/web, weight: 3}}, {{path: {root}/code_text_document, weight: 1, "
            "name: code}]")  # fmt: skip
    p = _dry_run("--config", "tiny", srcs, f"data.tokenizer={tok}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "# data.sources code: weight 0.25" in p.stdout and "epochs" in p.stdout
    (tmp_path / "cut.idx").write_bytes((root / "code_text_document.idx").read_bytes())
    (tmp_path / "cut.bin").write_bytes((root / "code_text_document.bin").read_bytes()[:-10])
    p = _dry_run("--config", "tiny", srcs.replace(f"{root}/code_text_document", f"{tmp_path}/cut"),
                 f"data.tokenizer={tok}")  # fmt: skip
    assert p.returncode == 2 and "data.sources[1] (code)" in p.stderr and "truncated" in p.stderr
    assert "Traceback" not in p.stderr and p.stderr.count("error (") == 1


def test_a_rollback_takes_the_segment_that_covers_it_and_a_path_is_one_source_however_written(tmp_path, blend_sources):
    import json

    from dwmtrain.data.mixture import mixture_segment

    root, tok = blend_sources
    rec = tmp_path / "data_mixture.json"
    a, b = blend_config(root, tok).data, blend_config(root, tok, (0.2, 0.2, 0.6)).data
    mixture_segment(rec, a, 0, 0)
    at10 = mixture_segment(rec, b, 10, 320)
    for s in b.sources:  # written with a trailing slash: the same source, its draws carried over all the same
        s.path += "/"
    assert mixture_segment(rec, b, 12, 384) == at10
    back = mixture_segment(rec, a, 8, 256)  # resumed from an older checkpoint, the first blend again: its segment
    assert back["from_sample"] == 0 and len(json.loads(rec.read_text())["segments"]) == 1
    again = mixture_segment(rec, b, 8, 256)  # ... or the second blend from there: from 256, counts as of 256
    old = BlendOrder([1, 1, 1], [0.5, 0.3, 0.2], 0).drawn(256)
    assert again["from_sample"] == 256 and list(again["drawn_before"].values()) == old.tolist()
    o = open_training_data(b, VOCAB).order(0, again)
    assert o[256] >= 0 and o.k0.tolist() == old.tolist()
