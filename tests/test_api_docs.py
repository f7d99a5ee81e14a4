"""docs/api.md's examples run as written, in order, in one namespace (from the repository root; what they write
goes to a temporary directory instead of runs/api-example)."""

import contextlib
import io
import os
import re

from .helpers import REPO


def test_every_example_of_the_api_page_runs(tmp_path):
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 6, "setup, meta-update, score, loss, Trainer, errors"
    namespace: dict = {}
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(REPO)  # the examples name the bundled tokenizer by its path in the repository
    try:
        with contextlib.redirect_stdout(out):
            for i, code in enumerate(blocks):
                code = code.replace("runs/api-example", str(tmp_path / "api-example"))
                exec(compile(code, f"docs/api.md block {i + 1}", "exec"), namespace)  # noqa: S102 - the page's code
    finally:
        os.chdir(cwd)
    printed = out.getvalue()
    assert printed.splitlines()[0] == "2 8"  # the meta-update's stage and micro-batch, as the page says
    assert "fitted on micro-batches of 8" in printed  # the errors section caught and printed the one line
    assert (tmp_path / "api-example" / "trainer" / "dwm" / "stage2.safetensors").is_file()
