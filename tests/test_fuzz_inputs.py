"""Every file a user hands dwmtrain, fuzzed (hypothesis, bounded in examples and time): documents (JSON lines plain,
.zst and .gz; Parquet; Arrow), target sets (data.target), tokenizer files, the YAML config and ``key=value``
overrides, DWM files and their sidecars, checkpoint markers and ``latest.json``, the part markers of job arrays,
Megatron / GPT-NeoX ``.idx``/``.bin`` pairs and the weights of data.sources. Each input either works or ends in the
project's own error (a ``DWMTrainError``) whose one line names the file or the field, and through the command line
in exit code 2 without a traceback; never a hang; never a change to a file the user had.

The examples are derandomized (the same ones on every run, so CI cannot flake); ``DWMTRAIN_FUZZ_SCALE=10`` tries
ten times as many, and ``DWMTRAIN_FUZZ_COUNTS=FILE`` writes the examples tried per format (docs/design.md)."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dwmtrain.errors import DWMTrainError

from .conftest import SP_MODEL

SCALE = int(os.environ.get("DWMTRAIN_FUZZ_SCALE", "1"))
TRIED: Counter = Counter()
EXAMPLE_S = 60  #: one example may take this long before it counts as a hang


def fuzz(n: int):
    """Hypothesis settings of one format: ``n`` (x ``DWMTRAIN_FUZZ_SCALE``) derandomized examples, no deadline
    (a busy machine must not fail a test: ``bounded`` catches a hang), no example database on disk."""
    return settings(
        max_examples=n * SCALE, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )


@pytest.fixture(scope="module", autouse=True)
def _write_counts():
    yield
    if path := os.environ.get("DWMTRAIN_FUZZ_COUNTS"):
        old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps({**old, **TRIED}, indent=1, sort_keys=True))


@contextlib.contextmanager
def bounded(seconds: float = EXAMPLE_S):
    """Fail an example that runs past ``seconds`` (a hang) instead of waiting for it."""

    def hang(*_):
        raise AssertionError(f"still running after {seconds:.0f} s: a hang")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def snapshot(*paths: Path) -> dict[Path, bytes]:
    """The bytes of every file under ``paths``."""
    out = {}
    for p in paths:
        for f in [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []:
            out[f] = f.read_bytes()
    return out


def outcome(fmt: str, call, names: tuple[str, ...], keep: tuple[Path, ...] = ()):
    """``call()``'s result, or None when it raised the project's own error: one line naming one of ``names``.
    Anything else raised fails the test with its traceback; the files under ``keep`` must not change."""
    TRIED[fmt] += 1
    before = snapshot(*keep)
    try:
        with bounded():
            return call()
    except DWMTrainError as e:
        msg = str(e)
        assert "\n" not in msg, f"not one line: {msg!r}"
        assert any(str(n) in msg for n in names), f"names none of {names}: {msg!r}"
        return None
    finally:
        assert snapshot(*keep) == before, "a file of the user's changed"


def cli(*argv: str) -> tuple[int, str]:
    """``dwmtrain ARGV`` in process: (exit code, what it wrote to stderr)."""
    from dwmtrain.launch.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), bounded():
        code = main(list(argv))
    return code, err.getvalue()


def assert_clean_exit(code: int, err: str, names: tuple[str, ...]) -> None:
    """Exit 0, or 2 with one line naming one of ``names``; never a traceback."""
    assert "Traceback" not in err, err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [x for x in err.splitlines() if " error (" in x]
        assert len(lines) == 1 and any(str(n) in lines[0] for n in names), err


# ---------------------------------------------------------------------------------------------- documents

TEXTS = st.one_of(
    st.text(max_size=60),
    st.integers(),
    st.none(),
    st.lists(st.text(max_size=5), max_size=2),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
    st.booleans(),
    st.floats(allow_nan=True),
)
METAS = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.integers(),
    st.fixed_dictionaries(
        {}, optional={"redpajama_set_name": st.one_of(st.text(max_size=8), st.integers(), st.none())}
    ),
)
RECORDS = st.one_of(
    st.fixed_dictionaries({}, optional={"text": TEXTS, "meta": METAS, "content": TEXTS}),
    st.one_of(st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=3), st.none()),  # not an object
)
LINES = st.one_of(
    RECORDS.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),  # invalid UTF-8, malformed JSON
    st.just(b""),
    st.just(b"   "),
    st.just(json.dumps({"text": "word " * 40_000}).encode()),  # a huge line
)


@given(
    lines=st.lists(LINES, max_size=12),
    codec=st.sampled_from(["", ".zst", ".gz"]),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    field=st.sampled_from(["text", "content", "meta.redpajama_set_name"]),
)
@example(lines=[b"null", b"null"], codec="", cut=None, field="text")  # pyarrow's reader crashed the process
@example(lines=[b"null"], codec=".zst", cut=None, field="text")
@fuzz(60)
def test_json_lines_prepare_or_name_the_file_and_line(lines, codec, cut, field):
    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.readers import Fields

    with tempfile.TemporaryDirectory() as d:
        raw = b"\n".join(lines) + b"\n"
        data = {"": raw, ".zst": zstandard.ZstdCompressor().compress(raw), ".gz": gzip.compress(raw)}[codec]
        if cut is not None:
            data = data[: int(len(data) * cut)]
        src = Path(d, "in.jsonl" + codec)
        src.write_bytes(data)
        if os.environ.get("FUZZ_DUMP"):
            Path(os.environ["FUZZ_DUMP"] + codec).write_bytes(data)
        out = Path(d, "out")
        rep = outcome(
            "jsonl",
            lambda: prepare_data(
                [str(src)], str(SP_MODEL), str(out), seq_len=16, workers=1, progress=False, fields=Fields(text=field)
            ),
            names=(src,),
            keep=(src,),
        )
        assert (rep is None) != (out / "index.json").is_file() and (rep is not None or not out.exists())


@given(lines=st.lists(LINES, min_size=1, max_size=8))
@fuzz(30)
def test_json_lines_records_for_selection_or_name_the_line(lines):
    from dwmtrain.data.readers import iter_records

    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "in.jsonl")
        src.write_bytes(b"\n".join(lines))
        outcome("jsonl-records", lambda: list(iter_records([str(src)])), names=(f"{src}:",), keep=(src,))


COLUMN = st.sampled_from(["string", "large_string", "int64", "null", "list", "struct", "binary", "float"])


def arrow_column(kind: str, values: list):
    import pyarrow as pa

    n = len(values)
    return {
        "string": lambda: pa.array([v if isinstance(v, str) else None for v in values], pa.string()),
        "large_string": lambda: pa.array([v if isinstance(v, str) else "" for v in values], pa.large_string()),
        "int64": lambda: pa.array(list(range(n)), pa.int64()),
        "null": lambda: pa.nulls(n),
        "list": lambda: pa.array([[str(v)] for v in values], pa.list_(pa.string())),
        "struct": lambda: pa.array([{"a": str(v)} for v in values]),
        "binary": lambda: pa.array([str(v).encode() for v in values], pa.binary()),
        "float": lambda: pa.array([float(i) for i in range(n)], pa.float64()),
    }[kind]()


@given(
    kind=COLUMN,
    values=st.lists(st.one_of(st.text(max_size=40), st.none()), max_size=6),
    fmt=st.sampled_from(["parquet", "arrow"]),
    name=st.sampled_from(["text", "body"]),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
@example(kind="string", values=[""], fmt="arrow", name="text", cut=0.5)  # pyarrow's ArrowInvalid escaped
@fuzz(50)
def test_parquet_and_arrow_prepare_or_name_the_file(kind, values, fmt, name, cut):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwmtrain.data.prepare import prepare_data
    from dwmtrain.data.readers import iter_records

    with tempfile.TemporaryDirectory() as d:
        src = Path(d, f"in.{fmt}")
        table = pa.table({name: arrow_column(kind, values)})
        if fmt == "parquet":
            pq.write_table(table, src)
        else:
            with pa.ipc.new_stream(str(src), table.schema) as w:
                w.write_table(table)
        if cut is not None:
            src.write_bytes(src.read_bytes()[: int(src.stat().st_size * cut)])
        out = Path(d, "out")
        outcome(
            fmt,
            lambda: prepare_data([str(src)], str(SP_MODEL), str(out), seq_len=16, workers=1, progress=False),
            names=(src,),
            keep=(src,),
        )
        outcome(fmt, lambda: list(iter_records([str(src)])), names=(src,), keep=(src,))


@given(
    lines=st.lists(LINES, max_size=10),
    fmt=st.sampled_from(["jsonl", "jsonl.zst", "jsonl.gz", "parquet", "arrow", "prepared"]),
    field=st.sampled_from(["text", "content", "meta.redpajama_set_name"]),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
@example(lines=[], fmt="jsonl", field="text", cut=None)  # empty: no usable document
@example(lines=[b"null"], fmt="prepared", field="text", cut=0.0)  # an index.json that is not an object escaped
@example(lines=[b'{"text": "a b"}'], fmt="jsonl.gz", field="text", cut=0.5)  # a cut .gz target escaped
@fuzz(40)
def test_target_sets_load_or_name_the_file(lines, fmt, field, cut):
    """data.target in any format, any field, empty, huge, cut short, or prepared with another tokenizer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dwmtrain.config import load_config
    from dwmtrain.data.validation import REPORT, validation_set

    with tempfile.TemporaryDirectory() as d:
        raw = b"\n".join(lines) + b"\n"
        src = Path(d, f"target.{fmt}")
        if fmt.startswith("jsonl"):
            codec = fmt[5:]
            src.write_bytes(
                {"": raw, ".zst": zstandard.ZstdCompressor().compress(raw), ".gz": gzip.compress(raw)}[codec]
            )
        elif fmt in ("parquet", "arrow"):
            texts = [x.decode(errors="replace") if i % 3 else None for i, x in enumerate(lines)]
            table = pa.table({field.split(".")[0]: pa.array(texts, pa.string())})
            if fmt == "parquet":
                pq.write_table(table, src)
            else:
                with pa.ipc.new_stream(str(src), table.schema) as w:
                    w.write_table(table)
        else:  # a prepared directory, its index naming another tokenizer or broken
            src.mkdir()
            (src / "index.json").write_bytes(raw if cut is not None else json.dumps(
                {"seq_len": 16, "tokenizer": "other.model", "tokenizer_sha256": "0" * 64}).encode())  # fmt: skip
        if cut is not None and src.is_file():
            src.write_bytes(src.read_bytes()[: int(src.stat().st_size * cut)])
        cfg = load_config("tiny", [f"data.tokenizer={SP_MODEL}", "data.seq_len=16", "data.val_source=target",
                                   f"data.target.path={src}", f"data.target.text_field={field}",
                                   "meta.val_batch_size=2", "deepspeed.micro_batch_size=2",
                                   "deepspeed.global_batch_size=4"])  # fmt: skip
        v = outcome("target", lambda: validation_set(cfg, REPORT, Path(d, "cache")), names=(src,), keep=(src,))
        assert v is None or (v.n >= 2 and all(len(it.context) + len(it.target) <= 16 for it in v.items))


