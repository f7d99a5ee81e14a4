"""W&B tracking (``run.wandb``) with the real wandb library in offline mode: no network, no account."""

from __future__ import annotations

import json

import pytest

from dwmtrain.config import load_config
from dwmtrain.rundir import RunDir

from .helpers import wandb_history, wandb_offline_runs


def _writer(rd: RunDir, resume_step=None, **wb):
    from dwmtrain.train.metrics import MetricsWriter

    over = [f"run.run_dir={rd.root}", "run.name=wb-test", "run.wandb.mode=offline",
            *(f"run.wandb.{k}={v}" for k, v in wb.items())]  # fmt: skip
    return MetricsWriter(rd, True, False, resume_step, load_config("tiny", over))


@pytest.fixture
def own_wandb_service(monkeypatch):
    """W&B starts one service per process and names it in the environment; it is stopped after the test, so
    no process a later test starts attaches to it."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    import wandb

    wandb.teardown()
    monkeypatch.delenv("WANDB_SERVICE", raising=False)


def test_records_config_boundaries_and_meta_logs_reach_an_offline_run_and_a_rerun_continues_it(
    tmp_path, own_wandb_service
):
    rd = RunDir(tmp_path / "run")
    rd.meta_dir.mkdir(parents=True)
    rd.meta_records(2).write_text(json.dumps({"meta_step": 1, "val_loss_theta_star": 8.1}) + "\n"
                                  + json.dumps({"meta_step": 2, "val_loss_theta_star": 8.0}) + "\n")  # fmt: skip
    rd.meta_log(2).write_text("[meta] stage 2: ...\n")
    with _writer(rd) as m:
        for s in (1, 2, 3, 4):
            m.log({"step": s, "stage": 1, "loss": 9.0 - s, "dwm": "uniform"})
        m.log({"step": 4, "stage": 1, "val_loss": 7.5}, kind="eval")
        m.boundary(4, 2, {"meta_job_s": 3.0, "broadcast_s": 0.1, "total_s": 3.1})
    with pytest.raises(RuntimeError), _writer(rd, resume_step=3) as m:  # the rerun resumes at step 3, then fails
        m.log({"step": 4, "stage": 1, "loss": 4.9})
        raise RuntimeError("a crash")

    (first_id, first), (second_id, second) = wandb_offline_runs(rd.root)
    assert first_id == second_id == rd.root.joinpath("wandb_id").read_text().strip()  # the same W&B run
    rows = wandb_history(first)
    assert [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r] == [(s, 9.0 - s) for s in (1, 2, 3, 4)]
    assert not any("train/dwm" in r for r in rows)  # text fields stay in metrics.jsonl
    assert any(r.get("eval/val_loss") == 7.5 and r["step"] == 4 for r in rows)
    assert any(r.get("boundary/meta_job_s") == 3.0 and r.get("boundary/stage") == 2 for r in rows)
    assert any(r.get("meta/val_loss_theta_star") == 8.0 and r.get("meta/meta_steps") == 2 for r in rows)
    runs = [r.run for r in first if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "wb-test" and runs[0].project == "dwmtrain"
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}  # the resolved config, whole
    assert config["run"]["name"] == "wb-test" and config["model"]["preset"] == "tiny"
    assert config["deepspeed"]["zero_stage"] == 3 and config["run"]["wandb"]["mode"] == "offline"
    saved = sorted(p.name for p in (rd.root / "wandb").glob("offline-run-*/files/meta/*"))
    assert saved == ["stage2.jsonl", "stage2.log"]
    # the rerun sends the records it keeps (steps 1-3) again, then its own
    assert [r["train/loss"] for r in wandb_history(second) if "train/loss" in r] == [8.0, 7.0, 6.0, 4.9]
    exits = [r.exit.exit_code for r in second if r.WhichOneof("record_type") == "exit"]
    assert exits == [1]  # the failed rerun is marked failed; a planned stop or a finished run exits 0


def test_the_modes_are_w_and_bs_own():
    from dwmtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="run.wandb.mode='on': must be one of disabled, online, offline"):
        load_config("tiny", ["run.wandb.mode='on'"])
    assert load_config("tiny", []).run.wandb.mode == "disabled"
