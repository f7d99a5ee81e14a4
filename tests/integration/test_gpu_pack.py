"""The GPU pack on the CPU (``tools/gpu/check.sh --cpu``): every part runs and passes its correctness checks, so the
pack is ready for the next lent GPU; and the wheels the device machine lacks build here within the carry limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from .helpers import REPO

#: what the GPU image holds, and the lower bounds pyproject.toml claims: the pack's CPU run uses them
LOWER = {"transformers": "5.17.0", "huggingface_hub": "1.33.0"}


def test_the_pack_runs_every_part_on_the_cpu_with_its_checks(tmp_path):
    """On the GPU image's transformers (the lower bound pyproject.toml claims), not CI's newer one."""
    assert '"transformers>=5.17"' in (REPO / "pyproject.toml").read_text()
    lower = tmp_path / "lower"
    pins = [f"{k}=={v}" for k, v in LOWER.items()]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(lower), *pins],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), DWMTRAIN_PYTHON=sys.executable, PYTHONUNBUFFERED="1", PYTHONPATH=str(lower))
    p = subprocess.run(["bash", str(REPO / "tools" / "gpu" / "check.sh"), "--cpu"], env=env, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    parts = summary["parts"]
    assert p.returncode == 0, {k: (v["status"], v["lines"][-1:]) for k, v in parts.items()}
    from tools.gpu.check import PARTS

    assert list(parts) == list(PARTS) and all(v["status"] == "ok" and v["figures"] for v in parts.values())
    figures = {f["name"].split(" (")[0]: f for v in parts.values() for f in v["figures"]}
    # the correctness checks hold on the CPU too (the throughput targets are the GPU's: not asserted here)
    for name in ("loss.bf16_fused vs fp32 full logits", "attention.kernel", "train.resume", "train.meta_update",
                 "train.loss", "fusedadam.run"):  # fmt: skip
        assert figures[name]["ok"] is True, figures[name]
    assert "2 rank(s)" in next(f["name"] for f in parts["train"]["figures"])  # CI's bf16 run has 2 ranks
    assert "flash_attention_for_cpu" in figures["attention.kernel"]["measured"]
    assert {"metaacc.bf16 default fd_eps", "metastep.peak_memory meta/train step", "boundary.pause"} <= {
        f["name"].split(" 0")[0].split(" (")[0] for v in parts.values() for f in v["figures"]
    }
    assert f"transformers {LOWER['transformers']}," in figures["machine.software"]["measured"]
    text = (out / "summary.txt").read_text()
    assert text.splitlines()[0].startswith("machine.cpu: ") and "pack: 10/10 parts ran" in text
    assert all((out / f"{name}.log").is_file() for name in PARTS)


def test_the_wheels_build_here_and_fit_what_a_device_call_carries(tmp_path):
    dest = tmp_path / "whl"
    p = subprocess.run(["bash", str(REPO / "tools" / "gpu" / "wheels.sh"), str(dest)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, DWMTRAIN_PYTHON=sys.executable))  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(f.name.split("-")[0] for f in dest.glob("*.whl"))
    assert {"deepspeed", "datasets", "pydantic", "pydantic_core", "hjson", "zstandard", "dill"} <= set(names)
    assert next(dest.glob("deepspeed-*-py3-none-any.whl"))  # no op compiled ahead: pure Python
    assert next(dest.glob("pydantic_core-*-cp312-*manylinux*.whl"))  # the device's CPython 3.12
    assert sum(f.stat().st_size for f in dest.glob("*.whl")) < 48 * 2**20 and "of the 64 MiB" in p.stdout