# ---------------------------------------------------------------------------------------------- tokenizers


def _hf_tokenizer_json() -> bytes:
    from dwmtrain.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as d:
        return (Path(load_tokenizer(str(SP_MODEL)).export_hf(f"{d}/hf")) / "tokenizer.json").read_bytes()


HF_JSON = None


@given(
    which=st.sampled_from([".model", ".json"]),
    how=st.sampled_from(["cut", "flip", "random", "json"]),
    at=st.floats(0, 1),
    data=st.binary(max_size=64),
    obj=st.recursive(
        st.one_of(st.none(), st.integers(), st.text(max_size=5)),
        lambda c: (
            st.dictionaries(st.sampled_from(["model", "vocab", "type", "added_tokens", "x"]), c, max_size=4)
            | st.lists(c, max_size=3)
        ),
        max_leaves=8,
    ),
)
@example(which=".json", how="random", at=0.0, data=b"", obj=None)  # tokenizers' bare Exception escaped
@example(which=".model", how="cut", at=0.5, data=b"", obj=None)  # sentencepiece's RuntimeError escaped
@fuzz(40)
def test_tokenizer_files_load_or_name_the_file(which, how, at, data, obj):
    from dwmtrain.data.tokenizer import load_tokenizer

    global HF_JSON
    if HF_JSON is None:
        HF_JSON = _hf_tokenizer_json()
    good = SP_MODEL.read_bytes() if which == ".model" else HF_JSON
    i = int(len(good) * at)
    bad = {
        "cut": good[:i],
        "flip": good[:i] + bytes([good[i % len(good)] ^ 0xFF]) + good[i + 1 :],
        "random": data,
        "json": json.dumps(obj).encode(),
    }[how]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "tok" + which)
        path.write_bytes(bad)
        tok = outcome("tokenizer", lambda: load_tokenizer(str(path)), names=(path,), keep=(path,))
        if tok is not None:  # it loaded: it must also tokenize, or say why not
            outcome("tokenizer", lambda: tok.encode("a test sentence"), names=(path,), keep=(path,))


