"""The paper's comparisons end to end on the tiny twins: select, train both arms, export, lm-eval, tables,
Figure 2, preference analysis, and the transfer / static-DWM arms. Every step is the `dwmtrain` command a
user types (docs/experiments.md), run from a scratch directory that holds the twins' relative paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dwmtrain.config import bundled_configs, load_config
from dwmtrain.rundir import RunDir

from ..conftest import CORPUS, REPO, SP_MODEL
from .helpers import by_step, records

DWMTRAIN = str(Path(sys.executable).parent / "dwmtrain")
TASK_DATA = REPO / "tests" / "data" / "lmeval"
# short: 3 stages of one optimizer step each (the twins' own modes; their stage counts pass the preflight test),
# one rank, a 2-step meta-update
SHORT = [
    "stages.total_steps=3",
    "stages.num_stages=3",
    "deepspeed.global_batch_size=8",
    "meta.nproc=1",
    "meta.steps=2",
    "run.threads_per_rank=1",
    "run.checkpoint_every=100",
]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("experiments")]  # one worker builds the arms, once


def dwm(work: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    p = subprocess.run([DWMTRAIN, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise AssertionError(f"dwmtrain {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def train(work: Path, name: str, *extra: str) -> Path:
    run = f"runs/exp/tiny-{name}"
    port = str(29400 + (os.getpid() + hash(name)) % 500)
    dwm(work, "train", "--nproc", "1", "--master-port", port, "--config", f"experiments/tiny/{name}", "--run-dir", run,
        *SHORT, *extra)  # fmt: skip
    return work / run


def image_has_content(path: Path) -> None:
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 300, img.shape
    assert img[..., :3].std() > 0.05, f"{path} is (nearly) one flat colour"


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    """Selections from the bundled corpus, then the RANDOM and RANDOM+DWM arms (3 stages each)."""
    work = tmp_path_factory.mktemp("exp")
    corpus = str(CORPUS / "sample.jsonl.zst")
    sel = work / "runs" / "exp" / "select"
    dwm(work, "select", "random", "--input", corpus, "--out", str(sel / "random.jsonl.zst"), "--budget-docs", "1500")
    dwm(work, "select", "dsir", "--input", corpus, "--out", str(sel / "dsir.jsonl.zst"), "--budget-docs", "1500",
        "--target-domains", "python_reference,licenses")  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_tiny_rater.py"), "--out", str(work / "rater")], check=True
    )
    dwm(work, "select", "qurating", "--input", corpus, "--out", str(sel / "qurating.jsonl.zst"), "--budget-docs",
        "1500", "--rater", str(work / "rater"), "--rater-max-length", "64")  # fmt: skip
    return work, train(work, "random"), train(work, "random_dwm")


def test_dsir_selection_moves_toward_its_target_domains(exp):
    work, _, _ = exp
    rep = json.loads((work / "runs/exp/select/dsir.report.json").read_text())
    text = json.dumps(rep)
    pool, chosen = rep["domains_pool"], rep["domains_selected"]
    share = lambda d, k: sum(d[x]["documents"] for x in k if x in d) / sum(v["documents"] for v in d.values())  # noqa: E731
    target = ("python_reference", "licenses")
    assert share(chosen, target) > 3 * share(pool, target), text


def test_every_tiny_twin_passes_the_preflight(exp, monkeypatch, capsys):
    from dwmtrain.launch.pretrain import main as pretrain

    work, _, _ = exp
    monkeypatch.chdir(work)  # the twins name runs/exp/... relative to where they are launched
    twins = [n for n in bundled_configs() if n.startswith("experiments/tiny/")]
    paper = {n.replace("/paper/", "/tiny/") for n in bundled_configs() if n.startswith("experiments/paper/")}
    assert len(twins) >= 19 and set(twins) == paper  # every paper-scale preset has its twin
    src = RunDir(work / "runs/exp/tiny-random_dwm")
    for name in twins:
        meta = load_config(name).meta  # transfer / static / warm-started arms: fit them to the short source run
        extra = {"transfer": ["stages.num_stages=3"], "fixed": [f"meta.fixed.dwm_path={src.dwm(3)}"]}.get(meta.mode, [])
        extra += [f"meta.init_dwm={src.root}"] if meta.init_dwm else []
        argv = ["--config", name, "--run-dir", f"runs/exp/dry-{name.split('/')[-1]}", "--dry-run", *extra]
        assert pretrain(argv) == 0, name
    assert capsys.readouterr().out.count("# generated DeepSpeed config") == len(twins)


def test_the_validation_stage_count_and_static_twins_train(exp):
    """Beyond the two arms: held-out validation (the DWM_VAL ablation, one meta-update), the 2-stage twin at its
    own stage count, and DWM_w1 (the source run's stage-2 DWM for every step, no meta job)."""
    work, _, src = exp
    run = train(work, "random_dwm_val_heldout", "stages.num_stages=2")
    assert load_config(RunDir(run).config).data.val_source == "heldout"
    assert RunDir(run).dwm(2).is_file() and [r["stage"] for r in records(RunDir(run).evals)] == [1, 2]
    assert "heldout" in RunDir(run).meta_log(2).read_text()

    run = train(work, "random_dwm_2stages", "stages.num_stages=2")
    assert sorted({r["stage"] for r in records(run / "metrics.jsonl")}) == [1, 2]
    assert sorted(p.name for p in RunDir(run).dwm_dir.glob("*.safetensors")) == ["stage2.safetensors"]

    sha = json.loads(Path(f"{RunDir(src).dwm(2)}.json").read_text())["sha256"]
    run = train(work, "random_dwm_w1")
    assert {r["dwm"] for r in records(run / "metrics.jsonl")} == {f"stage2:{sha[:12]}"}
    assert not RunDir(run).dwm_dir.exists() or not any(RunDir(run).dwm_dir.iterdir())  # no meta job ran


def test_export_equals_the_training_model_and_its_tokenizer(exp, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dwmtrain.checkpoint import consolidated_lm_state
    from dwmtrain.config import load_config
    from dwmtrain.data.tokenizer import load_tokenizer
    from dwmtrain.models.lm import build_lm
    from dwmtrain.models.spec import lm_spec

    _, _, run = exp
    rd = RunDir(run)
    cfg = load_config(rd.config)
    x = torch.randint(3, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    for tag in ("step0000002", "step0000003"):  # a stage boundary (lm_fp32.safetensors) and the final checkpoint
        out = tmp_path / tag
        dwm(run.parent, "export", str(run), "--checkpoint", tag, "--out", str(out))
        lm = build_lm(lm_spec(cfg.model), cfg.model.attn_implementation)
        lm.load_state_dict(consolidated_lm_state(rd, tag))
        hf = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
        with torch.no_grad():
            torch.testing.assert_close(hf(x).logits, lm.eval()(x).logits, rtol=1e-5, atol=1e-5)
        assert json.loads((out / "dwmtrain_export.json").read_text())["checkpoint"] == tag
    # the boundary checkpoint's fp32 file equals DeepSpeed's own consolidation of the ZeRO-3 shards
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from dwmtrain.checkpoint import safe_torch_load

    with safe_torch_load():
        shards = get_fp32_state_dict_from_zero_checkpoint(str(rd.checkpoints), tag="step0000002")
    fp32 = load_file(str(rd.lm_weights("step0000002")))
    assert all(torch.equal(fp32[k], shards[k]) for k in shards) and fp32.keys() == shards.keys()
    tok, sp = AutoTokenizer.from_pretrained(tmp_path / "step0000003"), load_tokenizer(SP_MODEL)
    text = "def f(x):\n\treturn x  # ünïcödé, 12345 <s> ok\r\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
    assert tok.decode(sp.encode(text)) == text


def test_eval_two_runs_per_stage_tables_figure_and_cache(exp):
    work, random_run, dwm_run = exp
    args = ["eval", str(random_run), str(dwm_run), "--labels", "RANDOM,RANDOM+DWM", "--task-data", str(TASK_DATA),
            "--out", "cmp"]  # fmt: skip
    p = dwm(work, *args, "--device", "cpu,cpu")  # one lm-eval process per device, as on the GPUs of a node
    assert "[dwmtrain eval] 6 evaluations on 2 devices: cpu, cpu" in p.stdout
    assert len(set(re.findall(r"\[cpu pid (\d+)\] \[dwmtrain eval\]", p.stdout))) == 2, p.stdout[-3000:]
    res = json.loads((work / "cmp" / "results.json").read_text())
    for shots in ("0shot", "2shot"):
        rows = res[shots]
        assert [(r["run"], r["stage"]) for r in rows] == [(a, k) for a in ("RANDOM", "RANDOM+DWM") for k in range(1, 4)]
        for r in rows:
            assert all(0 <= r[t] <= 100 for t in ("arc_easy", "boolq", "hellaswag", "logiqa", "winogrande")), r
            assert r["AVERAGE"] == pytest.approx(sum(r[t] for t in list(r)[3:12]) / 9)
    assert all(r["LAMBADA ppl"] > 1 for r in res["0shot"]) and "LAMBADA ppl" not in res["2shot"][0]
    md = (work / "cmp" / "results.md").read_text()
    assert (
        "| run | stage | ARC-C | ARC-E | BoolQ | HellaSwag | LogiQA | OBQA | PIQA | SciQ | WinoGrande | AVERAGE" in md
    )
    assert md.count("| RANDOM+DWM | ") == 6, md
    image_has_content(work / "cmp" / "figure2.png")
    # the per-checkpoint cache: every (checkpoint, shots) evaluated once, nothing evaluated again
    assert sum(len(list(RunDir(work / r).lm_eval_dir.rglob("*shot-*.json"))) for r in (random_run, dwm_run)) == 12
    assert p.stdout.count("tasks\n") == 12, p.stdout[-3000:]  # each worker's line whole
    again = dwm(work, *args)
    out = again.stdout + again.stderr
    assert out.count(": cached") == 12 and "tasks\n" not in out, again.stdout[-2000:]  # nothing exported or run
    assert json.loads((work / "cmp" / "results.json").read_text()) == res
    # what a worker of the two evaluated equals what one process evaluates
    cached = sorted(RunDir(work / dwm_run).lm_eval_dir.rglob("*0shot*.json"))[0]
    cached.unlink()
    assert (dwm(work, *args, "--device", "cpu").stdout).count("tasks\n") == 1
    assert json.loads((work / "cmp" / "results.json").read_text()) == res
    # one checkpoint (--checkpoint takes a tag or a step): the same results, from the same cache
    from dwmtrain.eval.runs import stage_end_checkpoints

    ck = stage_end_checkpoints(dwm_run)[0][1]  # stage 2's end
    one = dwm(work, "eval", str(dwm_run), "--task-data", str(TASK_DATA), "--checkpoint", str(ck.step), "--out", "one")
    assert (one.stdout + one.stderr).count(": cached") == 2, one.stdout[-2000:]
    rows = json.loads((work / "one" / "results.json").read_text())["0shot"]
    assert [r["stage"] for r in rows] == [2]
    same = next(r for r in res["0shot"] if r["run"] == "RANDOM+DWM" and r["stage"] == 2)
    assert rows[0]["AVERAGE"] == same["AVERAGE"]


def test_report_summarizes_each_stage_and_points_at_eval(exp):
    work, _, run = exp
    out = dwm(work, "report", str(run)).stdout
    table = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit()]
    assert [(r[0], r[-1].split(":")[0]) for r in table[:3]] == [("1", "uniform"), ("2", "stage2"), ("3", "stage3")]
    assert f"dwmtrain eval {run} --task-data DIR" in out
    assert f"dwmtrain analyze-preferences {run}" in out and f"dwmtrain export {run} --out DIR" in out


def test_score_and_analyze_preferences_write_records_and_figures(exp, tmp_path):
    import pyarrow.parquet as pq

    work, _, run = exp
    data = work / "runs/exp/data/random-64"
    dwm(work, "score", "--dwm", str(RunDir(run).dwm(3)), "--data", str(data), "--samples", "256",
        "--out", str(tmp_path / "w.parquet"))  # fmt: skip
    t = pq.read_table(tmp_path / "w.parquet").to_pylist()
    assert len(t) == 256 and {"index", "weight", "logit", "domain"} <= set(t[0])
    for mb in range(0, 256, 8):  # weights are normalized per micro-batch of 8, as in training
        assert sum(r["weight"] for r in t[mb : mb + 8]) == pytest.approx(8, rel=1e-4)
    p = dwm(work, "analyze-preferences", str(run), "--samples", "512", "--split", "train")
    out = RunDir(run).analysis_dir
    for png in ("domains.png", "weights_hist.png", "rank_correlation.png"):
        image_has_content(out / png)
    prefs = json.loads((out / "preferences.json").read_text())
    assert "stage 3" in (out / "summary.txt").read_text().lower(), p.stdout
    corr = prefs["correlation"]["spearman_logit"]
    assert len(corr) == 2 and all(abs(corr[i][i] - 1) < 1e-9 for i in range(2))  # stages 2..3


def test_transfer_arm_weighs_each_stage_with_the_source_runs_dwm(exp):
    """1.3b_dsir_dwm: a bigger LM on the DSIR selection, stage k weighed by stage k's DWM of RANDOM+DWM (the
    static arms' `fixed` mode runs in test_pretrain.py::test_static_dwm_for_the_whole_run)."""
    work, _, src = exp
    src_sha = {k: json.loads(Path(f"{RunDir(src).dwm(k)}.json").read_text())["sha256"] for k in range(2, 4)}
    run = train(work, "1.3b_dsir_dwm")
    got = {r["stage"]: r["dwm"] for r in records(run / "metrics.jsonl")}
    assert {k: v.split(":")[-1] for k, v in got.items()} == {1: "uniform", 2: src_sha[2][:12], 3: src_sha[3][:12]}
    assert sorted(by_step(run / "metrics.jsonl")) == [1, 2, 3]
    assert not RunDir(run).dwm_dir.exists() or not any(RunDir(run).dwm_dir.iterdir())  # no meta job ran
    assert load_config(RunDir(run).config).model.preset == "small"  # the twin's "1.3B": bigger than the source LM
