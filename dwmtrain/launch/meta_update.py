"""The meta-update job's entry point under its launch name (the same ``main`` as ``dwmtrain.meta.job``).

torchrun --standalone --nproc_per_node N -m dwmtrain.launch.meta_update --run-dir DIR --stage K
"""

from dwmtrain.entry import main_entry
from dwmtrain.meta.job import main

if __name__ == "__main__":
    main_entry(main)
