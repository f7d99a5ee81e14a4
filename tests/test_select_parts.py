"""``dwmtrain select ... --part I/N`` and ``--merge``: a pool scanned in parts, one merge, the same selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dwmtrain.launch.cli import main
from dwmtrain.select import report_path

from .conftest import SP_MODEL, corpus_records, write_jsonl


@pytest.fixture(scope="module")
def parted_pool(tmp_path_factory) -> Path:
    return write_pool(tmp_path_factory.mktemp("pool"))


def write_pool(root: Path) -> Path:
    """Six JSONL files of unequal sizes from the bundled corpus, a quality score in each record, and records a
    scan must skip (no text) in two of the files."""
    root.mkdir(parents=True, exist_ok=True)
    recs = corpus_records(700)
    rng = np.random.default_rng(3)
    for r in recs:
        r.setdefault("meta", {})["quality"] = {"edu": float(rng.normal())}
    cut = [0, 30, 90, 250, 380, 560, 700]
    for k, (a, b) in enumerate(zip(cut, cut[1:])):
        extra = [{"text": "   ", "meta": {"redpajama_set_name": "x"}}] if k in (1, 4) else []
        write_jsonl(root / f"shard-{k:02d}.jsonl", recs[a : a + 3] + extra + recs[a + 3 : b])
    return root


def without_paths(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("output", "outputs", "parts")}


CASES = {
    "random": ["--budget-docs", "120"],
    "dsir": ["--target-domains", "python_reference", "--budget-tokens", "9000", "--tokenizer", str(SP_MODEL)],
    "qurating": ["--score-field", "meta.quality.edu", "--temperature", "1.0", "--budget-docs", "90", "--seed", "4"],
}


@pytest.mark.parametrize("method", list(CASES))
def test_three_parts_and_a_merge_select_what_one_select_selects(tmp_path, parted_pool, method, capsys):
    common = ["select", method, "--input", str(parted_pool), "--no-progress", *CASES[method]]
    assert main([*common, "--out", str(tmp_path / "one.jsonl.zst")]) == 0
    out = tmp_path / "parted.jsonl.zst"
    argv = [*common, "--out", str(out)]
    for i in (2, 0, 1):
        assert main([*argv, "--part", f"{i}/3"]) == 0
    said = capsys.readouterr().out
    assert said.count("scanned: ") == 3 and "docs/s" in said
    if method == "dsir":  # the weights: a second run of each part, once every part is scanned
        assert main([*argv, "--merge"]) == 2
        assert "part 0/3 is scanned but not weighed" in capsys.readouterr().err
        for i in range(3):
            assert main([*argv, "--part", f"{i}/3"]) == 0
        assert capsys.readouterr().out.count("weighed: ") == 3
    assert main([*argv, "--part", "1/3"]) == 0  # a complete part is skipped
    assert "part 1/3 is complete" in capsys.readouterr().out
    assert main(["data-status", str(out)]) == 0
    assert capsys.readouterr().out.count(": complete (") == 3
    assert main([*argv, "--merge"]) == 0
    assert out.read_bytes() == (tmp_path / "one.jsonl.zst").read_bytes()
    one = json.loads(report_path(tmp_path / "one.jsonl.zst").read_text())
    merged = json.loads(report_path(out).read_text())
    assert merged["parts"] == 3 and without_paths(merged) == without_paths(one)
    assert one["skipped"] == {"empty text": 2} and one["pool_documents"] == 700


def test_dsir_weights_wait_for_every_scan_and_the_merge_names_a_missing_or_foreign_part(tmp_path, parted_pool,
                                                                                        capsys):  # fmt: skip
    out = tmp_path / "sel.jsonl"
    argv = ["select", "dsir", "--input", str(parted_pool), "--out", str(out), "--no-progress",
            "--target-domains", "python_reference", "--budget-docs", "50"]  # fmt: skip
    assert main([*argv, "--part", "0/4"]) == 0
    assert main([*argv, "--part", "0/4"]) == 2  # scanned; part 1..3 are not: its weights cannot come yet
    err = capsys.readouterr().err
    assert "parts 1/4, 2/4, 3/4 are not scanned yet" in err
    assert main(["data-status", str(out)]) == 0
    status = capsys.readouterr().out
    assert "part 0/4: scanned, not weighed yet" in status and "part 3/4: not started" in status
    assert main([*argv, "--merge"]) == 2
    assert "part 1/4 is missing or unfinished; run select dsir --part 1/4" in capsys.readouterr().err
    other = [*argv, "--num-buckets", "999"]
    for i in range(1, 4):
        assert main([*argv, "--part", f"{i}/4"]) == 0
    assert main([*other, "--merge"]) == 2  # parts of other settings: refused, not merged
    assert "part 0/4 was made from other inputs, tokenizer, fields or method settings" in capsys.readouterr().err
    assert not out.exists()


def test_dsir_with_a_target_directory_and_more_parts_than_files(tmp_path, parted_pool, capsys):
    """Eight parts over six files (two parts hold none) and --target-file naming a directory: the merge selects
    what one select does."""
    target = tmp_path / "target"
    target.mkdir()
    write_jsonl(target / "t.jsonl", [r for r in corpus_records(900)[700:] if r["meta"]["redpajama_set_name"]])
    common = ["select", "dsir", "--input", str(parted_pool), "--no-progress", "--target-file", str(target),
              "--budget-docs", "80"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one.jsonl")]) == 0
    argv = [*common, "--out", str(tmp_path / "parted.jsonl")]
    for _ in range(2):  # scan, then weights
        for i in range(8):
            assert main([*argv, "--part", f"{i}/8"]) == 0
    assert capsys.readouterr().out.count("weighed: 0 documents") == 2
    assert main([*argv, "--merge"]) == 0
    assert (tmp_path / "parted.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
