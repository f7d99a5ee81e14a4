#!/usr/bin/env python3
"""Checkout wrapper of ``dwmtrain.launch.pretrain`` (an installed package runs that module directly).

    deepspeed --num_gpus N launchers/pretrain.py --config launchers/configs/tiny.yaml --run-dir runs/x [k=v ...]
    deepspeed --hostfile hosts launchers/pretrain.py --config FILE --run-dir DIR [k=v ...]

Running the same command again resumes from the newest complete checkpoint in DIR.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dwmtrain.entry import main_entry  # noqa: E402
from dwmtrain.launch.pretrain import main  # noqa: E402

if __name__ == "__main__":
    main_entry(main)
