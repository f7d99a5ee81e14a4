"""``dwmtrain report`` from a run's records alone: every validation set by name, and the per-domain weights by
stage as a table and a figure."""

from __future__ import annotations

import json

import pytest

from dwmtrain.report import domain_weights, summarize


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _step(step, stage, **extra):
    return {"step": step, "stage": stage, "loss": 5.0, "loss_unweighted": 5.1, "w_entropy": 2.0, "w_ess": 7.9,
            "w_min": 0.8, "w_max": 1.2, "dwm": "uniform" if stage == 1 else f"stage{stage}:abc", **extra}  # fmt: skip


def test_the_report_shows_every_validation_set_and_the_domains_weights(tmp_path):
    from PIL import Image

    doms = [{"code": 1.0, "web": 1.0}, {"code": 1.0}, {"code": 1.4, "web": 0.7}, {"code": 1.2, "web": 0.9}]
    steps = [_step(i + 1, 1 + i // 2, **{f"w_dom/{k}": v for k, v in d.items()}) for i, d in enumerate(doms)]
    _write(tmp_path / "metrics.jsonl", steps)
    evals = [{"step": k * 2, "stage": k, "val_loss": 6.0 - k, "val_acc": 0.1, "val_loss/target": 6.0 - k,
              "val_acc/target": 0.1, "val_loss/lambada": 7.0 - k / 10, "val_acc/lambada": 0.0}
             for k in (1, 2)]  # fmt: skip
    _write(tmp_path / "eval.jsonl", evals)
    out = summarize(tmp_path)
    head = next(ln for ln in out.splitlines() if ln.startswith("stage  steps"))
    assert "val_loss" in head and "loss:lambada" in head and "loss:target" not in head  # target is val_loss itself
    row2 = next(ln for ln in out.splitlines() if ln.startswith("    2"))
    assert "4.0000" in row2 and "6.8000" in row2
    got = domain_weights(steps)
    assert got[1] == pytest.approx({"code": 1.0, "web": 1.0}) and got[2] == pytest.approx({"code": 1.3, "web": 0.8})
    assert "mean weight by domain" in out and "1.300" in out and "0.800" in out
    png = tmp_path / "analysis" / "domain_weights.png"
    assert str(png) in out and Image.open(png).size[0] > 200


def test_a_run_without_domains_or_other_sets_reports_as_before(tmp_path):
    _write(tmp_path / "metrics.jsonl", [_step(1, 1), _step(2, 2)])
    out = summarize(tmp_path)
    assert "mean weight by domain" not in out and "loss:" not in out.splitlines()[2]
    assert not (tmp_path / "analysis").exists()
