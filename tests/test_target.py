"""The user's target set (data.target) and the reward / report split of every validation source: in each input
format, tokenized once into the run directory, split so that the meta job never reads an example validation
reports on, recorded and checked on every start; bad input refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dwmtrain.config import load_config
from dwmtrain.data.validation import REPORT, REWARD, open_validation, split_ids, validation_set
from dwmtrain.errors import DataError, ResumeError
from dwmtrain.rundir import RunDir

from .conftest import corpus_records, write_jsonl


def _cfg(prepared, sp_model, *extra: str):
    return load_config("tiny", [f"data.train_data={prepared}", f"data.tokenizer={sp_model}", "data.seq_len=64",
                                "meta.val_batch_size=4", "deepspeed.micro_batch_size=2",
                                "deepspeed.global_batch_size=4", *extra])  # fmt: skip


def _docs(tmp_path, n: int = 40, field: str = "text"):
    recs = [{field: r["text"], "meta": r["meta"]} for r in corpus_records(n)]
    return write_jsonl(tmp_path / "target.jsonl", recs), recs


def _columnar(tmp_path, texts: list[str]) -> None:
    """tmp_path/t.parquet and tmp_path/t.arrow: the texts in a column "body"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "t.parquet")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as f, pa.ipc.new_file(f, pa.schema([("body", pa.string())])) as w:
        w.write_table(pa.table({"body": texts}))


def _seen(v, n_batches: int, bs: int, world: int) -> set[tuple]:
    """Every example (its token ids) the batches of ``v`` hand out, on every rank."""
    out = set()
    for rank in range(world):
        for b in v.batches(n_batches, bs, rank, world):
            out |= _examples(b)
    return out


def _examples(b: dict) -> set[tuple]:
    """The examples of a batch, whole (their unpadded token ids)."""
    return {tuple(ids[m.bool()].tolist()) for ids, m in zip(b["input_ids"], b["attention_mask"])}


def _dups(v) -> int:
    """Examples of a part equal to another of it (a corpus repeats some texts)."""
    return v.n - len(_seen(v, v.n, 1, 1))


def test_the_split_is_deterministic_disjoint_complete_and_keeps_equal_examples_together():
    for n, f, seed in [(10, 0.5, 0), (397, 0.5, 0), (397, 0.3, 7), (2, 0.5, 1)]:
        reward, report = split_ids(list(range(n)), f, seed)
        assert split_ids(list(range(n)), f, seed) == (reward, report)
        assert not set(reward) & set(report) and sorted(reward + report) == list(range(n))
        assert len(reward) == round(n * f)
    assert split_ids(list(range(397)), 0.5, 0) != split_ids(list(range(397)), 0.5, 1)
    keys = ["a", "b", "a", "c", "b", "a", "d", "e"]  # repeated examples: each on one side only
    for seed in range(20):
        reward, report = split_ids(keys, 0.5, seed)
        assert not {keys[i] for i in reward} & {keys[i] for i in report} and len({keys[i] for i in reward}) == 2


