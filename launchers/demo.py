#!/usr/bin/env python3
"""`make demo`: the whole method end to end on this machine.

The small preset trains with the bi-level DWM for 4 stages on the bundled corpus with 2 CPU ranks
(DeepSpeed ZeRO-3, gloo): stage 1 uniform; at each boundary a sharded checkpoint, a separate
meta-update job (2 processes), the new DWM broadcast to both ranks. Ends with a report. Rerunning
resumes (or, when finished, only prints the report).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(os.environ.get("DEMO_RUN_DIR", ROOT / "runs" / "demo"))


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from dwmtrain.report import summarize

    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    cmd = [
        deepspeed,
        "--num_gpus",
        "2",
        str(ROOT / "launchers" / "pretrain.py"),
        "--config",
        str(ROOT / "launchers" / "configs" / "small.yaml"),
        "--run-dir",
        str(RUN),
        "run.threads_per_rank=1",
        *sys.argv[1:],
    ]
    print("dwmtrain demo: small preset, 4 stages, bi-level DWM, 2 CPU ranks\n$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    print(f"\n==== demo {'finished' if rc == 0 else f'FAILED (exit {rc})'} in {time.time() - t0:.0f} s ====\n")
    if (RUN / "metrics.jsonl").is_file():  # a launch that failed before its first step has said why already
        print(summarize(RUN))
    return rc


if __name__ == "__main__":
    sys.exit(main())
