"""Does the method learn? tools/noise_probe.py at CI size: the learned DWM separates clean from shuffled."""

import json
import subprocess
import sys

import pytest

from .helpers import REPO, env

pytestmark = pytest.mark.slow


def test_learned_dwm_downweights_token_shuffled_documents(tmp_path):
    work = tmp_path / "noise"
    p = subprocess.run(
        [sys.executable, str(REPO / "tools" / "noise_probe.py"), "--work", str(work), "--min-auc", "0.8"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(p.stdout[-2000:])
    res = json.loads((work / "result.json").read_text())
    print(f"noise probe ROC-AUC {res['auc']:.3f} ({res['clean']} clean, {res['corrupted']} corrupted held-out)")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert res["auc"] >= 0.8 and res["corrupted"] >= 30
