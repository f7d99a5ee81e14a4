"""Every outcome of a training job and a meta-update job ends with its exit code on every rank, with the machine
loaded (``tools/exit_stress.py``: two jobs of two ranks at once, beside the other test worker): done 0, the
project's error 2 (on every rank, or on one: the other names it), a bug 1 with its traceback, a stage boundary
with an external meta job 3, SIGUSR1 on one rank or all 4, a killed rank (the survivor 2), non-finite losses 2;
the meta job done 0, failed 2, a rank lost 2. No rank may abort at exit. (The long counts: docs/design.md.)"""

import json
import subprocess
import sys

from ..helpers import REPO


def test_every_outcome_ends_with_its_exit_code_on_every_rank(tmp_path, data64):
    work = tmp_path / "exits"
    cmd = [sys.executable, str(REPO / "tools" / "exit_stress.py"), "--repeat", "1", "--concurrency", "2",
           "--work", str(work), "--data", str(data64), "--budget-s", "900"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    res = json.loads((work / "exit_stress.json").read_text()) if (work / "exit_stress.json").is_file() else {}
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-3000:]
    outcomes = {r["outcome"] for r in res["results"]}
    assert len(outcomes) == 12 and all(not r["wrong"] for r in res["results"]), res
    assert "12 of 12 jobs right (24 ranks)" in p.stdout