@pytest.mark.parametrize("source", ["lambada", "heldout", "target"])
def test_the_meta_jobs_examples_never_meet_the_reported_ones(source, prepared, sp_model, tmp_path):
    target, _ = _docs(tmp_path)
    cfg = _cfg(prepared, sp_model, f"data.val_source={source}", f"data.target.path={target}")
    reward, report = validation_set(cfg, REWARD), validation_set(cfg, REPORT)
    assert not set(reward.ids) & set(report.ids) and reward.total == report.total
    assert sorted(reward.ids + report.ids) == list(range(reward.total))
    # what each reader is handed, over many more batches than the part holds (they wrap around)
    bs = 4
    meta = _seen(reward, 3 * reward.n // bs + 2, bs, world=2)
    val = _seen(report, 3 * report.n // bs + 2, bs, world=2)
    assert len(meta) == len(set(reward.ids)) - _dups(reward) and len(val) == len(set(report.ids)) - _dups(report)
    assert not meta & val


def test_the_meta_job_reads_only_the_reward_part(prepared, sp_model, tmp_path):
    from dwmtrain.distributed import Dist
    from dwmtrain.meta.update import MetaBatches

    target, _ = _docs(tmp_path)
    cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={target}")
    rd = RunDir(tmp_path / "run")
    report = open_validation(cfg, rd, REPORT)["target"]  # the trainer's first start: tokenizes and records the split
    d = Dist(rank=0, world=1, local_rank=0, local_world=1, device=torch.device("cpu"), accelerator="cpu")
    batches = MetaBatches(cfg, d, rd, consumed_samples=0)
    seen = set()
    for k in range(30):
        seen |= _examples(batches(k)[1])
    assert seen and not seen & _seen(report, report.n, 1, 1)
    rec = json.loads(rd.validation_split.read_text())
    assert rec["reward_examples"] + rec["report_examples"] == rec["examples"] == report.total > 40
    assert rec["source"] == "target" and len(rec["reward_sha256"]) == 64


def test_a_target_in_each_format_is_tokenized_once_and_reused(prepared, sp_model, tmp_path):
    _, recs = _docs(tmp_path)
    texts = [r["text"] for r in recs]
    _columnar(tmp_path, texts)
    zst = tmp_path / "z"
    zst.mkdir()
    import zstandard

    (zst / "a.jsonl.zst").write_bytes(zstandard.compress("".join(json.dumps({"doc": {"body": t}}) + "\n"
                                                                for t in texts).encode()))  # fmt: skip
    want = None
    for path, field in [(tmp_path / "t.parquet", "body"), (tmp_path / "t.arrow", "body"), (zst, "doc.body")]:
        cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={path}",
                   f"data.target.text_field={field}")  # fmt: skip
        rd = RunDir(tmp_path / f"run-{path.name}")
        v = open_validation(cfg, rd, REPORT)["target"]
        got = [v.items[i] for i in range(v.total)]
        want = want or got
        assert sorted(set(v.docs)) == list(range(40)) and v.total > 40  # documents longer than 64 tokens: cut
        assert [(g.context, g.target) for g in got] == [(w.context, w.target) for w in want]
        assert (rd.validation_dir / "target.safetensors").is_file()
        again = validation_set(cfg, REPORT, rd.validation_dir)  # from the cache: the same examples
        assert "tokenized before" in again.where and [a.target for a in again.items] == [g.target for g in got]
        assert again.docs == v.docs
    # a prepared directory (the run's tokenizer): its sequences
    cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={prepared}")
    v = validation_set(cfg, REPORT)
    assert "prepared sequences" in v.where and all(len(it.context) + len(it.target) == 64 for it in v.items)


def test_a_long_document_is_cut_into_examples_that_stay_on_one_side_of_the_split(prepared, sp_model, tmp_path):
    from dwmtrain.data.tokenizer import load_tokenizer

    target, recs = _docs(tmp_path)
    recs.insert(3, {"text": "  "})  # skipped, yet counted: a document is its record's place among the records
    write_jsonl(target, recs)
    cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={target}")
    reward, report = validation_set(cfg, REWARD), validation_set(cfg, REPORT)
    tok = load_tokenizer(sp_model)
    for place, rec in enumerate(recs):  # a document's examples, joined, are its tokens: nothing lost at the cuts
        pieces = [it for d, it in zip(reward.docs, reward.items) if d == place]
        assert all(len(it.context) + len(it.target) <= 64 for it in pieces)
        joined = [t for it in pieces for t in it.context + it.target]
        full = [] if place == 3 else [tok.bos_id, *tok.encode_batch([rec["text"]])[0]]
        assert joined == (full[:-1] if len(full) % 64 == 1 else full)  # a last token alone has no context: dropped
    assert max(len([d for d in reward.docs if d == p]) for p in range(len(recs))) > 1
    sides = [{reward.docs[i] for i in v.ids} for v in (reward, report)]
    assert not sides[0] & sides[1] and len(sides[0]) == 20 and sides[0] | sides[1] == set(range(41)) - {3}


def test_documents_that_share_an_example_fall_on_one_side():
    from dwmtrain.data.validation import document_groups

    assert document_groups([0, 0, 1, 2, 2, 3], ["a", "b", "c", "d", "b", "e"]) == [0, 0, 1, 0, 0, 3]
    assert document_groups([5, 7, 9, 9], ["x", "y", "y", "x"]) == [5, 5, 5, 5]  # joined through a third


def test_a_shared_header_keeps_its_documents_together_and_an_old_cache_is_tokenized_again(prepared, sp_model, tmp_path):
    from safetensors.torch import load_file, save_file

    _, recs = _docs(tmp_path)
    header = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software " * 6
    recs = [{"text": header + r["text"]} if i % 4 == 0 else r for i, r in enumerate(recs)]  # 10 share a header
    target = write_jsonl(tmp_path / "target.jsonl", recs)
    cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={target}")
    rd = RunDir(tmp_path / "run")
    reward, report = validation_set(cfg, REWARD, rd.validation_dir), validation_set(cfg, REPORT, rd.validation_dir)
    sides = [{reward.docs[i] for i in v.ids} for v in (reward, report)]
    shared = set(range(0, 40, 4))
    assert shared <= sides[0] or shared <= sides[1]  # the header's first example is the same in each
    assert not _seen(reward, reward.n, 1, 1) & _seen(report, report.n, 1, 1)
    cached = rd.validation_dir / "target.safetensors"
    t = load_file(str(cached))
    save_file({"ids": t["ids"], "offsets": t["offsets"]}, str(cached))  # a cache from before examples had documents
    again = validation_set(cfg, REWARD, rd.validation_dir)
    assert "tokenized before" not in again.where and again.docs == reward.docs and again.ids == reward.ids


def test_a_changed_target_file_is_tokenized_again_and_its_run_refuses_it(prepared, sp_model, tmp_path):
    target, recs = _docs(tmp_path)
    cfg = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={target}")
    rd = RunDir(tmp_path / "run")
    total = open_validation(cfg, rd, REPORT)["target"].total
    # before the first checkpoint nothing was trained on the split: a corrected start records its own
    quarter = _cfg(
        prepared, sp_model, "data.val_source=target", f"data.target.path={target}", "data.reward_fraction=0.25"
    )
    open_validation(quarter, rd, REPORT)
    reward = validation_set(quarter, REWARD)
    assert json.loads(rd.validation_split.read_text())["reward_examples"] == reward.n
    assert len({reward.docs[i] for i in reward.ids}) == 10  # a quarter of the documents
    open_validation(cfg, rd, REPORT)
    (rd.checkpoints / "step0000002").mkdir(parents=True)  # from here on the run has trained on it
    (rd.checkpoints / "step0000002" / "COMPLETE").write_text("{}")
    write_jsonl(target, recs[:30])  # the user edits the target: a resume must not mix two targets
    with pytest.raises(ResumeError, match=rf"split.json: .* examples={total}.* a run keeps its target"):
        open_validation(cfg, rd, REPORT)
    write_jsonl(target, recs)
    assert open_validation(cfg, rd, REPORT)["target"].total == total  # the same target again: the run goes on
    from dwmtrain.data.validation import check_split

    rec = json.loads(rd.validation_split.read_text())
    old = {k: v for k, v in rec.items() if k != "documents"}  # a split recorded when a document was one example
    rd.validation_split.write_text(json.dumps(old))
    with pytest.raises(ResumeError, match="one example per target document.*a new run directory"):
        check_split(rd.validation_split, rec, trained=True)
    rd.validation_split.write_text(json.dumps(rec))
    for change in ("data.reward_fraction=0.25", "data.split_seed=3"):
        other = _cfg(prepared, sp_model, "data.val_source=target", f"data.target.path={target}", change)
        with pytest.raises(ResumeError, match="a run keeps its target and split"):
            open_validation(other, rd, REPORT)


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing", r"data.target.path=.*nowhere.jsonl.*: no such file"),
        ("no-field", r"no usable document in field 'body' \(40 records skipped"),
        ("empty-texts", r"no usable document in field 'text'"),
        (
            "too-small",
            r"3 examples split 2 reward / 1 report .* the reward part needs at least 4 .*: 8 examples in all",
        ),
        ("foreign-prepared", r"tokenized with .*, not the run's data.tokenizer"),
    ],
)
def test_bad_targets_are_one_line_errors_naming_the_file_and_field(case, match, prepared, sp_model, tmp_path):
    target, recs = _docs(tmp_path)
    extra = [f"data.target.path={target}"]
    if case == "missing":
        extra = [f"data.target.path={tmp_path / 'nowhere.jsonl'}"]
    elif case == "no-field":
        extra.append("data.target.text_field=body")
    elif case == "empty-texts":
        write_jsonl(target, [{"text": "  "}, {"text": ""}, {"other": 1}])
    elif case == "too-small":
        write_jsonl(target, [{"text": r["text"][:80]} for r in recs[:3]])  # three short documents, one example each
    elif case == "foreign-prepared":
        foreign = tmp_path / "foreign"
        foreign.mkdir()
        index = json.loads((prepared / "index.json").read_text())
        (foreign / "index.json").write_text(json.dumps({**index, "tokenizer_sha256": "0" * 64}))
        extra = [f"data.target.path={foreign}"]
    cfg = _cfg(prepared, sp_model, "data.val_source=target", *extra)
    with pytest.raises(DataError, match=match) as e:
        validation_set(cfg, REPORT)
    assert "\n" not in str(e.value)


