"""Fixtures of the integration tests; every test here is `slow` (real launches), so `make test-fast` skips them."""

from pathlib import Path

import pytest

from dwmtrain.data.prepare import prepare_data

from ..conftest import CORPUS
from .helpers import built_once, pretrain_cmd, run, short_run

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the tests under tests/integration `slow`. A conftest hook sees every collected item, not only this
    folder's: the others are left as they are."""
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data64(tmp_path_factory):
    """The bundled corpus prepared at seq_len 64, shared by every launch."""
    return built_once(tmp_path_factory, "data64", _prepare64) / "sample-64"


def _prepare64(out: Path) -> None:
    prepare_data([str(CORPUS / "sample.jsonl.zst")], str(CORPUS / "sample_sp4096.model"), str(out / "sample-64"),
                 seq_len=64, workers=2, progress=False)  # fmt: skip


@pytest.fixture(scope="session")
def bilevel_reference(tmp_path_factory, data64):
    """An uninterrupted 12-step, 3-stage bilevel run on 2 ranks (meta jobs at steps 4 and 8): what a run
    interrupted in any way must equal. Returns (run_dir, overrides)."""
    args = short_run(data64, "meta.mode=bilevel", "meta.nproc=2", "meta.steps=3")

    def build(out: Path) -> None:
        p = run(pretrain_cmd(out / "ref", args))
        (out / "ref" / "launch.out").write_text(p.stdout + p.stderr)

    return built_once(tmp_path_factory, "bilevel", build) / "ref", args