# ---------------------------------------------------------------------------------------------- the config

#: YAML 1.1's traps and other values a hand-written config holds
SCALARS = st.sampled_from(
    [
        "no",
        "yes",
        "on",
        "off",
        "NO",
        "y",
        "~",
        "null",
        "1e3",
        "5e-4",
        "0x10",
        "010",
        "0o10",
        "1_000",
        ".inf",
        "-.inf",
        ".nan",
        "12:30",
        "2026-12-06",
        "'7'",
        '"x"',
        "[1, 2]",
        "{a: 1}",
        "[]",
        "{}",
        "",
        "tiny",
        "-1",
        "0",
        "3.5",
        "true",
        "True",
        "!!python/object:os.system",
        "&a 1",
        "*a",
        "|\n  x",
        "'unterminated",
    ]
)
SECTIONS = ["model", "data", "deepspeed", "optimizer", "stages", "meta", "dwm", "run", "base", "nope"]
FIELDS = [
    "preset",
    "seq_len",
    "train_data",
    "micro_batch_size",
    "lr",
    "num_stages",
    "total_steps",
    "mode",
    "steps",
    "temperature",
    "seed",
    "run_dir",
    "wandb",
    "boundaries",
    "zero_stage",
    "precision",
    "tokenizer",
    "x",
]


