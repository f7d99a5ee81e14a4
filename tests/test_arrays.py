"""The job-array protocol (dwmtrain.arrays): part names, where the parts sit, markers written last, the merge's
refusals and the status lines, without any command's payload."""

import json

import pytest

from dwmtrain.arrays import JobArray, parse_part, parts_dir
from dwmtrain.errors import DataError


def test_parts_sit_beside_the_output_under_its_name():
    assert parts_dir("/d/sp-1024/") == parts_dir("/d/sp-1024") == parts_dir("/d/sp-1024.jsonl.zst")
    assert str(parts_dir("/d/sel.jsonl")) == "/d/sel.parts" and str(parts_dir("s.parquet")) == "s.parts"
    assert parse_part("3/4") == (3, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(DataError, match=f"--part {bad}"):
            parse_part(bad)


def test_a_part_counts_once_its_marker_is_written_last_and_says_what_it_is_made_from(tmp_path):
    arr = JobArray(str(tmp_path / "out"), "prepare-data", made_from="inputs")
    assert arr.count() is None and "no parts yet" in arr.status()[0]
    with pytest.raises(RuntimeError), arr.writing(0, 2, {"inputs": ["a"]}) as tmp:
        (tmp / "payload").write_text("half")
        raise RuntimeError("killed")  # no marker, no part: a rerun redoes it
    assert not arr.part(0, 2).exists() and arr.read(0, 2) is None
    marker = {"inputs": ["a"]}
    with arr.writing(0, 2, marker) as tmp:
        (tmp / "payload").write_text("whole")
        marker["documents"] = 7  # completed with what the part found
    assert arr.read(0, 2) == {"inputs": ["a"], "documents": 7} and arr.holds(0, 2, {"inputs": ["a"]})
    assert arr.status() == ["part 0/2: complete", "part 1/2: not started"]
    with pytest.raises(DataError, match=r"part-0001-of-0002: part 1/2 is missing or unfinished; run prepare-data"):
        arr.require(lambda i, n: {"inputs": ["a"]})
    with arr.writing(1, 2, {"inputs": ["b"]}):
        pass
    with pytest.raises(DataError, match=r"part.json: part 1/2 was made from other inputs than this merge's"):
        arr.require(lambda i, n: {"inputs": ["a"]})
    assert arr.require(lambda i, n: {"inputs": [["a"], ["b"]][i]}) == 2
    (arr.part(1, 2) / "part.json").write_text("not json")  # a marker that does not read: as if never written
    assert arr.status()[1] == "part 1/2: started, not finished"
    arr.part(0, 3).mkdir()
    with pytest.raises(DataError, match=r"parts of 2 and of 3"):
        arr.count()
    assert json.loads((arr.part(0, 2) / "part.json").read_text())["documents"] == 7
