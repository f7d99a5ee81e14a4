"""Stage boundaries with the bi-level meta-update: 2 training ranks, a separate meta job, broadcast."""

import pytest

from dwmtrain.checkpoint.dwm_file import read_dwm_meta

from .helpers import by_step, records, run

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


def _refit_stage2(ref, out, *overrides: str) -> dict:
    """The reference run's stage-2 meta job rerun by hand in a copy of its directory, with ``overrides``: the
    fitted DWM's tensors and metadata."""
    import shutil

    from dwmtrain.checkpoint.dwm_file import load_dwm_state
    from dwmtrain.stages.meta_job import meta_job_command

    if not out.exists():
        shutil.copytree(ref, out, ignore=shutil.ignore_patterns("step0000008", "step0000012", "dwm", "meta"))
    (out / "dwm").mkdir(exist_ok=True)
    (out / "dwm" / "stage2.safetensors").unlink(missing_ok=True)
    run([*meta_job_command(out, 2, "step0000004", 2), *overrides])
    _, state, meta = load_dwm_state(out / "dwm" / "stage2.safetensors")
    return {"state": state, "sha256": meta["sha256"]}


def test_the_meta_jobs_memory_savings_fit_the_same_dwm(bilevel_reference, tmp_path):
    """The meta job's chunked losses (no [B, T, V] logits; the validation head only at the labelled positions),
    its recomputed layers (model.activation_checkpointing) and its held-in-the-training-dtype LM (on CPU: fp32)
    against the full-logits path, on the reference run's first boundary."""
    ref, _ = bilevel_reference
    want = read_dwm_meta(ref / "dwm" / "stage2.safetensors")["sha256"]
    recompute = _refit_stage2(ref, tmp_path / "again", "model.activation_checkpointing=1", "meta.lm_dtype=train")
    assert recompute["sha256"] == want  # rerun by hand: the same file; recomputation is exact, CPU's dtype is fp32
    chunked = records(tmp_path / "again" / "meta" / "stage2.jsonl")
    full = _refit_stage2(ref, tmp_path / "again", "model.loss_chunk_tokens=0")  # the full-logits path
    # The same fit to fp32 rounding (tests/test_metagrad.py holds the paths equal in fp64): the losses to 1e-5, the
    # DWM's gradient norm to 1e-3, as the fd mode divides differences of losses by 2 eps, which magnifies their
    # last bits (the fused and the logits path round differently). The weights are not compared elementwise:
    # Adam's first steps move each by about lr times its gradient's sign, which rounding may flip near 0.
    assert full["sha256"] != want  # the full-logits path did run
    for a, b in zip(records(tmp_path / "again" / "meta" / "stage2.jsonl"), chunked, strict=True):
        for k, rel in (("val_loss_theta_star", 1e-5), ("weight_entropy", 1e-5), ("grad_norm", 1e-3)):
            assert a[k] == pytest.approx(b[k], rel=rel), (k, a, b)
