"""Hugging Face models as the LM: continued pretraining from an exported checkpoint (real 2-rank launches)."""

import json
import sys

import pytest
import torch

from dwmtrain.rundir import RunDir

from .helpers import by_step, pretrain_cmd, run, short_run

pytestmark = pytest.mark.slow


def _first_batch_loss(hf_dir, data_dir, seed: int, global_batch: int) -> float:
    """The mean per-sample loss of the exported model on a run's first global batch (its data order)."""
    from transformers import AutoModelForCausalLM

    from dwmtrain.data.dataset import GlobalOrder, TokenDataset
    from dwmtrain.models.loss import per_sample_loss

    data = TokenDataset(data_dir)
    order = GlobalOrder(len(data), seed)
    x = data.batch([order[g] for g in range(global_batch)])
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # no trust_remote_code
    with torch.no_grad():
        return per_sample_loss(model(input_ids=x).logits, x).mean().item()


def test_continued_pretraining_starts_from_the_exported_weights_and_a_resume_never_rereads_them(tmp_path, data64):
    first, hf, cont = tmp_path / "first", tmp_path / "hf", tmp_path / "cont"
    args = short_run(data64, "meta.mode=none", "stages.total_steps=4", "stages.num_stages=1")
    run(pretrain_cmd(first, args))
    run([sys.executable, "-m", "dwmtrain.cli", "export", str(first), "--out", str(hf)])
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 4096

    cont_args = [*args, f"model.init_from={hf}", "run.seed=77"]  # another data order than the first run's
    run(pretrain_cmd(cont, cont_args))
    step1 = by_step(cont / "metrics.jsonl")[1]["loss"]
    want = _first_batch_loss(hf, data64, 77, 32)
    assert step1 == pytest.approx(want, rel=1e-5), (step1, want)
    fresh = by_step(first / "metrics.jsonl")[1]["loss"]
    assert abs(step1 - fresh) > 0.1  # the exported model, not a fresh one, took the first step

    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a read now would fail: a resume must not read them
    p = run(pretrain_cmd(cont, [*cont_args, "stages.total_steps=6"]))
    assert f"resumed from {RunDir(cont).checkpoint('step0000004')}" in p.stdout + p.stderr
    assert max(by_step(cont / "metrics.jsonl")) == 6

    p = run(pretrain_cmd(tmp_path / "again", cont_args), check=False)  # a fresh start does read them
    assert p.returncode == 2 and "model.init_from=" in p.stderr and "model.safetensors cannot be read" in p.stderr
