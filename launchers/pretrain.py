#!/usr/bin/env python3
"""DeepSpeed entry point for pretraining with a DWM.

    deepspeed --num_gpus N launchers/pretrain.py --config launchers/configs/tiny.yaml --run-dir runs/x [k=v ...]
    deepspeed --hostfile hosts launchers/pretrain.py --config FILE --run-dir DIR [k=v ...]

Running the same command again resumes from the newest complete checkpoint in DIR.
"""

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dwmtrain.config import ConfigError, build_deepspeed_config, load_config  # noqa: E402


def main() -> int:
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML run config (launchers/configs/*.yaml)")
    ap.add_argument("--run-dir", help="output directory (sets run.run_dir)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and DeepSpeed JSON, exit")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    a = ap.parse_args()
    try:
        ov = list(a.overrides) + ([f"run.run_dir={a.run_dir}"] if a.run_dir else [])
        cfg = load_config(a.config, ov)
        if a.dry_run:
            world = int(os.environ.get("WORLD_SIZE", 1))
            acc = "cpu"
            try:
                from deepspeed.accelerator import get_accelerator

                acc = get_accelerator().device_name()
            except Exception:
                pass
            print(cfg.to_yaml(), end="")
            print(f"# generated DeepSpeed config (world size {world}, accelerator {acc}):")
            print(json.dumps(build_deepspeed_config(cfg, world, acc), indent=2))
            return 0
    except ConfigError as e:
        print(f"pretrain.py: config error: {e}", file=sys.stderr)
        return 2
    from dwmtrain.train.main import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
