"""Inputs beyond SlimPajama JSONL: Parquet, Arrow files and saved datasets (made here with pyarrow and datasets),
named text and domain columns, directories searched recursively, and bad input named by file and row."""

from __future__ import annotations

import numpy as np
import pytest

from dwmtrain.data.readers import Fields, expand_inputs, iter_records
from dwmtrain.errors import DataError

from .conftest import SP_MODEL, corpus_records, write_jsonl

FINEWEB = Fields(text="content", domain="source")  # FineWeb-Edu-style columns


def _fineweb_rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"doc{i}", "content": r["text"], "source": r["meta"]["redpajama_set_name"], "score": 3.5}
            for i, r in enumerate(corpus_records(start + n)[start:], start)]  # fmt: skip


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path), row_group_size=17)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same 120 documents as JSONL, as Parquet shards in nested directories, as an Arrow file, saved."""
    import datasets

    d = tmp_path_factory.mktemp("inputs")
    rows = _fineweb_rows(120)
    write_jsonl(d / "all.jsonl", rows)
    _parquet(d / "pq" / "CC-MAIN-1" / "000.parquet", rows[:50])
    _parquet(d / "pq" / "CC-MAIN-2" / "001.parquet", rows[50:])
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(d / "saved"))
    arrow = next((d / "saved").glob("*.arrow"))
    return d, rows, arrow


def test_every_format_gives_the_same_records_in_order(inputs):
    d, rows, arrow = inputs
    parquet = expand_inputs([str(d / "pq")])  # recursive: SlimPajama's train/chunkN/ layout too
    assert [p.rsplit("/", 2)[-2] for p in parquet] == ["CC-MAIN-1", "CC-MAIN-2"]
    for files in ([str(d / "all.jsonl")], parquet, [str(arrow)], [str(d / "saved")]):
        got = [r.rec for r in iter_records(files, FINEWEB)]
        assert [FINEWEB.text_of(r) for r in got] == [r["content"] for r in rows], files
        assert [FINEWEB.domain_of(r) for r in got] == [r["source"] for r in rows]
    assert expand_inputs([str(d)]).count(str(d / "saved")) == 1  # a saved dataset is one input, not its .arrow


def test_prepare_data_is_the_same_from_every_format(tmp_path, inputs):
    from dwmtrain.data.dataset import TokenDataset
    from dwmtrain.data.prepare import prepare_data

    d, rows, arrow = inputs
    got = {}
    for name, src in (("jsonl", [str(d / "all.jsonl")]), ("parquet", [str(d / "pq")]), ("arrow", [str(arrow)]),
                      ("saved", [str(d / "saved")])):  # fmt: skip
        out = tmp_path / name
        rep = prepare_data(src, str(SP_MODEL), str(out), seq_len=64, workers=2, heldout_fraction=0.0,
                           progress=False, fields=FINEWEB)  # fmt: skip
        ds = TokenDataset(out)
        got[name] = (np.stack([ds[i].numpy() for i in range(len(ds))]), ds.domain_names, rep.documents)
        assert ds.index["text_field"] == "content" and ds.index["domain_field"] == "source"
    ref = got["jsonl"]
    assert ref[2] == len(rows) and set(ref[1]) == {r["source"] for r in rows}
    for name, (seqs, doms, docs) in got.items():
        assert (seqs == ref[0]).all() and doms == ref[1] and docs == ref[2], name


def test_select_reads_parquet_and_writes_jsonl_with_the_selection(tmp_path, inputs):
    import json

    from dwmtrain.select import select

    d, rows, _ = inputs
    out = tmp_path / "sel.jsonl"
    rep = select("random", [str(d / "pq")], str(out), budget_docs=10, seed=3, fields=FINEWEB)
    picked = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(picked) == rep["selected_documents"] == 10
    assert all({k: v for k, v in p.items() if k != "meta"} in rows for p in picked)
    assert set(rep["domains_pool"]) == {r["source"] for r in rows}


def test_a_missing_column_names_the_file_and_the_column(tmp_path, inputs):
    from dwmtrain.data.prepare import prepare_data

    d, _, _ = inputs
    with pytest.raises(DataError, match=r"000.parquet: no column 'text' \(columns: id, content, source, score"):
        prepare_data([str(d / "pq" / "CC-MAIN-1" / "000.parquet")], str(SP_MODEL), str(tmp_path / "o"), seq_len=64,
                     workers=1, progress=False)  # fmt: skip
    with pytest.raises(DataError, match=r"no column 'lang'.*data.domain_field"):
        prepare_data([str(d / "pq")], str(SP_MODEL), str(tmp_path / "o"), seq_len=64, workers=1, progress=False,
                     fields=Fields("content", "lang"))  # fmt: skip


def test_bad_parquet_input_is_named_by_file_and_row(tmp_path):
    from dwmtrain.data.prepare import prepare_data

    good = _parquet(tmp_path / "good.parquet", _fineweb_rows(30))
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    gap = _fineweb_rows(30)
    gap[12] = {**gap[12], "content": None}
    _parquet(tmp_path / "gap.parquet", gap)
    for name, want in (("cut.parquet", "not a readable Parquet file"), ("empty.parquet", "empty file")):
        with pytest.raises(DataError, match=rf"{name}: {want}"):
            prepare_data([str(tmp_path / name)], str(SP_MODEL), str(tmp_path / "o"), seq_len=64, workers=1,
                         progress=False, fields=FINEWEB)  # fmt: skip
    # a row without text is a counted skip named by its row
    rep = prepare_data([str(tmp_path / "gap.parquet")], str(SP_MODEL), str(tmp_path / "o2"), seq_len=64, workers=1,
                       progress=False, fields=FINEWEB)  # fmt: skip
    assert rep.skipped == {"missing text": 1} and rep.skipped_examples == [
        f"{tmp_path / 'gap.parquet'}:13: missing text"
    ]
    mixed = [{"content": "words " * 20}, {"content": 5}]  # a number where text belongs: named by file and row
    write_jsonl(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(DataError, match=r"mixed.jsonl:2: field 'content' must be a string, got int"):
        list(iter_records([str(tmp_path / "mixed.jsonl")], FINEWEB))