def test_the_config_wants_a_target_path_and_a_fraction_between_0_and_1(prepared, sp_model):
    from dwmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="data.target.path"):
        _cfg(prepared, sp_model, "data.val_source=target")
    for f in ("0", "1", "1.5"):
        with pytest.raises(ConfigError, match="data.reward_fraction"):
            _cfg(prepared, sp_model, f"data.reward_fraction={f}")


def _formats_on_two_ranks(d, runs: list[tuple[list[str], str]]):
    """Per (overrides, run dir): what this rank's validation batches and the meta job's batches hand out, and the
    report part's metrics (a fixed forward) reduced over both ranks."""
    from dwmtrain.data.validation import validation_metrics
    from dwmtrain.meta.update import MetaBatches

    out = []
    for over, run_dir in runs:
        cfg = load_config("tiny", over)
        rd = RunDir(run_dir)
        report = open_validation(cfg, rd, REPORT)["target"]  # rank 0 tokenizes; rank 1 reads its tokens
        meta = MetaBatches(cfg, d, rd, consumed_samples=0)
        reward = set()
        for k in range(-(-meta.val.n // (2 * cfg.meta.val_batch_size))):  # one pass over the reward part
            reward |= _examples(meta(k)[1])
        nb = -(-report.n // 4)
        shown = set().union(*(_examples(b) for b in report.batches(nb, 2, d.rank, 2)))

        def forward(b):  # logits that favour the current token: each example its own loss
            return torch.nn.functional.one_hot(b["input_ids"], 4096).float() * 3.0

        metrics = validation_metrics(forward, report, nb, 2, d.rank, 2, d.device)
        parts = {n: {v.docs[i] for i in v.ids} for n, v in (("reward", meta.val), ("report", report))}
        out.append({"reward": reward, "report": shown, "total": report.total, "metrics": metrics,
                    "where": report.where, "docs": len(set(report.docs)), "parts": parts})  # fmt: skip
    return out


def test_each_target_format_through_validation_and_the_meta_batches_on_two_ranks(prepared, sp_model, tmp_path):
    from .spawn import run_distributed

    _, recs = _docs(tmp_path)
    texts = [r["text"] for r in recs]
    _columnar(tmp_path, texts)
    write_jsonl(tmp_path / "t.jsonl", [{"doc": {"body": t}} for t in texts])
    runs = []
    for path, field in [("t.parquet", "body"), ("t.arrow", "body"), ("t.jsonl", "doc.body"), (prepared, "text")]:
        over = [f"data.train_data={prepared}", f"data.tokenizer={sp_model}", "data.seq_len=64",
                "meta.val_batch_size=4", "deepspeed.micro_batch_size=2", "deepspeed.global_batch_size=4",
                "data.val_source=target", f"data.target.path={tmp_path / path}",
                f"data.target.text_field={field}"]  # fmt: skip
        runs.append((over, str(tmp_path / f"run-{Path(path).name}")))
    r0, r1 = run_distributed(_formats_on_two_ranks, runs)
    for a, b, (over, _) in zip(r0, r1, runs):
        assert a["total"] == b["total"] and a["metrics"] == b["metrics"], over
        reward, report = a["reward"] | b["reward"], a["report"] | b["report"]
        assert reward and report and not reward & report, over  # the meta job never reads a reported example
        assert a["parts"] == b["parts"] and not a["parts"]["reward"] & a["parts"]["report"], over  # nor a document
        assert a["metrics"]["val_examples"] >= len(report) > 0
        if "prepared" not in a["where"]:  # rank 0 tokenized the documents; rank 1 read its tokens
            assert a["docs"] == b["docs"] == 40 and "tokenized before" in b["where"], (a["where"], b["where"])
    assert r0[0]["metrics"] == r0[1]["metrics"] == r0[2]["metrics"]  # the same documents in three formats
