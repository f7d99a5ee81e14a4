"""The GPU pack's structure, without running it: every part has its sizes and limits, and its lines parse."""

from __future__ import annotations

from tools.gpu.check import LIMITS, PARTS, SIZES, parse_line


def test_every_part_has_gpu_and_cpu_sizes_and_limits_within_eight_minutes():
    assert set(LIMITS) == set(PARTS) and set(SIZES["gpu"]) == set(SIZES["cpu"])
    assert list(PARTS)[0] == "machine"  # what the machine is comes first
    assert SIZES["gpu"]["train"]["ranks"] == 1 and SIZES["cpu"]["train"]["ranks"] == 2
    assert "370m" in SIZES["gpu"]["step_370m"] and "1.3b" in SIZES["gpu"]["step_1.3b"]
    assert SIZES["gpu"]["boundary"]["preset"] == "370m"


def test_result_lines_parse_into_name_measured_target_and_verdict():
    f = parse_line("step.tokens_per_s (LM alone / with DWM): 5835 / 5864 / -")
    assert f == {"name": "step.tokens_per_s (LM alone / with DWM)", "measured": "5835 / 5864", "target": "-",
                 "ok": None}  # fmt: skip
    f = parse_line("metaacc.fp32 fd relative error by fd_eps (tiny, 4x32): 0.001: 1.1e-02 / best fd_eps 0.01")
    assert f["name"] == "metaacc.fp32 fd relative error by fd_eps (tiny, 4x32)" and f["measured"] == "0.001: 1.1e-02"
    f = parse_line("metastep.peak_memory meta/train step: 2.18x (21 vs 10 MiB) / <= 2x  SHORT")
    assert f["ok"] is False and f["target"] == "<= 2x"
    assert parse_line("train.part: failed (exit 1) / ok  SHORT  (RuntimeError: boom)")["ok"] is False
    assert parse_line("# machine: ok in 4 s") is None and parse_line("a plain log line") is None
