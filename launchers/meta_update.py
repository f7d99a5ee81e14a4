#!/usr/bin/env python3
"""The single-node meta-update job for one stage boundary.

    torchrun --standalone --nproc_per_node N launchers/meta_update.py --run-dir DIR --stage K --checkpoint TAG

Reads DIR/config.yaml (written by the training job), the ZeRO-3 checkpoint DIR/checkpoints/TAG, the
previous DWM (DIR/dwm/stage{K-1}.safetensors) if any, and writes DIR/dwm/stage{K}.safetensors plus
DIR/meta/stage{K}.jsonl. The training job starts this itself with meta.launch=local; with
meta.launch=external (e.g. a separate SLURM job) run it by hand, then rerun the training command.
"""

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dwmtrain.config import ConfigError, load_config  # noqa: E402


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--stage", type=int, required=True, help="the stage this DWM will weigh (2..T)")
    ap.add_argument("--checkpoint", default="", help="checkpoint tag at the start of that stage (default: latest)")
    ap.add_argument("--lookahead-lr", type=float, default=0.0, help="alpha (default: meta.lookahead_lr or the LM lr)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides of meta.* settings")
    a = ap.parse_args()
    run_dir = Path(a.run_dir)
    try:
        cfg = load_config(run_dir / "config.yaml", [*a.overrides, f"run.run_dir={run_dir}"])
    except ConfigError as e:
        print(f"meta_update.py: config error: {e}", file=sys.stderr)
        return 2
    tag = a.checkpoint or json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    alpha = a.lookahead_lr or cfg.meta.lookahead_lr or cfg.optimizer.lr
    import torch

    from dwmtrain.distributed import init_distributed
    from dwmtrain.meta.update import run_meta_update

    d = init_distributed(cfg.run.dist_timeout_s)
    if d.accelerator == "cpu":
        torch.set_num_threads(cfg.run.threads_per_rank or 1)
    run_meta_update(cfg, d, a.stage, tag, alpha)
    return 0


if __name__ == "__main__":
    sys.exit(main())
