"""data.sources on real 2-rank launches: a 3-source blend (a prepared directory with its own domains, a prepared
directory of another schema, a Megatron file from Megatron-Core's writer) trains in proportion, resumes identically
after a kill, resumes on 1 rank consuming the same global stream, reports its sources, and refuses a changed blend."""

import json

import numpy as np
import pytest

from dwmtrain.data.dataset import TokenDataset
from dwmtrain.report import summarize

from ..conftest import CORPUS
from ..test_mixture import write_megatron
from .helpers import by_step, pretrain_cmd, run, run_until_step_then_kill, short_run

pytestmark = pytest.mark.slow
WEIGHTS = {"web": 0.5, "books": 0.3, "code": 0.2}


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data64):
    """web: the bundled corpus (its own domains); books: 600 of its records under another field, no domain; code:
    300 of web's sequences written as documents by Megatron-Core's IndexedDatasetBuilder."""
    import zstandard

    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.readers import Fields

    root = tmp_path_factory.mktemp("sources")
    lines = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / "sample.jsonl.zst", "rb")).read().splitlines()
    (root / "books.jsonl").write_text("".join(json.dumps({"content": json.loads(ln)["text"]}) + "\n"
                                              for ln in lines[-600:]))  # fmt: skip
    prepare_data([str(root / "books.jsonl")], str(CORPUS / "sample_sp4096.model"), str(root / "books"), seq_len=64,
                 workers=1, progress=False, fields=Fields("content", "meta.redpajama_set_name"))  # fmt: skip
    web = TokenDataset(data64, "train")
    write_megatron(root / "code_text_document", [web[i].numpy() for i in range(300)])
    return (f"data.sources=[{{path: {data64}, weight: {WEIGHTS['web']}, name: web}}, "
            f"{{path: {root}/books, weight: {WEIGHTS['books']}}}, "
            f"{{path: {root}/code_text_document, weight: {WEIGHTS['code']}, name: code}}]")  # fmt: skip


def per_source(rec: dict) -> dict[str, int]:
    """A step's samples by source: books and code are their own domains, web's are the corpus's finer ones."""
    n = {k[6:]: v for k, v in rec.items() if k.startswith("n_dom/")}
    named = {"books": n.get("books", 0), "code": n.get("code", 0)}
    return {"web": sum(n.values()) - sum(named.values()), **named}


def test_a_blend_trains_in_proportion_resumes_identically_and_on_one_rank_reads_the_same_stream(tmp_path, sources,
                                                                                                 data64):  # fmt: skip
    args = short_run(data64, "meta.mode=none", sources)
    full, moved = tmp_path / "full", tmp_path / "moved"
    p = run(pretrain_cmd(full, args))
    assert "data.sources code: weight 0.2, 300 sequences" in p.stdout + p.stderr
    a = by_step(full / "metrics.jsonl")
    drawn = {s: sum(per_source(a[k])[s] for k in a) for s in WEIGHTS}
    total = a[12]["samples_seen"]
    assert sum(drawn.values()) == total
    for s, w in WEIGHTS.items():  # every prefix of the blend is within (S + 1) / 2 = 2 samples of its share
        assert abs(drawn[s] - w * total) <= 2, (s, drawn, total)
    # killed at step 7 (checkpoint 6) and rerun: identical; killed at 9 (checkpoint 8) and rerun on 1 rank
    run_until_step_then_kill(pretrain_cmd(moved, args), moved / "metrics.jsonl", 7)
    run_until_step_then_kill(pretrain_cmd(moved, args), moved / "metrics.jsonl", 9)
    assert json.loads((moved / "checkpoints" / "latest.json").read_text())["step"] == 8
    q = run(pretrain_cmd(moved, args, world=1))
    assert "world size 2 -> 1" in q.stdout + q.stderr
    b = by_step(moved / "metrics.jsonl")
    assert sorted(b) == list(range(1, 13))
    assert [b[s]["loss"] for s in range(1, 9)] == [a[s]["loss"] for s in range(1, 9)]
    for s in range(9, 13):  # on 1 rank: another reduction order, the same samples
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
    assert [per_source(b[s]) for s in range(1, 13)] == [per_source(a[s]) for s in range(1, 13)]
    report = summarize(full)
    assert "sources (data.sources), drawn by step 12:" in report and "code: weight 0.2" in report
    # the blend of a started run cannot change under it, unless data.change_mixture says so: then from the resumed
    # step, recorded in data_mixture.json
    other = sources.replace(f"weight: {WEIGHTS['books']}", "weight: 1.3")  # books 0.65 of the new blend
    r = run(pretrain_cmd(moved, [*args, other]), check=False)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "data.sources: a source's path, weight, name or index" in out, out[-3000:]
    assert "data.change_mixture=true" in out and "Traceback" not in out and np.isfinite(b[12]["loss"])
    changed = tmp_path / "changed"
    run_until_step_then_kill(pretrain_cmd(changed, args), changed / "metrics.jsonl", 5)
    run(pretrain_cmd(changed, [*args, other, "data.change_mixture=true"]))
    segs = json.loads((changed / "data_mixture.json").read_text())["segments"]
    gb = a[1]["samples_seen"]
    assert [(g["from_step"], g["from_sample"]) for g in segs] == [(0, 0), (4, 4 * gb)]
    c = by_step(changed / "metrics.jsonl")
    assert [per_source(c[s]) for s in range(1, 5)] == [per_source(a[s]) for s in range(1, 5)]
    after = {src: sum(per_source(c[s])[src] for s in range(5, 13)) for src in WEIGHTS}
    assert abs(after["books"] - 0.65 * 8 * gb) <= 2 and abs(after["web"] - 0.25 * 8 * gb) <= 2, after
