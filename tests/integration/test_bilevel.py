"""Stage boundaries with the bi-level meta-update: 2 training ranks, a separate meta job, broadcast."""

import pytest

from dwmtrain.models.dwm import read_dwm_meta

from .helpers import by_step, records

pytestmark = pytest.mark.slow


def test_three_stages_two_meta_updates_and_broadcast(bilevel_reference):
    ref, _ = bilevel_reference
    a = by_step(ref / "metrics.jsonl")
    m2, m3 = (
        read_dwm_meta(ref / "dwm" / "stage2.safetensors"),
        read_dwm_meta(ref / "dwm" / "stage3.safetensors"),
    )
    assert (m2["stage"], m2["lm_step"], m3["stage"], m3["lm_step"]) == (2, 4, 3, 8)
    assert [a[s]["dwm"] for s in (4, 5, 8, 9)] == [
        "uniform",
        f"stage2:{m2['sha256'][:12]}",
        f"stage2:{m2['sha256'][:12]}",
        f"stage3:{m3['sha256'][:12]}",
    ]
    assert all(a[s]["w_min"] < 1 < a[s]["w_max"] for s in range(9, 13))
    log3 = (ref / "meta" / "stage3.log").read_text()
    assert "continued from" in log3 and "--nproc_per_node=2" in log3
    meta_recs = records(ref / "meta" / "stage2.jsonl")
    assert len(meta_recs) == 3
    for k in ("val_loss_theta", "val_loss_theta_star", "weight_entropy", "grad_norm"):
        assert k in meta_recs[0]
    assert "meta-update job" in (ref / "launch.out").read_text()
