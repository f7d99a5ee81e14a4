"""Shared fixtures: the bundled corpus, its tokenizer, and a small prepared dataset."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import zstandard

from .helpers import REPO

CORPUS = REPO / "dwmtrain" / "data" / "corpus"
SP_MODEL = CORPUS / "sample_sp4096.model"
LAMBADA = CORPUS / "lambada_sample.jsonl"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def corpus_records(n: int | None = None) -> list[dict]:
    raw = zstandard.ZstdDecompressor().stream_reader(open(CORPUS / "sample.jsonl.zst", "rb"))
    out = []
    for line in io.TextIOWrapper(raw, encoding="utf-8"):
        out.append(json.loads(line))
        if n is not None and len(out) >= n:
            break
    return out


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture(scope="session")
def sp_model() -> str:
    return str(SP_MODEL)


@pytest.fixture(scope="session")
def small_jsonl(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("jsonl") / "part.jsonl", corpus_records(400))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, small_jsonl, sp_model) -> Path:
    from dwmtrain.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prep") / "data"
    prepare_data(
        [str(small_jsonl)],
        sp_model,
        str(out),
        seq_len=64,
        workers=2,
        heldout_fraction=0.05,
        shard_sequences=500,
        progress=False,
    )
    return out


@pytest.fixture(autouse=True)
def _fresh_logging():
    """Each test starts with dwmtrain's loggers as a fresh process has them: an entry point a test calls in process
    configures them (``dwmtrain.log.setup_logging``), which would otherwise reach the tests after it."""
    import logging

    yield
    log = logging.getLogger("dwmtrain")
    log.handlers.clear()
    log.propagate, log.level = True, logging.NOTSET


@pytest.fixture(scope="session", autouse=True)
def _one_thread_per_worker():
    """With pytest-xdist's workers, one torch thread each: N workers on N cores, each also starting launches whose
    ranks run one thread each. Torch's default (every core) in every worker oversubscribes the cores, and its
    OpenMP threads spin while they wait: a unit test beside a 2-rank launch ran 18 times slower than alone."""
    if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
        import torch

        torch.set_num_threads(1)
    yield
