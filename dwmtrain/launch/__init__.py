"""Entry points of the jobs, importable from an installed package.

    deepspeed [--num_gpus N | --hostfile H] --module dwmtrain.launch.pretrain --config C --run-dir D [k=v ...]
    torchrun --standalone --nproc_per_node N -m dwmtrain.launch.meta_update --run-dir D --stage K
    dwmtrain train ...      prints and runs the deepspeed command above

``launchers/pretrain.py`` and ``launchers/meta_update.py`` are thin wrappers of these for a checkout.
"""