@given(
    doc=st.dictionaries(
        st.sampled_from(SECTIONS),
        st.one_of(SCALARS, st.dictionaries(st.sampled_from(FIELDS), SCALARS, max_size=4)),
        max_size=4,
    ),
    overrides=st.lists(
        st.tuples(st.sampled_from(SECTIONS), st.sampled_from(FIELDS), SCALARS, st.sampled_from(["=", "", "==", "=="])),
        max_size=3,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=30)),
)
@example(doc={}, overrides=[("model", "preset", "'unterminated", "=")], raw=None)  # a YAML error over 5 lines
@example(doc={"model": {"preset": "&a 1", "seq_len": "&a 1"}}, overrides=[], raw=None)
@example(doc={}, overrides=[], raw=b"model: \x80\x81")  # not UTF-8: UnicodeDecodeError escaped
@fuzz(150)
def test_configs_and_overrides_load_or_name_the_field(doc, overrides, raw):
    from dwmtrain.config import load_config

    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "run.yaml")
        if raw is not None:
            path.write_bytes(raw)
        else:
            text = "".join(
                f"{k}: {v}\n" if isinstance(v, str) else f"{k}:\n" + "".join(f"  {f}: {x}\n" for f, x in v.items())
                for k, v in doc.items()
            )
            path.write_text(text)
        ovs = [f"{s}.{f}{eq}{v}" for s, f, v, eq in overrides]
        names = (path, *(f"{s}.{f}" for s, f, _, _ in overrides), *doc, *(s for s, *_ in overrides), *ovs, "config")
        outcome("config", lambda: load_config(str(path), ovs), names=names, keep=(path,))
        code, err = cli("config", "--config", str(path), *ovs)
        assert_clean_exit(code, err, names)


# ---------------------------------------------------------------------------------------------- DWM files


def _dwm_file(d: Path):
    from dwmtrain.checkpoint.dwm_file import save_dwm
    from dwmtrain.models.dwm import DataWeightingModel, DWMArch

    arch = DWMArch("tiny", 512, 32)
    torch.manual_seed(0)
    path = d / "stage2.safetensors"
    save_dwm(DataWeightingModel(arch), path, stage=2, lm_step=10)
    return arch, path


SIDECAR_KEYS = ["sha256", "arch", "stage", "lm_step", "format", "tokenizer_sha256", "num_parameters", "x"]
JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)


