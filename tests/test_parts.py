"""prepare-data as parts (``--part I/N``) and one merge: the same dataset as one prepare-data of the inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dwmtrain.errors import DataError

from .conftest import SP_MODEL, corpus_records, write_jsonl


def pool(root: Path, files: int = 6, docs: int = 900) -> Path:
    """``docs`` corpus documents in ``files`` JSONL files of unequal sizes (the assignment balances bytes)."""
    recs, cut = corpus_records(docs), [0, 40, 90, 300, 420, 700, docs][: files + 1]
    root.mkdir(parents=True, exist_ok=True)
    for k, (a, b) in enumerate(zip(cut, cut[1:])):
        write_jsonl(root / f"shard-{k:02d}.jsonl", recs[a:b])
    return root


def same_dataset(a: Path, b: Path) -> None:
    """Every shard byte for byte, the domain ids, and the index but for where it was written."""
    names = sorted(p.name for p in a.iterdir() if p.suffix == ".bin")
    assert names == sorted(p.name for p in b.iterdir() if p.suffix == ".bin") and names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    ia, ib = json.loads((a / "index.json").read_text()), json.loads((b / "index.json").read_text())
    assert ia == ib


def test_four_parts_and_a_merge_equal_one_prepare_and_a_rerun_skips_complete_parts(tmp_path, capsys):
    from dwmtrain.arrays import assign_files, assign_slices
    from dwmtrain.data.parts import part_status
    from dwmtrain.launch.cli import main

    src = pool(tmp_path / "pool")
    common = ["prepare-data", "--input", str(src), "--tokenizer", str(SP_MODEL), "--seq-len", "64",
              "--shard-sequences", "300", "--workers", "1"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    out = tmp_path / "parted"
    files = sorted(str(p) for p in src.iterdir())
    assert sorted(k for part in assign_files(files, 4) for k in part) == list(range(6))  # each file once
    slices = sorted(x for part in assign_slices(files, 4) for x in part)
    assert (4, 0, 2) in slices and (4, 1, 2) in slices and len(slices) == 8  # the two largest: two row ranges each
    for i in (0, 1, 3):
        assert main([*common, "--out", str(out), "--part", f"{i}/4"]) == 0
    assert main(["data-status", str(out)]) == 0
    assert "part 2/4: not started" in capsys.readouterr().out
    assert part_status(str(out))[:2] == ["part 0/4: complete", "part 1/4: complete"]
    assert main([*common, "--out", str(out), "--merge"]) == 2  # part 2 is missing: refused, naming it
    err = capsys.readouterr().err
    assert "part 2/4 is missing or unfinished" in err and "--part 2/4" in err and not out.exists()
    capsys.readouterr()
    assert main([*common, "--out", str(out), "--part", "0/4"]) == 0  # a rerun of the array skips complete parts
    assert "part 0/4 is complete" in capsys.readouterr().out
    assert main([*common, "--out", str(out), "--part", "2/4"]) == 0
    assert main([*common, "--out", str(out), "--merge"]) == 0
    same_dataset(tmp_path / "one", out)
    assert not (tmp_path / "parted.parts").exists()  # the parts go once the dataset is in place


def test_a_part_of_other_inputs_is_refused_and_a_bad_part_spec_is_a_clear_error(tmp_path):
    from dwmtrain.arrays import parse_part
    from dwmtrain.data.parts import merged_tokenized, prepare_part

    src = pool(tmp_path / "pool", files=2, docs=90)
    out = str(tmp_path / "out")
    for i in (0, 1):
        prepare_part([str(src)], str(SP_MODEL), out, f"{i}/2", workers=1)
    (src / "shard-01.jsonl").unlink()  # the inputs changed since
    write_jsonl(src / "shard-02.jsonl", corpus_records(5))
    with pytest.raises(DataError, match=r"part 0/2 was made from other inputs"):
        merged_tokenized([str(src)], str(SP_MODEL), out)
    with pytest.raises(DataError, match=r"--part 4/4: I must be in 0..3"):
        parse_part("4/4")
    with pytest.raises(DataError, match=r"--part x: expected I/N"):
        parse_part("x")


def test_a_pool_of_fewer_files_than_parts_is_cut_into_row_ranges(tmp_path, capsys):
    """Two files, four parts: each file in row ranges (one part tokenizes each range), and the merge packs the
    dataset one prepare-data writes."""
    from dwmtrain.arrays import assign_slices
    from dwmtrain.launch.cli import main

    src = pool(tmp_path / "pool", files=2, docs=90)  # 40 and 50 documents
    common = ["prepare-data", "--input", str(src), "--tokenizer", str(SP_MODEL), "--seq-len", "64",
              "--shard-sequences", "50", "--workers", "1"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    files = sorted(str(p) for p in src.iterdir())
    slices = sorted(x for part in assign_slices(files, 4) for x in part)
    assert slices == [(0, 0, 2), (0, 1, 2), (1, 0, 3), (1, 1, 3), (1, 2, 3)]  # no range over a part's share of bytes
    out = tmp_path / "parted"
    for i in range(4):
        assert main([*common, "--out", str(out), "--part", f"{i}/4"]) == 0
    said = capsys.readouterr().out
    assert said.count(" of them row ranges), ") == 4
    assert main([*common, "--out", str(out), "--merge"]) == 0
    same_dataset(tmp_path / "one", out)


def test_sources_with_their_own_fields_prepare_in_one_run_and_as_an_array(tmp_path, capsys):
    """prepare-data --sources: web records with their text and domain where SlimPajama keeps them, code records with
    the text under ``content`` and no domain (named ``code`` for all), in one run and as 2 parts and a merge."""
    from dwmtrain.launch.cli import main

    pool(tmp_path / "web", files=2, docs=300)
    (tmp_path / "code").mkdir()
    write_jsonl(tmp_path / "code" / "repo.jsonl", [{"content": r["text"], "lang": "py"} for r in corpus_records(200)])
    (tmp_path / "sources.yaml").write_text(
        "- input: web\n- input: [code/repo.jsonl]\n  text_field: content\n  domain: code\n"
    )  # relative to the sources file
    common = ["prepare-data", "--sources", str(tmp_path / "sources.yaml"), "--tokenizer", str(SP_MODEL),
              "--seq-len", "64", "--workers", "1"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    index = json.loads((tmp_path / "one" / "index.json").read_text())
    assert "code" in index["domains"] and len(index["domains"]) > 2  # the web records keep their own domains
    assert [s["domain"] for s in index["sources"]] == ["", "code"] and index["sources"][1]["text_field"] == "content"
    for i in (0, 1):
        assert main([*common, "--out", str(tmp_path / "parted"), "--part", f"{i}/2"]) == 0
    assert main([*common, "--out", str(tmp_path / "parted"), "--merge"]) == 0
    same_dataset(tmp_path / "one", tmp_path / "parted")
    capsys.readouterr()
    assert main([*common, "--input", str(tmp_path / "web"), "--out", str(tmp_path / "both")]) == 2
    assert "give --input (one set of fields for all) or --sources FILE" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # an empty folder among inputs that hold files is no error
    only = ["prepare-data", "--input", str(tmp_path / "empty"), str(tmp_path / "web"), "--tokenizer", str(SP_MODEL),
            "--seq-len", "64", "--workers", "1", "--out", str(tmp_path / "web-only")]  # fmt: skip
    assert main(only) == 0


@pytest.mark.parametrize(
    "text, why",
    [
        ("- text_field: content\n", "source 1: expected a mapping with an input"),
        ("- input: a\n  txt_field: content\n", "source 1: field 'txt_field' is not one of"),
        ("- input: a\n- input: []\n", "source 2: field input must be a path or a list of paths"),
        ("- input: a\n  domain: [x]\n", "source 1: field domain must be a string"),
        ("input: a\n", "expected a list of sources"),
        ("- input: a\n  text_field: [\n", "cannot be read as a sources list"),
    ],
)
def test_a_bad_sources_file_names_the_entry_and_field(tmp_path, text, why):
    from dwmtrain.data.readers import read_sources_file

    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(DataError, match=__import__("re").escape(why)) as e:
        read_sources_file(str(tmp_path / "s.yaml"))
    assert str(tmp_path / "s.yaml") in str(e.value)
