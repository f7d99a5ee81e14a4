"""A run steered toward the user's own target set, on 2 ranks through a stage boundary: the meta job rewarded on
the target's reward part only (with meta.v=boundary and the AdamW lookahead), validation reporting the target's
report part beside LAMBADA and the held-out split, the mean weight of each domain at every logged step, and a rerun
with another target refused."""

import json
import sys

from dwmtrain.checkpoint.dwm_file import read_dwm_meta
from dwmtrain.rundir import RunDir

from ..conftest import corpus_records, write_jsonl
from ..helpers import wandb_history, wandb_offline_runs
from .helpers import REPO, pretrain_cmd, records, run, short_run


def test_a_target_set_steers_the_meta_job_and_every_set_is_reported(tmp_path, data64):
    docs = [r for r in corpus_records() if r["meta"]["redpajama_set_name"] == "python_reference"][:60]
    target = write_jsonl(tmp_path / "target.jsonl", docs)
    rd = RunDir(tmp_path / "run")
    args = short_run(data64, "stages.total_steps=6", "stages.num_stages=2", "meta.mode=bilevel", "meta.nproc=2",
                     "meta.steps=2", "meta.v=boundary", "meta.lookahead=adam", "data.val_source=target",
                     f"data.target.path={target}",
                     "data.report_sets=[lambada,heldout]", "run.log_every=1", "run.wandb.mode=offline")  # fmt: skip
    run(pretrain_cmd(rd.root, args))
    split = json.loads(rd.validation_split.read_text())
    assert split["source"] == "target" and split["documents"] == len(docs)  # cut into examples of 64 tokens
    assert split["reward_examples"] + split["report_examples"] == split["examples"] > len(docs)
    said = f"target: {split['reward_examples']} of {split['examples']} items (reward part)"
    assert said in rd.meta_log(2).read_text()
    # meta.v=boundary: v once over the whole reward part, from both processes' shares
    assert f"v over the whole reward part ({split['reward_examples']} examples" in rd.meta_log(2).read_text()
    assert all("val_loss_theta_star" not in r and r["grad_norm"] > 0 for r in records(rd.meta_records(2)))
    # meta.lookahead=adam: the boundary checkpoint's AdamW moments, read through a universal copy made and removed
    assert "adam lookahead" in rd.meta_log(2).read_text() and not (rd.checkpoints / "universal").exists()
    fitted = read_dwm_meta(rd.dwm(2))
    assert fitted["lookahead"] == "adam" and fitted["timings"]["load_moments_s"] > 0
    applied = json.loads((rd.meta_dir / "stage2.pause.json").read_text())["applied_check"]
    assert applied["ok"] and applied["micro_batches"] == 4 and applied["max_abs_diff"] < 1e-4  # fp32 both sides
    for e in records(rd.evals):  # every set by name; val_loss is the target's report part
        assert {"val_loss/target", "val_loss/lambada", "val_loss/heldout"} <= set(e)
        assert (
            e["val_loss"] == e["val_loss/target"]
            and len({e[f"val_loss/{n}"] for n in ("target", "lambada", "heldout")}) == 3
        )
    steps = records(rd.metrics)
    names = json.loads((data64 / "index.json").read_text())["domains"]
    for r in steps:
        doms = {k[6:]: v for k, v in r.items() if k.startswith("w_dom/")}
        assert doms and set(doms) <= set(names), r
        if r["stage"] == 1:
            assert all(abs(v - 1) < 1e-6 for v in doms.values())  # uniform
    assert any(abs(v - 1) > 1e-4 for r in steps if r["stage"] == 2 for k, v in r.items() if k.startswith("w_dom/"))
    # the same figures in TensorBoard and W&B
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(rd.root / "tensorboard")).Reload().Tags()["scalars"]
    assert {"eval/val_loss/target", "eval/val_loss/heldout", "train/w_dom/python_reference"} <= set(tb), tb
    ((_, wb),) = wandb_offline_runs(rd.root)
    keys = {k for row in wandb_history(wb) for k in row}
    assert {"eval/val_loss/lambada", "train/w_dom/python_reference"} <= keys, sorted(keys)
    from dwmtrain.report import summarize

    out = summarize(rd.root)
    assert "loss:lambada" in out and "loss:heldout" in out and "mean weight by domain" in out
    # another target under the same run directory: refused before any step, in one line, nothing changed
    write_jsonl(target, docs[:50])
    before = {p: p.stat().st_mtime_ns for p in rd.root.rglob("*") if p.is_file() and "validation" not in p.parts}
    p = run(pretrain_cmd(rd.root, args), check=False)
    assert p.returncode == 2 and "a run keeps its target and split" in p.stdout + p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stdout + p.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_the_meta_diagnostic_scores_every_estimator_and_the_fitted_dwm_against_the_true_effect(tmp_path, data64):
    """tools/meta_diagnostic.py at tiny size on a real boundary checkpoint (ZeRO-3 shards over 2 ranks): the truth
    through torch's AdamW from the checkpoint's moments, every estimator and the DWM fitted there scored against it.
    The DWM reads the LM's forward (dwm.features=lm: no backbone, the LM's own hidden states; dwm.loss_feature: its
    per-sample losses) and its strength is chosen by rollouts (meta.strength)."""
    rd = RunDir(tmp_path / "run")
    args = short_run(data64, "stages.total_steps=4", "stages.num_stages=2", "meta.mode=bilevel", "meta.steps=2",
                     "dwm.features=lm", "dwm.loss_feature=true", "meta.strength=[0,1,3]",
                     "meta.strength_steps=2")  # fmt: skip
    run(pretrain_cmd(rd.root, args))
    # meta.strength: the scale whose 2-step rollout scored best on the reward part, applied to the fitted DWM
    chose = read_dwm_meta(rd.dwm(2))["strength"]
    assert (
        chose["scales"] == [0, 1, 3] and chose["chosen"] == chose["scales"][chose["reward"].index(min(chose["reward"]))]
    )
    assert f"strength (logit scale) x{chose['chosen']:g} chosen by 2-step rollouts" in rd.meta_log(2).read_text()
    # fitted on the LM's losses and states, applied to those of the training forward: the same weights
    applied = json.loads((rd.meta_dir / "stage2.pause.json").read_text())["applied_check"]
    arch = read_dwm_meta(rd.dwm(2))["arch"]
    assert applied["ok"] and applied["max_abs_diff"] < 1e-4 and arch["loss_feature"] and arch["features"] == "lm"
    assert any(r["stage"] == 2 and r["w_max"] > 1.0001 for r in records(rd.metrics))
    out = tmp_path / "diag.json"
    p = run([sys.executable, str(REPO / "tools" / "meta_diagnostic.py"), str(rd.root), "--samples", "16",
             "--reward-examples", "8", "--k-steps", "2", "--out", str(out)])  # fmt: skip
    (res,) = json.loads(out.read_text())
    assert res["step"] == 2 and res["samples"] == 16 and res["adam_step"] == 2 and res["dwm_fitted_here"] == [2]
    corr = res["correlations"]
    assert set(corr) == {"true_effect", "sgd", "adam", "neg_loss", "dwm_stage2"}
    assert corr["true_effect"]["spearman"] == 1.0 and res["true_effect_std"] > 0
    assert all(-1 <= c["spearman"] <= 1 for c in corr.values())
    assert "| step 2 | dwm_stage2 (fitted here) |" in p.stdout
    assert not (rd.checkpoints / "universal").exists()  # the moments' universal copy is not left behind
