"""Does the method learn? tools/noise_probe.py at CI size: the learned DWM separates clean documents from two
kinds of corruption (token-shuffled and random-token documents, mixed in the same corpus): ROC-AUC >= 0.7 for
clean against all corrupted held-out sequences and >= 0.6 against each kind (chance: 0.5)."""

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
            # each kind. Measured here, the reward part whole clean documents (the report part the others), seeds
            # 0/1/2: all 0.930/0.798/0.886, worst kind 0.927/0.761/0.880; the random kind swings by up to 0.3
            # with which documents the meta job is rewarded on (docs/noise_probe.md)
            "0.6",
            "--corruption",
            "shuffle,random",
            "--steps",
            "1000",  # a shorter uniform stage than the default 1500: about 150 s, not 255
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
    assert res["auc_by_kind"]["all"] >= 0.7 and min(res["auc_by_kind"].values()) >= 0.6 and res["corrupted"] >= 100
