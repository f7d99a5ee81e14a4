"""Fixtures of the integration tests."""

import pytest

from dwmtrain.data.prepare import prepare_data

from ..conftest import CORPUS


@pytest.fixture(scope="session")
def data64(tmp_path_factory):
    """The bundled corpus prepared at seq_len 64, shared by every launch."""
    out = tmp_path_factory.mktemp("d") / "sample-64"
    prepare_data(
        [str(CORPUS / "sample.jsonl.zst")],
        str(CORPUS / "sample_sp4096.model"),
        str(out),
        seq_len=64,
        workers=2,
        progress=False,
    )
    return out
