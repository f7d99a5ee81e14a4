#!/usr/bin/env python3
"""Checkout wrapper of ``dwmtrain.launch.meta_job`` (the single-node meta-update job).

torchrun --standalone --nproc_per_node N launchers/meta_update.py --run-dir DIR --stage K [--checkpoint TAG]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dwmtrain.entry import main_entry  # noqa: E402
from dwmtrain.launch.meta_job import main  # noqa: E402

if __name__ == "__main__":
    main_entry(main)
