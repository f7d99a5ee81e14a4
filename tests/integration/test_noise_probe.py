"""Does the method learn? tools/noise_probe.py at CI size: the learned DWM separates clean documents from two
kinds of corruption (token-shuffled and random-token documents, mixed in the same corpus) with AUC >= 0.8 each."""

import json
import subprocess
import sys

import pytest

from .helpers import REPO, env

pytestmark = pytest.mark.slow


def test_learned_dwm_downweights_two_kinds_of_corrupted_documents(tmp_path):
    work = tmp_path / "noise"
    p = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "noise_probe.py"),
            "--work",
            str(work),
            "--min-auc",
            "0.8",
            "--corruption",
            "shuffle,random",
            "--steps",
            "1000",  # measured here: AUC random 0.884, shuffle 0.860 (1500 steps: 0.824, 0.882) in 150 s, not 255
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(p.stdout[-2000:])
    res = json.loads((work / "result.json").read_text())
    print(f"noise probe ROC-AUC {res['auc_by_kind']} ({res['clean']} clean, {res['corrupted']} corrupted held-out)")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert set(res["auc_by_kind"]) == {"all", "shuffle", "random"}
    assert min(res["auc_by_kind"].values()) >= 0.8 and res["corrupted"] >= 30