@given(
    target=st.sampled_from(["tensors", "sidecar"]),
    how=st.sampled_from(["cut", "flip", "set", "drop", "raw"]),
    at=st.floats(0, 1),
    key=st.sampled_from(SIDECAR_KEYS),
    value=JSONISH,
    raw=st.binary(max_size=40),
)
@fuzz(60)
def test_dwm_files_and_sidecars_load_or_name_the_file(target, how, at, key, value, raw):
    from dwmtrain.checkpoint.dwm_file import load_dwm_state, meta_path

    with tempfile.TemporaryDirectory() as d:
        arch, path = _dwm_file(Path(d))
        f = path if target == "tensors" else meta_path(path)
        good = f.read_bytes()
        i = int(len(good) * at)
        if how == "cut":
            f.write_bytes(good[:i])
        elif how == "flip":
            f.write_bytes(good[:i] + bytes([good[i % len(good)] ^ 0x20]) + good[i + 1 :])
        elif how == "raw":
            f.write_bytes(raw)
        elif target == "sidecar":
            meta = json.loads(good)
            meta.pop(key, None) if how == "drop" else meta.__setitem__(key, value)
            f.write_text(json.dumps(meta))
        changed = f.read_bytes() != good
        got = outcome("dwm", lambda: load_dwm_state(path, arch), names=(path,), keep=(path, meta_path(path)))
        if got is not None and target == "tensors":
            assert not changed, "a changed tensor file was accepted"


# ---------------------------------------------------------------------------------------------- checkpoints

MARKER_FIELDS = [
    "step",
    "stage",
    "consumed_samples",
    "stage_boundary",
    "dwm",
    "config_sha256",
    "compat",
    "skipped_steps",
    "nonfinite_steps",
    "nonfinite_streak",
    "files",
    "x",
]


class RefusingEngine:
    """An engine whose load finds nothing: a marker that verifies goes as far as DeepSpeed's load."""

    def load_checkpoint(self, *a, **k):
        return None, None


@given(
    marker=st.one_of(
        st.dictionaries(st.sampled_from(MARKER_FIELDS), JSONISH, max_size=6),
        st.fixed_dictionaries(
            {"step": st.integers(-2, 10), "stage": st.integers(-1, 3), "consumed_samples": st.integers(-1, 99)},
            optional={"compat": JSONISH, "files": JSONISH, "dwm": JSONISH},
        ),
        JSONISH,
    ),
    raw=st.one_of(st.none(), st.binary(max_size=30)),
    latest=st.one_of(st.none(), JSONISH, st.binary(max_size=20)),
)
@example(marker={"step": 4.0, "stage": 1, "consumed_samples": 0}, raw=None, latest=None)  # ValueError escaped
@example(marker={"step": 4, "stage": 1, "consumed_samples": 0, "files": {"0": None}}, raw=None, latest=None)
@example(marker={}, raw=None, latest=b"\x80")  # latest.json not UTF-8; a ResumeError over several lines
@fuzz(80)
def test_checkpoint_markers_and_latest_resume_or_name_the_checkpoint(marker, raw, latest):
    from dwmtrain.checkpoint import Checkpointer
    from dwmtrain.distributed import Dist
    from dwmtrain.rundir import RunDir

    d1 = Dist(0, 1, 0, 1, torch.device("cpu"), "cpu")
    with tempfile.TemporaryDirectory() as d:
        rd = RunDir(d)
        rd.checkpoint("step0000004").mkdir(parents=True)
        rd.marker("step0000004").write_bytes(raw if raw is not None else json.dumps(marker).encode())
        if latest is not None:
            rd.latest.write_bytes(latest if isinstance(latest, bytes) else json.dumps(latest).encode())
        compat = {"world_size": 1, "zero_stage": 3, "tensor_parallel": 1}
        ck = Checkpointer(rd, d1, compat=compat, global_batch_size=8, keep_last=2, keep_stage=True)
        names = (rd.checkpoints, "step0000004")
        outcome("checkpoint", lambda: ck.resume(RefusingEngine()), names=names, keep=(rd.root,))
        code, err = cli("report", str(rd.root))
        assert_clean_exit(code, err, (rd.root, *names))


# ---------------------------------------------------------------------------------------------- job-array parts


