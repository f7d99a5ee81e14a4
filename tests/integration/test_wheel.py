"""The package works once pip-installed: a wheel in a fresh virtual environment, run from a directory
that holds no checkout, trains 2 ranks through a stage boundary with the bi-level meta-update."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from ..helpers import free_port
from .helpers import REPO, by_step, run

pytestmark = pytest.mark.slow


def build_wheel(out: Path) -> Path:
    """Build from a copy of the sources (a stale in-tree build/ could add files the checkout no longer has)."""
    src = out / "src"
    shutil.copytree(
        REPO,
        src,
        symlinks=True,
        ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info", "__pycache__"),
    )
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)])
    (whl,) = out.glob("dwmtrain-*.whl")
    return whl


def test_wheel_installed_outside_the_checkout_runs_bilevel_training(tmp_path, data64):
    whl = build_wheel(tmp_path / "wheel")
    names = set(zipfile.ZipFile(whl).namelist())
    for f in (
        "dwmtrain/ds_configs/zero3.json",
        "dwmtrain/configs/tiny.yaml",
        "dwmtrain/data/corpus/sample_sp4096.model",
        "dwmtrain/data/corpus/lambada_sample.jsonl",
        "dwmtrain/launch/pretrain.py",
        "dwmtrain/launch/meta_job.py",
    ):
        assert f in names, f"{f} missing from {whl.name}"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(whl)])
    # reuse this environment's torch, deepspeed, ... (a path line: its own .pth files, and with them the
    # editable dwmtrain of the checkout, are not loaded)
    site = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"  # no checkout here, nor above it
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def sh(*cmd):
        p = subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        return p.stdout + p.stderr

    assert sh(str(py), "-c", "import dwmtrain; print(dwmtrain.__file__)").strip().startswith(str(site))
    run_dir = elsewhere / "run"
    out = sh(
        str(venv / "bin" / "dwmtrain"),
        "train",
        "--nproc",
        "2",
        "--master-port",
        str(free_port()),
        "--config",
        "tiny",  # a bundled config, by name
        "--run-dir",
        str(run_dir),
        f"data.train_data={data64}",
        "stages.total_steps=4",
        "stages.num_stages=2",
        "meta.steps=2",
        "meta.nproc=2",
        "run.threads_per_rank=1",
    )
    assert "--module dwmtrain.launch.pretrain" in out
    cfg = (run_dir / "config.yaml").read_text()
    assert f"tokenizer: {site}/dwmtrain/data/corpus/sample_sp4096.model" in cfg  # dwmtrain:... -> the install
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    steps = by_step(run_dir / "metrics.jsonl")
    assert sorted(steps) == [1, 2, 3, 4]
    sidecar = json.loads((run_dir / "dwm" / "stage2.safetensors.json").read_text())
    assert [steps[s]["dwm"] for s in (2, 3)] == ["uniform", f"stage2:{sidecar['sha256'][:12]}"]
    log = (run_dir / "meta" / "stage2.log").read_text()
    assert "-m dwmtrain.launch.meta_job" in log and f"{REPO}/dwmtrain/" not in log and "Traceback" not in log
