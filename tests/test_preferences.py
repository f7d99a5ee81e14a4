"""`dwmtrain score` and `dwmtrain analyze-preferences` on the bundled corpus with hand-made stage DWMs."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dwmtrain.analysis.cli import register
from dwmtrain.analysis.preferences import write_outputs
from dwmtrain.analysis.scoring import choose_samples, score_dataset
from dwmtrain.analysis.stats import StageScores, compute_preferences, rankdata, spearman, within_batch_spearman
from dwmtrain.checkpoint.dwm_file import load_dwm, save_dwm
from dwmtrain.data.dataset import TokenDataset
from dwmtrain.errors import DWMTrainError
from dwmtrain.models.dwm import DataWeightingModel, DWMArch
from dwmtrain.models.weights import normalize_weights
from dwmtrain.rundir import RunDir
from tests.conftest import CORPUS, SP_MODEL

TARGET = "python_code"  # the domain the stage-3 DWM is trained to prefer
ARCH = DWMArch(backbone="tiny", vocab_size=4096, max_seq_len=64, attn_heads=4)


def run_cli(argv: list[str]) -> None:
    """Parse and run one of the two subcommands as `dwmtrain` would (errors propagate to the test)."""
    ap = argparse.ArgumentParser(prog="dwmtrain")
    register(ap.add_subparsers(dest="cmd", required=True))
    a = ap.parse_args(argv)
    a.fn(a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards: one intra-op thread is much faster than two fighting other processes for 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dwmtrain.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("pref_data") / "sample-64"
    prepare_data(
        [str(CORPUS / "sample.jsonl.zst")],
        str(SP_MODEL),
        str(out),
        seq_len=64,
        workers=1,
        heldout_fraction=0.05,
        shard_sequences=20000,
        seed=0,
        overwrite=False,
        progress=False,
    )
    return out


def random_head_dwm(seed: int) -> DataWeightingModel:
    """A DWM whose output layer is a seeded random tensor (a fresh one is exactly uniform: zero-initialized)."""
    torch.manual_seed(seed)
    m = DataWeightingModel(ARCH)
    with torch.no_grad():
        m.fc2.weight.normal_(0.0, 0.5)
    return m


def domain_preferring_dwm(ds: TokenDataset, domain: str, steps: int = 40) -> DataWeightingModel:
    """A DWM fitted by a few Adam steps to score ``domain`` high and everything else low."""
    m = random_head_dwm(1)
    target = ds.domain_names.index(domain)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    rng = np.random.default_rng(1)
    for _ in range(steps):
        idx = rng.choice(len(ds), 8, replace=False)
        z = m.score(m.embed(ds.batch(idx.tolist())))
        y = torch.tensor(ds.domains[idx] == target, dtype=torch.float32)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    from dwmtrain.config import load_config

    run = tmp_path_factory.mktemp("pref_run") / "run"
    run.mkdir()
    cfg = load_config("tiny", [f"data.train_data={data_dir}", "data.seq_len=64", "data.raw=[]", "stages.num_stages=4"])
    RunDir(run).config.write_text(cfg.to_yaml())
    save_dwm(random_head_dwm(0), RunDir(run).dwm(2), stage=2, lm_step=6)
    save_dwm(domain_preferring_dwm(TokenDataset(data_dir, "train"), TARGET), RunDir(run).dwm(3), stage=3, lm_step=12)
    return run  # stage 4's DWM is missing on purpose


def assert_real_png(path) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200, img.shape
    assert img[..., :3].std() > 0.01, f"{path}: a flat image"


def test_rankdata_and_spearman():
    assert rankdata(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    x = np.array([0.3, -1.0, 2.0, 5.0, 0.1])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])
    assert spearman(a, b) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
    assert math.isnan(spearman(np.ones(4), b))
    assert within_batch_spearman(np.r_[x[:4], x[:4]], np.r_[x[:4], -x[:4]], 4) == pytest.approx(0.0)


def test_choose_samples_rounds_down_and_is_seeded():
    idx, notes = choose_samples(100, 30, seed=3)
    assert len(idx) == 24 and len(set(idx.tolist())) == 24
    assert any("rounded down to 24" in n for n in notes)
    assert choose_samples(100, 30, seed=3)[0].tolist() == idx.tolist()
    assert choose_samples(20, 0)[0].tolist() == list(range(16))
    assert len(choose_samples(20, 64)[0]) == 16  # more than available: all of them
    with pytest.raises(DWMTrainError, match="at least one micro-batch"):
        choose_samples(5, 0)


def test_score_dataset_is_training_weighting(run_dir, data_dir):
    ds = TokenDataset(data_dir, "heldout")
    dwm = load_dwm(RunDir(run_dir).dwm(3))
    idx = np.random.default_rng(0).choice(len(ds), 67, replace=False)
    w, z = score_dataset(dwm, ds, idx, with_logits=True)
    assert len(w) == len(z) == 64  # rounded down to micro-batches of 8
    with torch.no_grad():
        direct = torch.cat([dwm(ds.batch(idx[s : s + 8].tolist())).float() for s in range(0, 64, 8)]).numpy()
    np.testing.assert_allclose(w, direct, rtol=0, atol=1e-6)
    np.testing.assert_allclose(w.reshape(-1, 8).mean(1), 1.0, atol=1e-5)
    again = normalize_weights(torch.tensor(z).reshape(-1, 8), ARCH.temperature, ARCH.uniform_mix).reshape(-1)
    np.testing.assert_allclose(again.numpy(), w, atol=1e-5)  # the logits are the ones behind the weights
    assert w.std() > 0.05  # not uniform


def test_score_writes_jsonl_and_parquet(run_dir, data_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    dwm_file = RunDir(run_dir).dwm(3)
    base = ["score", "--dwm", str(dwm_file), "--data", str(data_dir), "--split", "heldout", "--samples", "100"]
    run_cli([*base, "--seed", "5", "--out", str(tmp_path / "s.jsonl")])
    out = capsys.readouterr().out
    assert "rounded down to 96" in out and "samples: 96" in out and "mean weight per domain" in out
    run_cli([*base, "--seed", "5", "--out", str(tmp_path / "s.parquet")])
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    table = pq.read_table(tmp_path / "s.parquet").to_pylist()
    assert len(recs) == len(table) == 96
    assert set(recs[0]) == {"index", "micro_batch", "weight", "logit", "domain"}
    assert [r["index"] for r in recs] == [r["index"] for r in table]
    np.testing.assert_allclose([r["weight"] for r in recs], [r["weight"] for r in table], atol=1e-12)

    ds = TokenDataset(data_dir, "heldout")
    dwm = load_dwm(dwm_file).eval()
    for mb in (0, 11):
        rs = [r for r in recs if r["micro_batch"] == mb]
        assert len(rs) == 8
        with torch.no_grad():
            direct = dwm(ds.batch([r["index"] for r in rs])).numpy()
        np.testing.assert_allclose([r["weight"] for r in rs], direct, atol=1e-6)
        assert np.mean([r["weight"] for r in rs]) == pytest.approx(1.0, abs=1e-5)
        assert [r["domain"] for r in rs] == [ds.domain(r["index"]) for r in rs]


def test_score_in_three_parts_and_a_merge_writes_what_one_score_writes(run_dir, data_dir, tmp_path, capsys):
    import pyarrow.parquet as pq

    from dwmtrain.errors import DataError

    base = ["score", "--dwm", str(RunDir(run_dir).dwm(3)), "--data", str(data_dir), "--split", "heldout",
            "--samples", "100", "--seed", "5"]  # fmt: skip
    run_cli([*base, "--out", str(tmp_path / "one.parquet")])
    out = [*base, "--out", str(tmp_path / "s.parquet")]
    for i in (2, 0):
        run_cli([*out, "--part", f"{i}/3"])
    said = capsys.readouterr().out
    assert "part 2/3: scored samples 64..95 in" in said and "samples/s" in said  # 12 micro-batches: 4, 4, 4
    with pytest.raises(DataError, match=r"part 1/3 is missing or unfinished; run dwmtrain score --part 1/3"):
        run_cli([*out, "--merge"])
    script = Path(__file__).parents[1] / "launchers" / "slurm" / "score.sbatch"  # as the array's task 1 runs it
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="1", DWMTRAIN_PYTHON=sys.executable)
    p = subprocess.run(["bash", str(script), "3", *out[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "part 1/3: scored samples 32..63" in p.stdout, p.stderr[-2000:]
    run_cli([*out, "--part", "1/3"])
    assert "part 1/3 is complete" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"part 0/3 was made from other DWM, data, samples or options"):
        run_cli([*base[:-1], "6", "--out", str(tmp_path / "s.parquet"), "--merge"])  # another seed: other samples
    p = subprocess.run(["bash", str(script), "merge", *out[1:]], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "merged 96 scored heldout samples" in p.stdout, p.stderr[-2000:]
    assert pq.read_table(tmp_path / "s.parquet").to_pylist() == pq.read_table(tmp_path / "one.parquet").to_pylist()


def test_score_errors_name_the_path(run_dir, data_dir, tmp_path):
    with pytest.raises(DWMTrainError, match=r"\.csv"):
        run_cli(["score", "--dwm", str(RunDir(run_dir).dwm(3)), "--data", str(data_dir), "--out", "x.csv"])
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DWMTrainError, match="nope.safetensors"):
        run_cli(["score", "--dwm", str(missing), "--data", str(data_dir), "--out", str(tmp_path / "s.jsonl")])
    with pytest.raises(DWMTrainError, match="no_data"):
        run_cli(
            ["score", "--dwm", str(RunDir(run_dir).dwm(3)), "--data", str(tmp_path / "no_data"), "--out", "s.jsonl"]
        )


def test_analyze_preferences(run_dir, tmp_path, capsys):
    out = tmp_path / "analysis"
    run_cli(["analyze-preferences", str(run_dir), "--samples", "1024", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "stage 4: no DWM file" in printed
    for name in ("domains.png", "weights_hist.png", "rank_correlation.png", "preferences.json", "summary.txt"):
        assert (out / name).is_file(), name
    assert not (out / "quality.png").exists()  # no quality scores in today's data
    for name in ("domains.png", "weights_hist.png", "rank_correlation.png"):
        assert_real_png(out / name)

    rep = json.loads((out / "preferences.json").read_text())
    assert [s["stage"] for s in rep["stages"]] == [2, 3]
    assert rep["samples"] == 1024 and rep["split"] == "heldout"
    for s in rep["stages"]:
        assert sum(s["counts"].values()) == 1024
        assert sum(s["histogram"]["counts"]) == 1024
        assert sum(d["count"] for d in s["domains"].values()) == 1024
        assert sum(d["share_preferred"] for d in s["domains"].values()) == pytest.approx(1.0)
    for key in ("spearman_logit", "spearman_weight", "within_micro_batch_spearman"):
        m = np.array(rep["correlation"][key])
        assert m.shape == (2, 2)
        np.testing.assert_allclose(m, m.T)
        np.testing.assert_allclose(np.diag(m), 1.0)

    stage3 = rep["stages"][1]["domains"]
    assert max(stage3, key=lambda d: stage3[d]["share_ratio"]) == TARGET
    assert stage3[TARGET]["share_ratio"] > 2 and stage3[TARGET]["mean_weight"] > 1.5

    summary = (out / "summary.txt").read_text()
    assert summary.strip() in printed
    block = summary.split("stage 3 (")[1]
    assert block.splitlines()[1].split()[:2] == ["most", "over-preferred:"]
    assert TARGET in block.splitlines()[1]
    assert "lowest inter-stage rank correlation (logits): stage 2 vs stage 3" in summary


def test_analyze_preferences_errors(run_dir, tmp_path):
    with pytest.raises(DWMTrainError, match="no_such_run"):
        run_cli(["analyze-preferences", str(tmp_path / "no_such_run")])
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(DWMTrainError, match="config.yaml"):
        run_cli(["analyze-preferences", str(empty)])
    RunDir(empty).config.write_text(RunDir(run_dir).config.read_text())
    with pytest.raises(DWMTrainError, match="no stage DWM files"):
        run_cli(["analyze-preferences", str(empty)])
    RunDir(empty).dwm_dir.mkdir()
    RunDir(empty).dwm(2).write_bytes(b"not a safetensors file")  # sidecar missing: an incomplete write
    with pytest.raises(DWMTrainError, match="stage2.safetensors"):
        run_cli(["analyze-preferences", str(empty)])


def test_quality_hook_figure(tmp_path):
    """The quality figure (Figure 3's manner) for data that carries quality scores; none does today."""
    rng = np.random.default_rng(0)
    n = 256
    domains = rng.integers(0, 3, n)
    stages = []
    for k in (2, 3, 4):
        z = rng.normal(size=n)
        w = normalize_weights(torch.tensor(z).reshape(-1, 8)).reshape(-1).numpy()
        stages.append(StageScores(k, f"dwm/stage{k}.safetensors", w, z))
    quality = {"writing": stages[0].logits + rng.normal(size=n), "expertise": rng.normal(size=n)}
    rep = compute_preferences(stages, domains, ["a", "b", "c"], 8, quality)
    files = write_outputs(rep, tmp_path)
    assert_real_png(files["quality.png"])
    q = rep["stages"][0]["quality"]["writing"]
    assert q["mean_preferred"] > q["mean_unpreferred"]  # writing was made to follow stage 2's logits
    assert "quality writing" in (tmp_path / "summary.txt").read_text()


@pytest.fixture(scope="module")
def rater(tmp_path_factory):
    """A tiny, seeded two-label rater (a QuRater stand-in: no judgement, real model and tokenizer files)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dwmtrain.data.sentencepiece_tokenizer import export_hf

    path = tmp_path_factory.mktemp("rater") / "rater"
    export_hf(SP_MODEL, path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, num_labels=2, pad_token_id=2, bos_token_id=1,
        eos_token_id=2, id2label={0: "writing_style", 1: "educational_value"},
        label2id={"writing_style": 0, "educational_value": 1},
    )  # fmt: skip
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    return path


def test_a_rater_gives_the_quality_panels_from_the_cli(run_dir, data_dir, rater, tmp_path, capsys):
    """--rater: every sample's decoded text rated on every label; score records carry the fields, and
    analyze-preferences draws Figure 3's panels from them."""
    from dwmtrain.analysis.scoring import sample_texts
    from dwmtrain.select.qurating import load_rater, rater_logits

    dwm_file = RunDir(run_dir).dwm(3)
    run_cli(["score", "--dwm", str(dwm_file), "--data", str(data_dir), "--split", "heldout", "--samples", "32",
             "--out", str(tmp_path / "s.jsonl"), "--rater", str(rater), "--rater-max-length", "64"])  # fmt: skip
    recs = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert {"writing_style", "educational_value"} <= set(recs[0])
    ds = TokenDataset(data_dir, "heldout")
    texts = sample_texts(ds, np.array([r["index"] for r in recs]))
    assert all(len(t) > 20 for t in texts)  # real text, decoded with the tokenizer the data's index names
    want = rater_logits(texts, *load_rater(str(rater)), max_length=64)
    np.testing.assert_allclose([r["educational_value"] for r in recs], want[:, 1], rtol=1e-5, atol=1e-6)

    out = tmp_path / "analysis"
    run_cli(["analyze-preferences", str(run_dir), "--samples", "256", "--out", str(out), "--device", "cpu",
             "--rater", str(rater), "--rater-labels", "writing,education", "--rater-max-length", "64"])  # fmt: skip
    assert "rating 256 samples" in capsys.readouterr().out
    rep = json.loads((out / "preferences.json").read_text())
    assert rep["quality_fields"] == ["education", "writing"]
    assert set(rep["stages"][0]["quality"]) == {"education", "writing"}
    assert_real_png(out / "quality.png")
    assert "quality writing" in (out / "summary.txt").read_text()
    with pytest.raises(DWMTrainError, match="names 1 labels, the rater has 2"):
        run_cli(["analyze-preferences", str(run_dir), "--samples", "16", "--out", str(out), "--device", "cpu",
                 "--rater", str(rater), "--rater-labels", "writing"])  # fmt: skip