@given(
    marker=st.one_of(JSONISH, st.binary(max_size=30)),
    which=st.sampled_from(["prepare", "select"]),
    name=st.sampled_from(["part-0000-of-0002", "part-0001-of-0002", "part-x-of-2", "part-0000-of-0003"]),
)
@example(marker=b"", which="prepare", name="part-0000-of-0002")  # JSONDecodeError escaped the merge
@fuzz(40)
def test_part_markers_are_reported_or_refused_by_name(marker, which, name):
    TRIED["part markers"] += 1
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "in.jsonl")
        src.write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(6)))
        out = Path(d, "out" if which == "prepare" else "sel.jsonl")
        parts = Path(str(out).removesuffix(".jsonl") + ".parts") / name
        parts.mkdir(parents=True)
        filename = "part.json" if which == "prepare" else "scan.json"
        (parts / filename).write_bytes(marker if isinstance(marker, bytes) else json.dumps(marker).encode())
        code, err = cli("data-status", str(out))
        assert_clean_exit(code, err, (parts, out))
        if which == "prepare":
            args = (
                "prepare-data",
                "--merge",
                "--input",
                str(src),
                "--tokenizer",
                str(SP_MODEL),
                "--out",
                str(out),
                "--seq-len",
                "16",
            )
        else:
            args = ("select", "random", "--merge", "--input", str(src), "--out", str(out), "--budget-docs", "2")
        code, err = cli(*args)
        assert_clean_exit(code, err, (parts, Path(str(out).removesuffix(".jsonl") + ".parts"), out))


# ---------------------------------------------------------------------------------------------- Megatron files, blends


@given(
    how=st.sampled_from(["bytes", "cut", "dtype", "count", "docs", "lengths", "bin"]),
    raw=st.binary(max_size=120),
    at=st.integers(0, 400),
    value=st.integers(0, 2**64 - 1),
)
@example(how="count", raw=b"", at=0, value=2**63)  # a count whose arrays would overflow the file
@fuzz(60)
def test_megatron_indexes_read_or_name_the_file(how, raw, at, value):
    """Random headers, counts, dtypes, lengths and truncations of a file Megatron-Core's writer wrote."""
    import struct

    import numpy as np

    from dwmtrain.data.megatron import MegatronTokens

    from .test_mixture import write_megatron

    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d, "web_text_document")
        write_megatron(prefix, [np.arange(1, 40), np.arange(7, 90), np.arange(3, 30)])
        idx, binf = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
        good = bytearray(idx.read_bytes())
        if how == "bytes":
            good = bytearray(raw)
        elif how == "cut":
            good = good[: at % (len(good) + 1)]
        elif how == "dtype":
            good[17] = value % 256
        elif how in ("count", "docs"):
            struct.pack_into("<Q", good, 18 if how == "count" else 26, value)
        elif how == "lengths":
            struct.pack_into("<i", good, 34 + 4 * (at % 3), value % 2**31 - (value % 7 == 0) * 2**31)
        else:
            binf.write_bytes(binf.read_bytes()[: at % 200])
        idx.write_bytes(bytes(good))
        m = outcome("megatron files", lambda: MegatronTokens(prefix, 16, 4096), names=(idx, binf), keep=(Path(d),))
        if m is not None:
            for j in range(len(m)):
                outcome("megatron files", lambda j=j: m[j], names=(binf,))


@given(weights=st.lists(JSONISH, min_size=1, max_size=4), names=st.lists(st.sampled_from(["a", "b", ""]), max_size=4))
@fuzz(150)
def test_blend_weights_load_or_name_the_field(weights, names):
    """data.sources with any weights and names: a config, or one line naming data.sources."""
    from dwmtrain.config import load_config

    srcs = [{"path": f"/data/s{i}", "weight": w, **({"name": names[i]} if i < len(names) else {})}
            for i, w in enumerate(weights)]  # fmt: skip
    cfg = outcome("blend weights", lambda: load_config(None, [f"data.sources={json.dumps(srcs)}"]),
                  names=("data.sources",))  # fmt: skip
    if cfg is not None:
        from dwmtrain.data.mixture import BlendOrder

        w = [s.weight for s in cfg.data.sources]
        assert all(x >= 0 for x in w) and sum(w) > 0 and len({s.name for s in cfg.data.sources}) == len(w)
        assert sum(BlendOrder([3] * len(w), w, 0).drawn(100)) == 100
